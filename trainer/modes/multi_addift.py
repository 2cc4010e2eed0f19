"""Multi-ADDifT: the ADDifT difference objective over many Original/Target pairs from one folder.

Pairs are found by ``diff_target_name`` (``photo.png`` ↔ ``photo_after.jpg``), bucketed like LoRA
mode with both members framed identically, and each pair is conditioned on its own captions (with the
trigger word). Runs exactly ``train_iterations`` steps, not to the end of an epoch.
"""

from __future__ import annotations

import json

from trainer.data import BucketBatcher, tag_frequency
from trainer.modes.addift import addift_loss, addift_probe
from trainer.modes.dataset import dataset_metadata, plan_pair_data, plan_steps
from trainer.modes.inputs import empty_mask_error
from trainer.modes.lora import caption_augment
from trainer.modes.setup import (
    CaptionEncoder,
    ModeOutcome,
    RunContext,
    build_adapters,
    encode_dataset_images,
    finish,
    run_pass,
)
from trainer.paths import folder_name
from trainer.report import MAX_PAIRS


def planned_suffixes(s) -> list[str]:
    from trainer.modes.lora import planned_suffixes as lora_suffixes

    return lora_suffixes(s)


def _check_masks(data) -> None:
    """Every pair must differ somewhere (in at least one of its frames), else its masked loss is 0.

    Raises:
        InputError: naming the first pair whose every frame has an empty difference mask.
    """
    changed: dict[str, bool] = {}
    for bucket in data.buckets:
        for pair, mask in zip(bucket.pairs, bucket.masks, strict=True):
            name = f"{pair.orig.path} -> {pair.targ.path}"
            changed[name] = changed.get(name, False) or bool(mask.any())
    for name, ok in changed.items():
        if not ok:
            raise empty_mask_error(name)


def run(ctx: RunContext) -> ModeOutcome:
    s, bundle = ctx.settings, ctx.bundle
    plan = ctx.dataset if ctx.dataset is not None else plan_pair_data(s)
    ctx.events.info(plan_steps(s, plan, world_size=ctx.world_size).line())
    data = encode_dataset_images(ctx, plan, pairs=True)
    if s.diff_use_diff_mask:
        _check_masks(data)
    batcher = ctx.track("batcher", BucketBatcher(data, int(s.train_batch_size), ctx.seed, ctx.rank, ctx.world_size))
    bundle.offload("vae")
    captions = [c for b in data.buckets for c in (*b.orig_captions, *b.targ_captions)]
    # per-pair captions really condition training (§17 #4), through the caption controls
    encode = CaptionEncoder(bundle, captions, caption_augment(ctx, s, captions), train_te=False)
    if not encode.per_step:
        bundle.offload("text_encoders")
    bundle.set_gradient_checkpointing(bool(s.use_gradient_checkpointing))
    network = build_adapters(ctx, s, resume=s.diff_load_1st_pass or s.network_resume, text_encoder=False)

    def draw(step: int):
        ref = next(batcher)
        batch = data.gather(ref.bucket_index, list(ref.indices), bundle.device)  # this batch only to the device
        size = batch.size_ids  # SDXL: each pair's own size and crop (original and target share them)
        return (batch.orig_latents, batch.targ_latents, encode(batch.orig_captions, step).with_size(size),
                encode(batch.targ_captions, step).with_size(size), batch.masks)

    # the card measures up to MAX_PAIRS pairs (its draws spread over them), at the first pair's bucket size
    measured = plan.pairs[:MAX_PAIRS]
    first = measured[0]
    bucket_w, bucket_h = first.orig.bucket
    probe = addift_probe(s, [str(x.path.resolve()) for p in measured for x in (p.orig, p.targ)], first.orig.caption,
                         first.targ.caption, (int(bucket_h), int(bucket_w)),
                         captions=[x.caption for p in measured for x in (p.orig, p.targ)])

    counts = {f"{w}x{h}": n for (w, h), n in data.counts().items()}
    extra = {"traintrain_data": folder_name(s.lora_data_directory), "traintrain_diff_target_name": s.diff_target_name,
             "traintrain_pairs": str(len(plan.pairs)), "ss_tag_frequency": json.dumps({"1": tag_frequency(captions)}),
             "traintrain_timesteps": f"{s.train_min_timesteps},{s.train_max_timesteps}",
             **dataset_metadata(s, plan, batcher.steps_per_epoch)}
    sidecar = {"activation_text": s.lora_trigger_word, "preferred_weight": 1.0, "sd_version": bundle.family.name}
    try:
        result, written = run_pass(ctx, s, network, addift_loss(ctx, s, network, draw), epoch=lambda: batcher.current_epoch,
                                   summary={"pairs": len(plan.pairs), "buckets": counts}, extra=extra,
                                   steps_per_epoch=batcher.steps_per_epoch)
        return finish(ctx, s, network, result, written, extra=extra, sidecar=sidecar, probe=probe)
    finally:
        network.detach()
        bundle.set_gradient_checkpointing(False)
