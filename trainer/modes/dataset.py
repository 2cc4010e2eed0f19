"""The dataset a LoRA or Multi-ADDifT run trains on, as the settings describe it.

The image folder (kohya ``N_name`` sub-folders repeat their images N times; ``<stem>_mask`` files
weight the loss with ``masked_loss``), the regularization folder (LoRA), and how many steps the run
takes: ``train_iterations``, or ``train_epochs`` × the batches one epoch holds. :class:`StepPlan` is
the one-line summary ("1200 steps = 10 epochs × 120 batches (40 images × 3 repeats / batch 1)") that
the CLI, the tab and the run's log show before training starts; it is computed from the plan alone
(image headers, no encoding), so it is cheap enough to show on demand.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trainer.data import BucketBatcher, DataPlan, PairPlan, plan_pairs, plan_samples, planned_counts, scan_images
from trainer.data.scan import ScanResult
from trainer.errors import InputError
from trainer.settings import FIELD_BY_KEY

DATASET_MODES = FIELD_BY_KEY["train_epochs"].modes  # the modes that train on a folder (the settings table says)
REG_KEY = "reg_data_directory"


def plan_kwargs(s) -> dict[str, Any]:
    """The dataset settings ``plan_samples`` and ``plan_pairs`` share, read once from ``s``."""
    return {
        "size_hw": tuple(s.image_size), "bucket_step": int(s.image_buckets_step), "min_length": int(s.image_min_length),
        "max_ratio": float(s.image_max_ratio), "sub_image_num": int(s.sub_image_num), "mirroring": bool(s.image_mirroring),
        "disable_upscale": bool(s.image_disable_upscale), "num_multiply": int(s.image_num_multiply),
        "trigger": s.lora_trigger_word, "use_filename_as_tag": bool(s.image_use_filename_as_tag),
    }


def plan_lora_data(s, note: Callable[[str], None] = lambda _: None) -> DataPlan:
    """Scan and plan the training images, plus the regularization images when a reg folder is set.

    Args:
        s: LoRA-mode settings.
        note: receives one line per skipped file.

    Raises:
        InputError: a folder is missing or holds no usable image (the message names its field).
    """
    masked = bool(s.masked_loss)
    scan = scan_images(s.lora_data_directory, masks=masked)
    _report_skipped(scan, note)
    kwargs = plan_kwargs(s)
    plan = plan_samples(scan.images, **kwargs, repeats=scan.repeats, masks=scan.masks if masked else None)
    plan = _class_captions(plan, scan, s.lora_trigger_word, bool(s.image_use_filename_as_tag))
    if not s.reg_data_directory.strip():
        return plan
    reg_scan = scan_images(s.reg_data_directory.strip(), key=REG_KEY)
    _report_skipped(reg_scan, note)
    multiply = int(s.reg_num_multiply)
    try:  # reg captions never carry the trigger word: they keep the class as the base model knows it
        reg = plan_samples(reg_scan.images, **{**kwargs, "trigger": ""}, is_reg=True,
                           repeats=lambda p: reg_scan.repeats(p) * multiply)
    except InputError as err:
        raise InputError(REG_KEY, err.message) from err
    return plan.with_reg(_class_captions(reg, reg_scan, "", bool(s.image_use_filename_as_tag)))


def plan_pair_data(s) -> PairPlan:
    """Scan and plan the Multi-ADDifT pairs."""
    scan = scan_images(s.lora_data_directory)
    return plan_pairs(scan.images, diff_target_name=s.diff_target_name, **plan_kwargs(s))


def _report_skipped(scan: ScanResult, note: Callable[[str], None]) -> None:
    for path, reason in scan.skipped:
        note(f"skipped {path}: {reason}")


def _class_captions(plan: DataPlan, scan: ScanResult, trigger: str, use_filename_as_tag: bool) -> DataPlan:
    """kohya's fallback: an image with no caption file in an ``N_name`` folder is captioned ``name``."""
    if use_filename_as_tag:
        return plan
    samples = []
    for sample in plan.samples:
        name = scan.folder_class(sample.path)
        if name and not any(sample.path.with_suffix(ext).is_file() for ext in (".txt", ".caption")):
            sample = dataclasses.replace(sample, caption=", ".join(p for p in (trigger.strip(), name) if p))
        samples.append(sample)
    return dataclasses.replace(plan, samples=samples)


@dataclass(frozen=True)
class StepPlan:
    """How long a dataset run is, in steps and in epochs.

    Attributes:
        steps: optimizer steps the run takes.
        batches_per_epoch: steps one epoch holds on this rank (buckets round up to whole batches).
        images: distinct training image files.
        samples: training samples per epoch (frames × repeats × ``image_num_multiply``).
        reg_samples: regularization samples mixed into each epoch (0 without a reg folder).
        repeats: the repeat counts in use (folder repeats × ``image_num_multiply``), sorted.
        batch_size: ``train_batch_size``.
        buckets: buckets holding samples.
        from_epochs: True when ``train_epochs`` set the step count.
        kind: what the files are called in the line (``images``, or ``pairs`` for Multi-ADDifT).
    """

    steps: int
    batches_per_epoch: int
    images: int
    samples: int
    reg_samples: int
    repeats: tuple[int, ...]
    batch_size: int
    buckets: int
    from_epochs: bool
    kind: str = "images"

    @property
    def epochs(self) -> float:
        return self.steps / self.batches_per_epoch

    def line(self) -> str:
        """E.g. ``1200 steps = 10 epochs × 120 batches (40 images × 3 repeats / batch 1)``."""
        epochs = f"{self.epochs:g}" if self.from_epochs or self.epochs == int(self.epochs) else f"{self.epochs:.2f}"
        if len(self.repeats) == 1:
            what = f"{self.images} {self.kind} × {self.repeats[0]} repeats"
            frames = self.samples // self.repeats[0]
            if frames != self.images:
                what += f" × {frames / self.images:g} frames"
        else:
            what = f"{self.samples} samples from {self.images} {self.kind} (repeats {self.repeats[0]}–{self.repeats[-1]})"
        if self.reg_samples:
            what += f" + {self.reg_samples} reg"
        buckets = f", {self.buckets} buckets" if self.buckets > 1 else ""
        return (f"{self.steps} steps = {epochs} epochs × {self.batches_per_epoch} batches "
                f"({what} / batch {self.batch_size}{buckets})")


def plan_steps(s, plan: DataPlan | PairPlan | None = None, *, world_size: int = 1) -> StepPlan:
    """Steps and epochs of a dataset run, from its plan (made here when not given).

    Raises:
        InputError: the dataset cannot be planned (missing folder, no images, no pairs).
    """
    if plan is None:
        plan = plan_dataset(s)
    counts = planned_counts(plan)
    batcher = BucketBatcher(counts, int(s.train_batch_size), 0, 0, world_size)
    per_epoch = batcher.steps_per_epoch
    from_epochs = int(s.train_epochs) > 0
    steps = int(s.train_epochs) * per_epoch if from_epochs else int(s.train_iterations)
    is_pairs = isinstance(plan, PairPlan)
    items = plan.pairs if is_pairs else [x for x in plan.samples if not x.is_reg]
    reps = Counter(getattr(x, "repeats", 1) * plan.num_multiply for x in items)
    files = {x.orig.path for x in items} if is_pairs else {x.path for x in items}
    samples = sum(r * n for r, n in reps.items())
    return StepPlan(steps, per_epoch, len(files), samples, samples if _has_reg(plan) else 0, tuple(sorted(reps)),
                    int(s.train_batch_size), sum(1 for n in counts.item_counts() if n), from_epochs,
                    "pairs" if is_pairs else "images")


def _has_reg(plan: DataPlan | PairPlan) -> bool:
    return isinstance(plan, DataPlan) and any(x.is_reg for x in plan.samples)


def plan_dataset(s, note: Callable[[str], None] = lambda _: None) -> DataPlan | PairPlan:
    """The plan of a dataset mode's folder (LoRA: images and reg images; Multi-ADDifT: pairs)."""
    return plan_lora_data(s, note) if s.mode == "LoRA" else plan_pair_data(s)


def resolve_epochs(s, *, world_size: int = 1, note: Callable[[str], None] = lambda _: None
                   ) -> tuple[Any, DataPlan | PairPlan | None]:
    """With ``train_epochs`` set, the settings with ``train_iterations`` counted from the dataset, and the
    plan that counted them (the mode reuses it: planning decodes every image once). Otherwise ``s`` and None.
    """
    if s.mode not in DATASET_MODES or int(s.train_epochs) <= 0:
        return s, None
    plan = plan_dataset(s, note)
    return s.replace(train_iterations=plan_steps(s, plan, world_size=world_size).steps), plan


def steps_line(s) -> str:
    """The run's length in one line (``--count-steps``).

    Raises:
        InputError: the dataset cannot be planned.
    """
    if s.mode not in DATASET_MODES:
        return f"{s.train_iterations} steps ({s.mode} has no dataset epochs)"
    return plan_steps(s).line()


def describe_steps(s) -> str:
    """The step summary for the tab: :func:`steps_line`, or one line saying why there is none."""
    if s.mode in DATASET_MODES and not str(s.lora_data_directory).strip():
        return "choose lora_data_directory to count images, repeats and epochs"
    try:
        return steps_line(s)
    except InputError as err:
        return f"cannot count steps: {err}"


def dataset_metadata(s, plan: DataPlan | PairPlan, steps_per_epoch: int) -> dict[str, str]:
    """kohya's ``ss_*`` data keys: epochs, batches per epoch, folders with their repeats, caption controls."""
    import json

    meta = {
        "ss_num_epochs": f"{int(s.train_iterations) / max(steps_per_epoch, 1):g}",
        "ss_num_batches_per_epoch": str(steps_per_epoch),
        "ss_shuffle_caption": str(bool(s.shuffle_caption)), "ss_keep_tokens": str(int(s.keep_tokens)),
        "ss_caption_dropout_rate": str(float(s.caption_dropout_rate)),
        "ss_caption_tag_dropout_rate": str(float(s.caption_tag_dropout_rate)),
    }
    if isinstance(plan, DataPlan):
        meta["ss_dataset_dirs"] = json.dumps(_dirs(plan, s.lora_data_directory, reg=False))
        if _has_reg(plan):
            meta["ss_reg_dataset_dirs"] = json.dumps(_dirs(plan, s.reg_data_directory, reg=True))
            meta["ss_num_reg_images"] = str(len({x.path for x in plan.samples if x.is_reg}))
            meta["ss_prior_loss_weight"] = str(float(s.prior_loss_weight))
        meta["ss_masked_loss"] = str(bool(s.masked_loss))
    return meta


def _dirs(plan: DataPlan, root: str, *, reg: bool) -> dict[str, dict[str, int]]:
    """``{folder: {"n_repeats": N, "img_count": images}}`` relative to the dataset root (kohya's layout)."""
    out: dict[str, dict[str, int]] = {}
    seen: set = set()
    for x in plan.samples:
        if x.is_reg != reg or x.path in seen:
            continue
        seen.add(x.path)
        try:
            name = x.path.parent.relative_to(root).as_posix()
        except ValueError:
            name = x.path.parent.name
        entry = out.setdefault(name if name != "." else x.path.parent.name, {"n_repeats": x.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out
