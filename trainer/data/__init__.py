"""Dataset pipeline for LoRA and Multi-ADDifT: buckets, scanning, captions, planning, caching, batching."""

from .buckets import assign_bucket, crop_geometry, make_buckets, resize_and_crop, upscale_needed
from .cache import (
    Batch,
    BucketData,
    CachedData,
    CachedPairs,
    PairBatch,
    PairBucketData,
    PlannedCounts,
    encode_pairs,
    encode_samples,
    planned_counts,
)
from .captions import CaptionAugment, compose_caption, filename_tags, read_caption_file, tag_frequency
from .images import LoadedImage, open_image
from .loader import BatchRef, BucketBatcher
from .pixels import diff_mask, load_frame
from .plan import DataPlan, PairPlan, PairSample, Sample, find_pairs, plan_pairs, plan_samples
from .scan import IMAGE_EXTENSIONS, ScanResult, is_image_path, scan_images

__all__ = [
    "IMAGE_EXTENSIONS", "Batch", "BatchRef", "BucketBatcher", "BucketData", "CachedData", "CachedPairs",
    "DataPlan", "LoadedImage", "PairBatch", "PairBucketData", "PairPlan", "PairSample", "PlannedCounts", "Sample", "ScanResult",
    "CaptionAugment", "assign_bucket", "compose_caption", "crop_geometry", "diff_mask", "encode_pairs", "encode_samples",
    "filename_tags", "find_pairs", "is_image_path", "load_frame", "make_buckets", "open_image", "plan_pairs",
    "plan_samples", "planned_counts", "read_caption_file", "resize_and_crop", "scan_images", "tag_frequency", "upscale_needed",
]
