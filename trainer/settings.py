"""The single settings table: every setting declared once, by its reference JSON key.

The UI widgets, CLI ``--set`` flags, preset import/export, the README table and validation are all
generated from :data:`FIELDS`. Values flow as one frozen :class:`Settings` built in a fixed layer order
(defaults -> preset -> UI/CLI); code reads ``settings.network_rank``, never a position.

Raw values are kept in the reference product's JSON form (``"1e-4"`` stays text, ``image_size`` stays
``"512,768"``) so presets round-trip byte-for-byte in meaning; typed values are computed once, at
construction, and a value that cannot be coerced raises :class:`SettingsError` (no silent default).
"""

from __future__ import annotations

import ast
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainer.errors import SettingsError
from trainer.paths import safe_name

MODES: tuple[str, ...] = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")
PASS2_KEY = "2nd pass"
SECTIONS: tuple[str, ...] = ("required", "optional", "job", "pass2")
WIDGETS: tuple[str, ...] = ("dropdown", "text", "checkbox", "checkboxgroup", "textarea", "image")
# Where a field sits in the tab. "job" (mode, model, prompts, images), "inputs" (the mode's data fields) and
# "basics" (steps, batch, LR, rank, size) are always on the first screen; the others are the closed
# groups of optional settings, titled as a practitioner thinks of them, in this order.
GROUPS: dict[str, str] = {
    "job": "Job", "inputs": "Inputs", "basics": "Basics",
    "dataset": "Dataset & captions", "network": "Network", "optimizer": "Optimizer & schedule",
    "noise": "Noise & loss", "saving": "Saving & resume", "previews": "Previews", "advanced": "Advanced",
    "pass2": "2nd pass",
}
OPTIONAL_GROUPS: tuple[str, ...] = ("dataset", "network", "optimizer", "noise", "saving", "previews", "advanced")

_ALL = frozenset(MODES)
_LORA = frozenset({"LoRA"})
_ILECO = frozenset({"iLECO"})
_DIFF = frozenset({"Difference"})
_DATA = frozenset({"LoRA", "Difference", "Multi-ADDifT"})  # reference "Visible in" for dataset keys
_ADDIFT = frozenset({"ADDifT", "Multi-ADDifT"})
_PROMPTED = frozenset({"iLECO", "Difference", "ADDifT", "Multi-ADDifT"})  # §17 #36: prompts condition these
_IMAGES = frozenset({"Difference", "ADDifT"})
_DATASET = frozenset({"LoRA", "Multi-ADDifT"})  # modes that train on a folder with captions
_NOISED = frozenset({"LoRA", "Difference", "ADDifT", "Multi-ADDifT"})  # modes that noise real latents

SEPARATOR = "-" * 26
RANKS: tuple[int, ...] = tuple(2**k for k in range(2, 11))
ALPHAS: tuple[float, ...] = tuple(2.0 ** (k - 5) for k in range(16))
BLOCK_IDS: tuple[str, ...] = (
    ("BASE",) + tuple(f"IN{i:02d}" for i in range(12)) + ("M00",) + tuple(f"OUT{i:02d}" for i in range(12))
)
NETWORK_TYPES = ("lierla", "c3lier", "loha", "lokr", "dora")
ELEMENTS = ("Full", "CrossAttention", "SelfAttention")
# The reference also lists step 0, which hangs its bucket generator (§17 #22); we do not offer it.
BUCKET_STEPS: tuple[int, ...] = tuple(range(64, 577, 64))
LOSSES = ("MSE", "L1", "Smooth-L1")
MODEL_PRECISIONS = ("model", "fp32", "bf16", "fp16", "int8")
LORA_PRECISIONS = ("fp32", "bf16", "fp16")
SAVE_PRECISIONS = ("model", "fp32", "bf16", "fp16")
OPTIMIZERS: tuple[str, ...] = (
    "AdamW", "AdamW8bit", "AdaFactor", "Lion", "Prodigy", SEPARATOR,
    "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD", SEPARATOR,
    "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit", SEPARATOR,
    "RAdamScheduleFree", "AdamWScheduleFree", "SGDScheduleFree", SEPARATOR,
    "CAME", "Tiger", "AdamMini", "PagedAdamW", "PagedAdamW32bit", "SGDNesterov", "Adam",
)  # fmt: skip
SCHEDULERS: tuple[str, ...] = (
    "cosine_annealing", "cosine_annealing_with_restarts", "linear", "cosine", "cosine_with_restarts",
    "polynomial", "constant", "constant_with_warmup", "piecewise_constant", "exponential", "step",
    "multi_step", "reduce_on_plateau", "cyclic", "one_cycle",
)  # fmt: skip
SAMPLE_SAMPLERS = ("Euler", "DDIM")
FLOW_SAMPLINGS = ("model", "uniform", "sigmoid", "logit_normal")  # "model": the family's choice
MAX_IMAGE_PX = 8192  # a side beyond this is a typo (an SDXL latent of 8192 px already needs ~100 GB to train)
_PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "", "no", "off", "none"}


@dataclass(frozen=True)
class Field:
    """One setting.

    Attributes:
        key: exact reference JSON key, e.g. ``image_size(height, width)``.
        type: type of the coerced value (``tuple`` for image size and blocks, ``dict`` for kwargs text).
        default: default in raw (JSON) form.
        choices: legal or suggested values (dropdowns); enforced for names, suggested for numbers.
        modes: modes in which the setting has an effect (and is shown).
        pass2: may be overridden in Difference pass 2 (the reference's "D2" column).
        section: ``required``, ``optional``, ``job`` or ``pass2``.
        column: UI column 1..3 inside its section.
        widget: ``dropdown``, ``text``, ``checkbox``, ``checkboxgroup``, ``textarea`` or ``image``.
        label: UI label in words ("Learning rate"); the exact key is shown in the help.
        group: where the tab shows it, one of :data:`GROUPS`.
        help: effect · trade-off · typical value.
        minimum, maximum: the legal range of a number (None = unbounded on that side); ``validate`` enforces
            it in the modes the field applies to, the README and the tab show it.
        above: ``minimum`` itself is excluded (``> 0`` rather than ``>= 0``).
        range_hint: the fix an out-of-range message suggests (default: ``use e.g. <default>``).
        attr: attribute name on :class:`Settings` (derived from ``key``).
    """

    key: str
    type: type
    default: Any
    choices: tuple = ()
    modes: frozenset = _ALL
    pass2: bool = False
    section: str = "optional"
    column: int = 1
    widget: str = "text"
    label: str = ""
    help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    range_hint: str = ""
    group: str = "advanced"
    attr: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attr", self.key.split("(")[0].strip().replace(" ", "_"))
        if not self.label:
            object.__setattr__(self, "label", self.key.replace("_", " "))
        assert self.section in SECTIONS and self.widget in WIDGETS and 1 <= self.column <= 3, self.key
        assert self.group in GROUPS, self.key

    @property
    def range_text(self) -> str:
        """The legal range as people write it (``1..1024``, ``> 0``, ``>= 0``), or "" when unbounded."""
        lo, hi = self.minimum, self.maximum
        if lo is None and hi is None:
            return ""
        if lo is not None and hi is not None and not self.above:
            return f"{_num(lo)}..{_num(hi)}"
        low = "" if lo is None else f"{'>' if self.above else '>='} {_num(lo)}"
        high = "" if hi is None else f"<= {_num(hi)}"
        return " and ".join(p for p in (low, high) if p)

    def out_of_range(self, value: float) -> bool:
        """Whether a number lies outside :attr:`minimum` .. :attr:`maximum`."""
        if self.minimum is not None and (value <= self.minimum if self.above else value < self.minimum):
            return True
        return self.maximum is not None and value > self.maximum


def _num(x: float) -> str:
    """A bound as typed: 1024, 0.5, 10000000 (never 1e+07)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _f(key: str, type_: type, default: Any, help_: str, **kw: Any) -> Field:
    """Shorthand for the table below."""
    return Field(key=key, type=type_, default=default, help=help_, **kw)


def _req(col: int, key: str, type_: type, default: Any, help_: str, **kw: Any) -> Field:
    return _f(key, type_, default, help_, section="required", column=col, **kw)


def _opt(col: int, key: str, type_: type, default: Any, help_: str, **kw: Any) -> Field:
    return _f(key, type_, default, help_, section="optional", column=col, **kw)


_DD, _CH, _TA = {"widget": "dropdown"}, {"widget": "checkbox"}, {"widget": "textarea"}


def _range(minimum: float, maximum: float | None = None, *, above: bool = False, hint: str = "") -> dict[str, Any]:
    """Range keywords of a number field: ``minimum <= x <= maximum`` (``minimum < x`` when ``above``)."""
    return {"minimum": minimum, "maximum": maximum, "above": above, "range_hint": hint}

_D2 = {"pass2": True}

# Reference export order (§4.2) first, then our additions, then the job keys.
FIELDS: tuple[Field, ...] = (
    # -- required, column 1
    _req(1, "network_type", str, "lierla",
         "Adapter family. lierla: attention/linear layers only; c3lier adds 3x3 convs (more capacity, bigger "
         "file); loha/lokr (LyCORIS) are more expressive per parameter; dora adds a learned magnitude. Typical: lierla.",
         choices=NETWORK_TYPES, **_DD, **_D2, label="Network type", group="network"),
    _req(1, "network_rank", int, 16,
         "Rank of each adapter. Higher learns more detail but overfits sooner and grows the file. "
         "Typical: 16 for LoRA, 4 for iLECO/ADDifT.", choices=RANKS, **_DD, **_D2,
         **_range(1, 1024, hint="use e.g. 16 (the file grows with the rank: 1024 is already hundreds of MB)"), label="Rank", group="basics"),
    _req(1, "network_alpha", float, 8.0,
         "Scale = alpha / rank. Lower alpha damps updates (pair with a higher learning rate). Typical: half the rank.",
         choices=ALPHAS, **_DD, **_D2, **_range(0, 1024, above=True, hint="use e.g. half the rank"), label="Alpha", group="network"),
    _req(1, "lora_data_directory", str, "",
         "Folder of training images (searched recursively, captions from .txt/.caption beside each image). "
         "LoRA and Multi-ADDifT.", modes=_DATASET, label="Image folder", group="inputs"),
    _req(1, "diff_target_name", str, "",
         "Multi-ADDifT pairing suffix: 'cat.png' pairs with 'cat<suffix>.png' as its target. Required in that mode. "
         "Example: _after.", modes=frozenset({"Multi-ADDifT"}), label="Target file suffix", group="inputs"),
    _req(1, "lora_trigger_word", str, "",
         "Word put before every caption. In ADDifT, leaving it empty also drops BASE (text encoder) from the blocks.",
         modes=frozenset({"LoRA", "Difference", "ADDifT", "Multi-ADDifT"}), label="Trigger word", group="inputs"),
    # -- required, column 2
    _req(2, "image_size(height, width)", tuple, "512",
         "'N' or 'height,width' in pixels (multiples of 8). LoRA/Multi-ADDifT: largest bucket. iLECO: size of "
         "the one noise latent drawn once and reused at every step, kept in the given orientation. Typical: "
         "512 (SD1), 1024 (SDXL).", modes=frozenset({"LoRA", "iLECO", "Multi-ADDifT"}), label="Image size", group="basics"),
    _req(2, "train_iterations", int, 1000,
         "Number of optimizer steps. More steps = stronger effect and more time. Typical: 1000 LoRA, 300-500 iLECO, "
         "30-50 ADDifT.", **_D2, **_range(1, 10_000_000), label="Steps", group="basics"),
    _req(2, "train_batch_size", int, 2,
         "Samples per step. Larger is smoother but needs more VRAM. Typical: 1-4.", **_D2, **_range(1, 1024), label="Batch size", group="basics"),
    _req(2, "train_learning_rate", float, "1e-4",
         "U-Net learning rate. Too high burns the image, too low learns nothing. Typical: 1e-4 (AdamW), "
         "1.0 (Prodigy/D-Adaptation).", **_D2,
         **_range(0, 10, above=True, hint="use e.g. 1e-4 (AdamW) or 1.0 (Prodigy/D-Adaptation)"), label="Learning rate", group="basics"),
    # -- required, column 3
    _req(3, "train_optimizer", str, "AdamW",
         "Optimizer. AdamW is the safe default; 8bit variants save VRAM (bitsandbytes); Prodigy/D-Adaptation pick "
         "the step size themselves (use lr 1.0); ScheduleFree ignore the LR scheduler. Names are case-insensitive.",
         choices=OPTIMIZERS, **_DD, **_D2, label="Optimizer", group="optimizer"),
    _req(3, "train_optimizer_settings", dict, "",
         "Extra optimizer arguments, one name=value per line or ';'-separated, Python literals only. "
         "Example: weight_decay=0.01; betas=(0.9,0.99). Quote strings: name='x'.", **_D2, label="Optimizer arguments", group="optimizer"),
    _req(3, "train_lr_scheduler", str, "cosine",
         "How the learning rate changes over the run. cosine decays to 0; constant keeps it; the torch ones "
         "(cosine_annealing, step, ...) take their arguments from the scheduler settings. Typical: cosine.",
         choices=SCHEDULERS, **_DD, **_D2, label="LR schedule", group="optimizer"),
    _req(3, "train_lr_scheduler_settings", dict, "",
         "Extra scheduler arguments as name=value literals, e.g. eta_min=1e-5 for cosine_annealing or "
         "milestones=[100,200] for multi_step. Leave empty for the diffusers schedulers.", **_D2, label="Schedule arguments", group="optimizer"),
    _req(3, "save_lora_name", str, "",
         "Output file name without extension; also names the CSV log and settings snapshot. Empty -> 'untitled'.", label="LoRA name", group="inputs"),
    _req(3, "use_gradient_checkpointing", bool, False,
         "Recompute activations in backward: much less VRAM, about 20-30% slower. Turn on for SDXL on small GPUs.",
         **_CH, **_D2, label="Gradient checkpointing (less VRAM)", group="advanced"),
    _req(1, "network_blocks(BASE = TextEncoder)", tuple, list(BLOCK_IDS),
         "U-Net blocks that get adapters; BASE adds text-encoder adapters (only useful in LoRA mode). Fewer blocks "
         "= more targeted effect, smaller file. Blocks a family lacks (IN09 on SDXL) are ignored.",
         choices=BLOCK_IDS, widget="checkboxgroup", **_D2, label="Blocks to train (BASE = text encoder)", group="network"),
    # -- optional, column 1
    _opt(1, "network_resume", str, "",
         "Path of an existing LoRA to start from (same type and rank). Ignored in iLECO. Empty = fresh adapters.",
         modes=_DATA, label="Start from LoRA file", group="saving"),
    _opt(1, "network_strength", float, 1.0,
         "Scales the saved weights by this factor (each of up/down by its square root), so the LoRA at weight "
         "1.0 acts like strength x (> 0; dora: 1 only). Typical: 1; ADDifT style presets use 2-5.", **_D2,
         **_range(0, 100, above=True), label="Strength of the saved LoRA", group="network"),
    _opt(1, "network_conv_rank", int, 0,
         "Rank of 3x3 conv adapters (c3lier/loha/lokr). 0 = same as network rank.",
         choices=(0,) + RANKS, **_DD, **_D2, **_range(0, 1024), label="Conv rank", group="network"),
    _opt(1, "network_conv_alpha", float, 0.0,
         "Alpha of 3x3 conv adapters. 0 = same as network alpha.", choices=(0.0,) + ALPHAS, **_DD, **_D2,
         **_range(0, 1024), label="Conv alpha", group="network"),
    _opt(1, "network_element", str, "Full",
         "Which sub-layers of attention blocks get adapters (lierla/c3lier): Full, CrossAttention (prompt "
         "response, good for concepts) or SelfAttention (layout/style). Empty means Full.",
         choices=ELEMENTS, **_DD, **_D2, label="Attention layers", group="network"),
    _opt(1, "network_train_text_encoder", bool, False,
         "No effect (kept so reference presets load). The text encoder is trained by ticking BASE in network blocks.",
         modes=_ILECO, **_CH, label="Train text encoder (no effect)", group="network"),
    _opt(1, "image_buckets_step", int, 256,
         "Grid step of the aspect-ratio buckets in pixels. Smaller = closer fit to each image, more buckets "
         "(smaller batches). Typical: 64-256.", choices=BUCKET_STEPS, modes=_DATASET, **_DD, label="Bucket step", group="dataset"),
    _opt(1, "image_num_multiply", int, 1,
         "Repeat every image this many times per epoch; balances small datasets. Typical: 1.", modes=_DATASET,
         **_range(1, 1000), label="Repeats per image", group="dataset"),
    _opt(1, "image_min_length", int, 512,
         "Smallest bucket side in pixels. Typical: 512 (SD1), 768-1024 (SDXL).", modes=_DATASET,
         **_range(0, 8192, above=True), label="Smallest bucket side", group="dataset"),
    _opt(1, "image_max_ratio", float, 2.0,
         "Largest bucket aspect ratio; wider images are cropped. Typical: 2.", modes=_DATASET, **_range(1, 16), label="Largest aspect ratio", group="dataset"),
    _opt(1, "sub_image_num", int, 0,
         "Extra down-scaled copies of each image (teaches scale invariance, more steps per epoch). Typical: 0.",
         modes=_DATASET, **_range(0, 16), label="Down-scaled copies", group="dataset"),
    _opt(1, "image_mirroring", bool, False,
         "Also train on horizontally flipped copies. Doubles data; wrong for asymmetric subjects (text, logos).",
         modes=_DATASET, **_CH, label="Mirror images", group="dataset"),
    _opt(1, "image_use_filename_as_tag", bool, False,
         "Caption = trigger word + tags taken from the file name (when no caption file exists).", modes=_DATASET, **_CH, label="File name as caption", group="dataset"),
    _opt(1, "image_disable_upscale", bool, False,
         "Skip images smaller than their bucket instead of upscaling them (no blurry upscales, fewer images).",
         modes=_DATASET, **_CH, label="Skip small images", group="dataset"),
    _opt(1, "train_fixed_timsteps_in_batch", bool, False,
         "Use one timestep for the whole batch (LoRA, Difference). Lower-variance comparisons, noisier gradient "
         "over time. Ignored by iLECO.", label="One timestep per batch", **_CH, **_D2, group="noise"),
    # -- optional, column 2
    _opt(2, "train_textencoder_learning_rate", float, "",
         "Learning rate of text-encoder adapters (BASE). Empty or 0 = same as the U-Net rate. Typical: empty or "
         "half the U-Net rate.", modes=_LORA, label="Text encoder learning rate", group="optimizer"),
    _opt(2, "train_seed", int, -1,
         "Random seed for noise, timesteps and shuffling; -1 draws a new one (recorded in the LoRA).", **_D2, label="Seed", group="advanced"),
    _opt(2, "train_min_timesteps", int, 0,
         "Lowest diffusion timestep sampled (inclusive, 0-1000). Raising it trains composition rather than detail.",
         **_D2, **_range(0, 1000), label="Lowest timestep", group="noise"),
    _opt(2, "train_max_timesteps", int, 1000,
         "Highest timestep sampled (exclusive, 1-1000). Lowering it trains fine detail/style. ADDifT: 500-1000 for "
         "actions, 200-400 for style.", **_D2, **_range(0, 1000), label="Highest timestep", group="noise"),
    _opt(2, "train_loss_function", str, "MSE",
         "Loss between prediction and target. MSE is standard; L1/Smooth-L1 are less sensitive to outliers.",
         choices=LOSSES, **_DD, **_D2, label="Loss function", group="noise"),
    _opt(2, "train_lr_step_rules", str, "",
         "piecewise_constant only: 'factor:step,...,final', e.g. 1:100,0.1:200,0.01.", **_D2, label="Step rules (piecewise_constant)", group="optimizer"),
    _opt(2, "train_lr_warmup_steps", int, 0,
         "Steps of linear warm-up from lr 0, for every scheduler but constant and piecewise_constant (as kohya); "
         "torch schedulers (cosine_annealing, …) run over the steps after it. Stabilises the first steps. "
         "Typical: 0-100.", **_D2, **_range(0), label="Warm-up steps", group="optimizer"),
    _opt(2, "train_lr_scheduler_num_cycles", int, 1,
         "Restarts of cosine_with_restarts. Typical: 1.", **_D2, **_range(0), label="Restart cycles", group="optimizer"),
    _opt(2, "train_lr_scheduler_power", float, 1.0,
         "Exponent of the polynomial scheduler; 1 = linear decay.", **_D2, **_range(0), label="Polynomial power", group="optimizer"),
    _opt(2, "train_snr_gamma", float, 5.0,
         "Min-SNR loss weighting gamma: down-weights easy low-noise steps for faster convergence. <= 0 disables. "
         "Typical: 5.", **_D2, label="Min-SNR gamma", group="noise"),
    _opt(2, "save_per_steps", int, 0,
         "Also save a step-numbered LoRA every N steps (0 = only at the end).", **_D2, **_range(0), label="Save every N steps", group="saving"),
    _opt(2, "diff_alt_ratio", float, 1.0,
         "ADDifT: weight of the reverse (target->original) pass. 0 = no reverse pass (every step trains "
         "original->target). Negative switches to noise-latent regularisation. Typical: 1.", modes=_ADDIFT,
         **_range(-100, 100), label="Reverse pass weight", group="noise"),
    _opt(2, "diff_revert_original_target", bool, False,
         "ADDifT: swap original and target images (learn the opposite change).", modes=_ADDIFT, **_CH, label="Swap original and target", group="dataset"),
    _opt(2, "diff_use_diff_mask", bool, False,
         "ADDifT: restrict the loss to the masked (alpha) area so only the changed region is learned.",
         modes=_ADDIFT, **_CH, label="Learn only the masked area", group="noise"),
    # -- optional, column 3
    _opt(3, "train_model_precision", str, "fp16",
         "Dtype of the frozen U-Net/text encoder and the autocast mode. fp16/bf16 halve VRAM; bf16 is safer on "
         "cards that support it; int8 quantises weights (torchao). model = fp16. One value per job (the model is "
         "loaded once): Difference pass 2 uses pass 1's.",
         choices=MODEL_PRECISIONS, **_DD, label="Model precision", group="advanced"),
    _opt(3, "train_lora_precision", str, "fp32",
         "Dtype of the trainable adapters. fp32 is the stable choice.", choices=LORA_PRECISIONS, **_DD, **_D2, label="LoRA precision (training)", group="advanced"),
    _opt(3, "save_precision", str, "fp16",
         "Dtype of the saved tensors. fp16 halves the file; model = fp16.", choices=SAVE_PRECISIONS, **_DD, **_D2, label="Saved file precision", group="saving"),
    _opt(3, "train_VAE_precision", str, "fp32",
         "Dtype of the VAE while encoding the training images (and decoding previews). fp32 avoids the SDXL VAE's "
         "fp16 NaNs; bf16/fp16 save VRAM (fp16 is fp32 on CPU). Images are encoded before pass 1, so pass 2 has "
         "none of its own. Web-UI: its own VAE as it is loaded (--no-half-vae).",
         choices=LORA_PRECISIONS, **_DD, label="VAE precision", group="advanced"),
    _opt(3, "diff_load_1st_pass", str, "",
         "Difference: LoRA file name (searched in the LoRA folder) to use as the copier instead of training "
         "pass 1. Saves time when reusing the same image pair.", modes=_DIFF, label="Reuse copier LoRA", group="saving"),
    _opt(3, "diff_save_1st_pass", bool, False,
         "Difference: also save the copier as <name>_copy.safetensors.", modes=_DIFF, **_CH, label="Also save the copier", group="saving"),
    _opt(3, "diff_1st_pass_only", bool, False,
         "Difference: stop after pass 1 and save the copier.", modes=_DIFF, **_CH, label="Stop after the copier", group="saving"),
    _opt(3, "logging_save_csv", bool, True,
         "Write a per-step loss/LR CSV (logs/<date>/). It also feeds the live loss plot, so keep it on.", **_CH, label="Write loss log (CSV)", group="saving"),
    _opt(3, "logging_verbose", bool, False,
         "Print extra detail: file, caption and bucket counts of the dataset, and every adapted module name.",
         **_CH, label="Verbose log", group="advanced"),
    _opt(3, "save_overwrite", bool, False,
         "Allow overwriting an existing LoRA of the same name. Off: a job refuses to start when its files exist, and "
         "a name taken while it trained gets _1, _2... (no LoRA is ever replaced). One value per job.", **_CH, label="Overwrite an existing LoRA", group="saving"),
    _opt(3, "save_as_json", bool, False,
         "Write these settings to json/<date>/<name>-<time>.json when a run starts (a run history).", **_CH, label="Save settings history", group="saving"),
    _opt(3, "model_v_pred", bool, False,
         "Train against the v-prediction target. Tick for v models (SD2-768, v-pred SDXL finetunes).", **_CH, label="v-prediction model", group="advanced"),
    _f("use_2nd_pass_settings", bool, False,
       "Difference: use the values of this accordion for pass 2. Off = pass 2 repeats the pass-1 settings.",
       modes=_DIFF, section="pass2", **_CH, **_D2, label="Use these settings for pass 2", group="pass2"),
    # -- our additions
    _opt(1, "image_cache_latents_to_disk", bool, False,
         "Cache VAE latents next to the images (.npz) and reuse them on the next run. Saves VRAM and time on "
         "large datasets; stale if images change.", modes=frozenset({"LoRA", "Multi-ADDifT"}), **_CH, label="Cache latents to disk", group="dataset"),
    _opt(1, "train_resume_state", str, "",
         "Path of a full resume state file (adapters + optimizer + step) to continue an interrupted run exactly. "
         "Empty = start fresh.", label="Resume state file", group="saving"),
    _opt(1, "save_resume_state", bool, True,
         "Write a resume state (adapters, optimizer, step, noise and data position) with every step, epoch and "
         "stop save, into logs/<date>/<name>-<time>/resume/, never beside the LoRA (Web-UIs would list it as "
         "one). Each is 3-6x the LoRA's size; off saves the disk but a stopped run cannot continue exactly.",
         **_CH, label="Save resume states", group="saving"),
    _opt(2, "train_max_grad_norm", float, 0.0,
         "Clip the gradient norm to this value; guards against loss spikes. 0 = off. Typical: 1.", **_D2, **_range(0), label="Gradient clipping", group="optimizer"),
    _opt(3, "train_compile", bool, False,
         "torch.compile the U-Net: faster steps after a slow first step; not on every platform.", **_CH, label="torch.compile", group="advanced"),
    _opt(3, "train_full_bf16", bool, False,
         "Keep the adapters in bf16 as well: less VRAM, slightly less precise updates. Needs bf16 hardware.",
         **_CH, label="Full bf16", group="advanced"),
    _opt(3, "save_sidecar_json", bool, True,
         "Write A1111's <name>.json card sidecar (activation text, preferred weight) next to the LoRA.", **_CH, label="Write Web-UI card (.json)", group="saving"),
    _opt(3, "ileco_fixed_noise", bool, False,
         "iLECO: train on one noise latent drawn once for the whole run (the reference's behaviour). Off "
         "(default): fresh noise every step, same cost, and it carries over to noise it never saw: on held-out "
         "noise (tiny SD1, red->blue, rank 8, lr 1e-3) fresh noise closed 93%/95% of the gap after 150/300 "
         "steps, fixed noise 71%/74%.", modes=_ILECO, **_CH, label="One fixed noise latent", group="noise"),
    _opt(3, "ileco_keep_prompts", str, "",
         "iLECO: prompts the erase/replace must leave alone, one per line. Each step also trains the LoRA to give "
         "the base model's prediction for one of them (in turn), at ileco_keep_weight: one more forward and "
         "backward per step. Shared tokens (start, padding) carry much of every prompt's context, so without "
         "this an erase moves unrelated prompts too (small-sd1, 8 kept prompts: unseen neighbours' drift 92% -> 23% of "
         "the erase's move, efficacy 93% -> 90%). Empty = off (the reference's behaviour).",
         modes=_ILECO, **_TA, label="Prompts to keep", group="advanced"),
    _opt(3, "ileco_keep_weight", float, 1.0,
         "iLECO: weight of the keep-prompt term against the erase/replace term (used only with ileco_keep_prompts).",
         modes=_ILECO, label="Keep weight", group="advanced", **_range(0.0, 100.0, above=True)),
    _opt(3, "effect_check", bool, True,
         "After training, the report card: efficacy (did it learn, on held-out noise), specificity (did "
         "neighbour prompts stay put) and health (NaN, no change, exploded weights), with a verdict and the "
         "setting to change. A NaN LoRA is not saved. Costs a few dozen forward passes.", **_CH, label="Report card after training", group="advanced"),
    _opt(3, "report_neighbours", str, "",
         "Report card: prompts the LoRA should leave alone, one per line; their drift is reported relative "
         "to the LoRA's own move. Empty = a small built-in set (plus, in LoRA mode, dataset captions without "
         "the trigger word; ADDifT: none, its sliders are meant to move every prompt).", **_TA, label="Report card neighbours", group="advanced"),
    # -- practitioners' controls (kohya names where kohya has the setting)
    _opt(1, "reg_data_directory", str, "",
         "Folder of regularization (class) images, kohya style: each epoch mixes one reg image per training "
         "image into the same-bucket batches, their loss weighted by prior_loss_weight. Keeps the model's "
         "general answer for the class. Empty = none. Subfolders may be named N_name for N repeats.", modes=_LORA, label="Regularization folder", group="dataset"),
    _opt(1, "reg_num_multiply", int, 1,
         "Repeats of every regularization image in the reg pool (the pool is cycled so each epoch takes as many "
         "reg samples as there are training samples). Typical: 1.", modes=_LORA, **_range(1, 1000), label="Regularization repeats", group="dataset"),
    _opt(1, "prior_loss_weight", float, 1.0,
         "Loss weight of regularization samples (kohya's prior-preservation weight). Typical: 1.", modes=_LORA,
         **_range(0), label="Regularization loss weight", group="dataset"),
    _opt(1, "train_epochs", int, 0,
         "Train this many epochs instead of train_iterations (steps = epochs x batches per epoch, shown before the "
         "run). An epoch sees every image x its repeats once. 0 = use train_iterations.", modes=_DATASET,
         **_range(0, 100_000), label="Epochs (instead of steps)", group="dataset"),
    _opt(1, "save_every_n_epochs", int, 0,
         "Also save <name>_epochN every N epochs, to find where the LoRA starts to overfit. 0 = off.",
         modes=_DATASET, **_range(0), label="Save every N epochs", group="saving"),
    _opt(1, "shuffle_caption", bool, False,
         "Shuffle the caption's tags (split on caption_separator) every time an image is used, so no tag "
         "order is learned. The trigger word and the first keep_tokens tags stay in place.",
         modes=_DATASET, **_CH, label="Shuffle caption tags", group="dataset"),
    _opt(1, "caption_separator", str, ",",
         "What separates tags in captions (for shuffling and tag dropout). Typical: ','.", modes=_DATASET, label="Tag separator", group="dataset"),
    _opt(1, "keep_tokens", int, 0,
         "The first N tags (after the trigger word) are never shuffled or dropped. Typical: 1-2 for a character "
         "name kept up front.", modes=_DATASET, **_range(0), label="Tags kept in front", group="dataset"),
    _opt(1, "caption_dropout_rate", float, 0.0,
         "Chance that a sample's whole caption is replaced by the empty prompt (teaches the unconditional answer, "
         "helps CFG). 0-1. Typical: 0-0.1.", modes=_DATASET, **_range(0, 1), label="Caption dropout", group="dataset"),
    _opt(1, "caption_tag_dropout_rate", float, 0.0,
         "Chance that each tag (outside the kept ones) is dropped from a sample's caption. 0-1. Typical: 0-0.1.",
         modes=_DATASET, **_range(0, 1), label="Tag dropout", group="dataset"),
    _opt(1, "masked_loss", bool, False,
         "Weight the loss per pixel by the image's alpha channel or a <name>_mask.png beside it (white = learn, "
         "black = ignore), so backgrounds are not learned. Images without a mask count everywhere. As kohya, the "
         "loss is averaged over all pixels, so a mask covering a quarter of the image gives a quarter of the loss.",
         modes=_LORA, **_CH, label="Masked loss", group="noise"),
    _opt(2, "clip_skip", int, 1,
         "Condition on the text encoder's N-th layer from the end, then its final norm (kohya's clip_skip, "
         "A1111's 'Clip skip'): 1 = last layer, 2 = penultimate (what NAI-style anime SD1 models expect). SD2's "
         "encoder already is OpenCLIP's penultimate layer, so 1 there; SDXL ignores it. In the Web-UI its own "
         "Clip skip option applies. Typical: 1, or 2 for anime SD1 models.", **_range(1, 12, hint="1, or 2 for anime SD1 models"), label="CLIP skip", group="advanced"),
    _opt(2, "noise_offset", float, 0.0,
         "Add a per-channel constant of this size to the training noise so the LoRA can learn very dark and "
         "bright images. Typical: 0.03-0.1; 0 = off.", modes=_NOISED, **_D2, **_range(0, 1), label="Noise offset", group="noise"),
    _opt(2, "multires_noise_iterations", int, 0,
         "Multi-resolution (pyramid) noise levels added to the training noise; learns large-scale tone. "
         "Typical: 6-10; 0 = off.", modes=_NOISED, **_D2, **_range(0, 16), label="Multi-res noise levels", group="noise"),
    _opt(2, "multires_noise_discount", float, 0.3,
         "Weight of each coarser multires level: level i counts discount^i (lower = weaker coarse noise), "
         "as kohya. Typical: 0.3; 0.8 with few images.", modes=_NOISED, **_D2, **_range(0, 1, above=True), label="Multi-res noise falloff", group="noise"),
    _opt(2, "flow_timestep_sampling", str, "model",
         "Flow-matching models only (Z-Image, Anima; SD refuses a choice here): how the noise level sigma is drawn "
         "before the shift. model = the family's choice (logit_normal); uniform spreads over all levels; sigmoid "
         "and logit_normal draw sigmoid(N(0,1)), centred on the middle (the same draw, under both names trainers "
         "use). train_min/max_timesteps still bound it (as sigma x 1000).", choices=FLOW_SAMPLINGS, **_DD,
         label="Flow sigma sampling", group="noise"),
    _opt(2, "flow_shift", float, 0.0,
         "Flow-matching models only (SD refuses a value here): the timestep shift s, sigma' = s*sigma/(1+(s-1)*sigma); "
         "higher trains more at high noise (composition). 0 = the family's scheduler config (Z-Image, Anima: 3; "
         "resolution-dependent where the config says so). Typical: 0, or 1-6.", **_range(0, 100),
         label="Flow shift", group="noise"),
    _opt(3, "sample_every_n_steps", int, 0,
         "Render preview images every N steps (and at the end) into logs/<run>/samples/, shown live in the tab. "
         "iLECO/Difference/ADDifT show a strip at LoRA weight -1, 0, +1. Costs time; 0 = off.", **_D2, **_range(0), label="Preview every N steps", group="previews"),
    _opt(3, "sample_prompts", str, "",
         "Preview prompts, one per line, with kohya options: --n negative, --w width, --h height, --s steps, "
         "--l CFG scale, --d seed. Empty = the trigger word / Target prompt / Original prompt.", **_TA, label="Preview prompts", group="previews"),
    _opt(3, "sample_sampler", str, "Euler",
         "Sampler of the previews (standalone: our own loop; Web-UI: its sampler of that name).",
         choices=SAMPLE_SAMPLERS, **_DD, label="Preview sampler", group="previews"),
    _opt(3, "model_use_ema", bool, False,
         "Checkpoints that carry EMA weights (model_ema.* in a single file, unet_ema/ in a diffusers folder): "
         "train on the EMA copy of the U-Net. Off = the regular weights (what the Web-UI uses). "
         "Standalone/CLI only; a note says when there is no EMA copy.", **_CH, label="Train on EMA weights", group="advanced"),
    # -- job keys
    _f("mode", str, "LoRA", "Training mode.", choices=MODES, section="job", label="Mode", **_DD, group="job"),
    _f("model", str, "", "Base checkpoint to train on. In the Web-UI, empty = the model it has loaded (Forge/Neo: the one selected in its checkpoint dropdown).", section="job", label="Model", **_DD, group="job"),
    _f("vae", str, "", "VAE for encoding images; empty = the checkpoint's own.", section="job", column=2,
       label="VAE", **_DD, group="job"),
    _f("te", str, "", "Text-encoder file for a model kept as separate files, the transformer file in Model: Z-Image "
       "takes Qwen3-4B (qwen_3_4b.safetensors) with the Flux VAE (ae.safetensors), Anima Qwen3-0.6B "
       "(qwen_3_06b_base.safetensors) with the Qwen-Image VAE (qwen_image_vae.safetensors). Tokenizers are found "
       "offline (tokenizer/, tokenizer_2/ beside it, Forge Neo's or ComfyUI's copy, the Hugging Face cache). Empty for "
       "checkpoints that carry their own. Standalone/CLI only.", section="job", column=2, label="Text encoder", **_DD,
       group="job"),
    _f("original prompt", str, "",
       "iLECO: the concept to change. Difference/ADDifT/Multi-ADDifT: conditioning prompt for the original image "
       "(empty = unconditional).", modes=_PROMPTED, section="job", label="Original prompt", **_TA, group="job"),
    _f("target prompt", str, "",
       "iLECO: what the original prompt should turn into; empty = erase it. Other modes: conditioning for the "
       "target image.", modes=_PROMPTED, section="job", column=2, label="Target prompt", **_TA, group="job"),
    _f("negative prompt", str, "", "Negative prompt of the previews when Preview prompts is empty. Not used in training, not saved.",
       modes=_ILECO, section="job", column=3, label="Negative prompt (previews only)", **_TA, group="job"),
    _f("original image", str, "", "Difference/ADDifT: path of the original (before) image.", modes=_IMAGES,
       section="job", label="Original image", widget="image", group="job"),
    _f("target image", str, "", "Difference/ADDifT: path of the target (after) image, same size as the original.",
       modes=_IMAGES, section="job", column=2, label="Target image", widget="image", group="job"),
)  # fmt: skip

FIELD_BY_KEY: dict[str, Field] = {f.key: f for f in FIELDS}
FIELD_BY_ATTR: dict[str, Field] = {f.attr: f for f in FIELDS}

# What the tab switches to when the Mode changes, for each value the user has not typed (the table's
# defaults are the LoRA ones). From the reference README (§9.3-9.5, §19.1): iLECO erases in about 500
# steps at rank 4; Difference is the copier preset (16/16, 5e-4, 500 steps); ADDifT is the action preset
# (rank 4, alpha 1, batch 1, 30 steps, timesteps 500-1000). Multi-ADDifT sees many pairs, so it takes the
# upper end of ADDifT's advised 30-100 steps.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "LoRA": {},
    "iLECO": {"network_rank": 4, "train_iterations": 500, "train_learning_rate": "5e-4"},
    "Difference": {"network_alpha": 16.0, "train_iterations": 500, "train_learning_rate": "5e-4"},
    "ADDifT": {"network_rank": 4, "network_alpha": 1.0, "train_iterations": 30, "train_batch_size": 1,
               "train_min_timesteps": 500, "train_max_timesteps": 1000},
    "Multi-ADDifT": {"network_rank": 4, "network_alpha": 1.0, "train_iterations": 100, "train_batch_size": 1,
                     "train_min_timesteps": 500, "train_max_timesteps": 1000},
}


def mode_default(key: str, mode: str) -> Any:
    """The raw default of ``key`` as the tab starts it in ``mode`` (:data:`MODE_DEFAULTS` over the table)."""
    return MODE_DEFAULTS.get(mode, {}).get(key, FIELD_BY_KEY[key].default)

_JSON_JOB_KEYS = ("mode", "model", "vae", "te", "original prompt", "target prompt")  # negative prompt/images: not saved

# Keys seen in reference files that we rename or drop: old -> (new key or None, why). One warning each.
LEGACY_KEYS: dict[str, tuple[str | None, str]] = {
    "train_fixed_timesteps_in_batch": ("train_fixed_timsteps_in_batch", "spelling of the reference key"),
    "image_use_transparent_background_ajust": (None, "removed in the reference in 2025; masks apply in ADDifT only"),
    "diff_use_fixed_noise": (None, "never used by the reference"),
    "train_optimizer_args": (None, "use train_optimizer_settings"),
    "gradient_accumulation_steps": (None, "not supported; raise train_batch_size"),
    "train_repeat": (None, "use image_num_multiply"),
    "logging_use_wandb": (None, "not supported; use logging_save_csv"),
    "logging_use_tensorboard": (None, "not supported; use logging_save_csv"),
    "logging_dir": (None, "logs go to logs/<date>/"),
    "train_use_bucket": (None, "buckets are always used"),
    "gen_noise_scheduler": (None, "not used in training"),
    "lora_train_targets": (None, "use network_blocks(BASE = TextEncoder)"),
    # kohya sd-scripts names of settings we have under the reference's names
    "min_snr_gamma": ("train_snr_gamma", "kohya's name"),
    "min_timestep": ("train_min_timesteps", "kohya's name"),
    "max_timestep": ("train_max_timesteps", "kohya's name"),
    "max_train_epochs": ("train_epochs", "kohya's name"),
    "max_train_steps": ("train_iterations", "kohya's name"),
    "save_every_n_steps": ("save_per_steps", "kohya's name"),
}

_PARSE_ERRORS = (ValueError, TypeError, OverflowError, SyntaxError, MemoryError, RecursionError)


# ---------------------------------------------------------------- kwargs text


def _split_segments(text: str) -> list[str]:
    """Split on newlines and on ';' outside quotes (so name='a;b' survives)."""
    segments, current, quote, escaped = [], [], "", False
    for ch in text:
        if quote:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch in ";\n\r":
            segments.append("".join(current))
            current = []
        else:
            current.append(ch)
    segments.append("".join(current))
    return [s.strip() for s in segments if s.strip()]


def parse_kwargs(text: str, key: str) -> dict[str, Any]:
    """Parse ``name=value`` lines (or ``;``-separated pairs) with Python literal values.

    Args:
        text: e.g. ``"weight_decay=0.01; betas=(0.9, 0.99)"``.
        key: the settings key, for error messages.

    Returns:
        The names mapped to their literal values.

    Raises:
        SettingsError: a segment lacks ``=``, a name is not an identifier or given twice, or a value is not
            a Python literal (values are read with ``ast.literal_eval``, never evaluated).
    """
    if not isinstance(text, str):
        raise SettingsError(key, f"expected text of name=value lines, got {type(text).__name__}")
    result: dict[str, Any] = {}
    for seg in _split_segments(text):
        name, sep, value = seg.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier():
            raise SettingsError(key, f"line '{seg}' is not name=value; write e.g. weight_decay=0.01")
        if name in result:
            raise SettingsError(key, f"'{name}' is given twice; keep one line for it")
        try:
            result[name] = ast.literal_eval(value)
        except _PARSE_ERRORS as err:
            raise SettingsError(
                key, f"line '{seg}': '{value}' is not a Python literal; quote strings: {name}='x'"
            ) from err
    return result


def _kwargs_text(value: Mapping) -> str:
    return "\n".join(f"{k}={v!r}" for k, v in value.items())


# ---------------------------------------------------------------- coercion (raw -> canonical raw, typed)


def _bad(f: Field, value: Any, what: str) -> SettingsError:
    return SettingsError(f.key, f"{value!r} is not {what}")


def _to_bool(f: Field, value: Any) -> tuple[bool, bool]:
    # The reference did bool("false") == True for hand-edited JSON; words are read by meaning here.
    if value is None or isinstance(value, bool):
        return bool(value), bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value), bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        flag = value.strip().lower() in _TRUE
        return flag, flag
    raise _bad(f, value, "true or false; tick or untick the box (true/false)")


def _to_number(f: Field, value: Any, kind: type) -> float | int:
    if isinstance(value, bool) or value is None or isinstance(value, (list, tuple, dict)):
        raise _bad(f, value, f"a number; type e.g. {f.default!s}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except _PARSE_ERRORS as err:
        raise _bad(f, value, f"a number; type e.g. {f.default!s}") from err
    if not math.isfinite(number):
        raise _bad(f, value, f"a finite number; type e.g. {f.default!s}")
    if kind is int:
        if number != int(number):
            raise _bad(f, value, f"a whole number; type e.g. {f.default!s}")
        if isinstance(value, int):
            return value
        return int(value.strip()) if isinstance(value, str) and value.strip().lstrip("+-").isdigit() else int(number)
    return number


def _to_text(f: Field, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _bad(f, value, "text")


def _to_choice(f: Field, value: Any) -> str:
    text = _to_text(f, value).strip()
    text = _PRECISION_ALIASES.get(text.lower(), text) if f.choices is not OPTIMIZERS else text
    for choice in f.choices:
        if isinstance(choice, str) and choice.lower() == text.lower():
            return choice  # canonical spelling: 'adamw' -> 'AdamW' keeps old presets loadable
    return text  # left to validate(), which lists the choices for the relevant mode only


def _to_size(f: Field, value: Any) -> tuple[str, tuple[int, int]]:
    if isinstance(value, (list, tuple)):
        parts = list(value)
    elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
        parts = [p for p in str(value).replace("x", ",").split(",")]
    else:
        raise _bad(f, value, "a size; type 512 or 768,512 (height,width)")
    if not 1 <= len(parts) <= 2:
        raise _bad(f, value, "a size; type 512 or 768,512 (height,width)")
    nums = tuple(_to_number(f, p, int) for p in parts)
    height, width = (nums[0], nums[0]) if len(nums) == 1 else nums
    return (str(height) if height == width else f"{height},{width}"), (height, width)


def _to_blocks(f: Field, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", ",").split(",") if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _bad(f, value, "a list of block IDs such as ['BASE', 'IN01', 'M00']")
    unknown = [v for v in value if v.strip().upper() not in BLOCK_IDS]
    if unknown:
        raise SettingsError(f.key, f"unknown block {unknown[0]!r}; choose from {', '.join(BLOCK_IDS)}")
    chosen = {v.strip().upper() for v in value}
    return [b for b in BLOCK_IDS if b in chosen]


_LR_KEYS = frozenset({"train_learning_rate", "train_textencoder_learning_rate"})
_SIZE_KEY = "image_size(height, width)"
_BLOCKS_KEY = "network_blocks(BASE = TextEncoder)"


def _coerce(f: Field, value: Any) -> tuple[Any, Any]:
    """Return (canonical raw value, typed value) or raise SettingsError naming the key."""
    if f.type is bool:
        return _to_bool(f, value)
    if f.key == _SIZE_KEY:
        return _to_size(f, value)
    if f.key == _BLOCKS_KEY:
        blocks = _to_blocks(f, value)
        return blocks, tuple(blocks)
    if f.type is dict:
        text = _kwargs_text(value) if isinstance(value, Mapping) else _to_text(f, value)
        return text, parse_kwargs(text, f.key)
    if f.key in _LR_KEYS:  # kept as text so "1e-4" is not rewritten as 0.0001
        text = _to_text(f, value).strip()
        if f.key == "train_textencoder_learning_rate" and text == "":
            return "", None
        number = _to_number(f, text, float)
        if f.key == "train_textencoder_learning_rate" and number == 0:
            return text, None  # reference: 0 means "same as the U-Net rate"
        return text, number
    if f.type in (int, float):
        number = _to_number(f, value, f.type)
        return number, number
    if f.choices:
        text = _to_choice(f, value)
        if f.key == "network_element" and text == "":
            text = "Full"  # reference default is empty, shown and treated as Full
        if f.key == "mode" and text not in MODES:
            raise SettingsError("mode", f"unknown mode {text!r}; choose one of {', '.join(MODES)}")
        return text, text
    text = _to_text(f, value)
    if f.key in ("vae", "te") and text.strip() == "None":
        text = ""  # reference presets write "None" for "no separate VAE / text encoder"
    return text, text


def _typed_extra(raw: Mapping[str, Any], values: dict[str, Any]) -> None:
    """Derived conveniences computed once (the raw value is unchanged)."""
    values["save_lora_name"] = raw["save_lora_name"].strip() or "untitled"


# ---------------------------------------------------------------- key resolution


def _close(name: str) -> str:
    known = list(dict.fromkeys([*FIELD_BY_KEY, *FIELD_BY_ATTR]))  # most keys are their own attribute name
    matches = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"did you mean {', '.join(matches)}?" if matches else "see the settings table (settings_markdown())"


def resolve_key(name: str) -> str:
    """Map an exact key or an attribute name to the exact key.

    Raises:
        SettingsError: the name is neither, with close matches.
    """
    if name in FIELD_BY_KEY:
        return name
    if name in FIELD_BY_ATTR:
        return FIELD_BY_ATTR[name].key
    if name in LEGACY_KEYS and LEGACY_KEYS[name][0]:
        return LEGACY_KEYS[name][0]
    raise SettingsError(name, f"unknown setting; {_close(name)}")


def _is_empty(value: Any) -> bool:
    return value in (None, "", "None", False) or value == []


def _normalize_json(d: Mapping[str, Any], warnings: list[str], where: str = "") -> dict[str, Any]:
    """Rename legacy keys and drop unknown ones, collecting one warning each."""
    out: dict[str, Any] = {}
    for name, value in d.items():
        if name == PASS2_KEY and not where:
            if isinstance(value, Mapping) and value:
                out[PASS2_KEY] = _normalize_json(value, warnings, f"{PASS2_KEY}: ")
            elif not (value is None or isinstance(value, Mapping)):
                raise SettingsError(PASS2_KEY, f"expected an object or null, got {type(value).__name__}")
        elif name in LEGACY_KEYS:
            new, why = LEGACY_KEYS[name]
            if new:
                out[new] = value
                warnings.append(f"{where}{name}: renamed to {new} ({why})")
            elif not _is_empty(value):
                warnings.append(f"{where}{name}: ignored ({why})")
        elif isinstance(name, str) and (name in FIELD_BY_KEY or name in FIELD_BY_ATTR):
            out[resolve_key(name)] = value
        else:
            warnings.append(f"{where}{name}: unknown setting, ignored; {_close(str(name))}")
    return out


# ---------------------------------------------------------------- the value


class Settings:
    """One immutable set of settings: typed attribute access plus the raw JSON form.

    Build with :meth:`from_layers` or :meth:`from_json_dict`. ``s.network_rank`` is an int,
    ``s.image_size`` a ``(height, width)`` tuple, ``s.train_optimizer_settings`` a dict, ``s.pass2`` the
    Difference pass-2 values (or None). ``s.raw`` is the reference JSON form of every key.
    """

    __slots__ = ("_raw", "_values", "pass2")

    def __init__(self, raw: Mapping[str, Any], pass2: Settings | None = None) -> None:
        """Coerce a complete or partial raw mapping (missing keys take defaults).

        Raises:
            SettingsError: a value cannot be coerced to its field's type.
        """
        merged = {f.key: f.default for f in FIELDS}
        merged.update({resolve_key(k): v for k, v in raw.items()})
        canon, values = {}, {}
        for f in FIELDS:
            canon[f.key], values[f.attr] = _coerce(f, merged[f.key])
        _typed_extra(canon, values)
        object.__setattr__(self, "_raw", canon)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "pass2", pass2)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Settings has no setting {name!r}; {_close(name)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings is immutable; use settings.replace(...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and self._raw == other._raw and self.pass2 == other.pass2

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._raw.items() if v != Settings._defaults_raw().get(k)}
        return f"Settings({changed!r}, pass2={'set' if self.pass2 else None})"

    def __reduce__(self) -> tuple:
        return (Settings, (self._raw, self.pass2))

    @staticmethod
    def _defaults_raw() -> dict[str, Any]:
        return {f.key: f.default for f in FIELDS}

    @property
    def raw(self) -> dict[str, Any]:
        """Every key in reference JSON form (a copy)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._raw.items()}

    @classmethod
    def from_layers(cls, *layers: Mapping[str, Any]) -> Settings:
        """Build settings from defaults, then each layer in order (later layers win).

        Args:
            *layers: mappings by exact key or attribute name; values raw (strings from textboxes are fine)
                or typed. A ``"2nd pass"`` mapping holds pass-2 values layered on top of pass 1; ``None``
                clears it.

        Returns:
            The settings.

        Raises:
            SettingsError: an unknown key or a value that cannot be coerced (nothing falls back).
        """
        raw: dict[str, Any] = {}
        pass2_layers: list[Mapping[str, Any]] | None = None
        for layer in layers:
            for name, value in layer.items():
                if name == PASS2_KEY:
                    if value is not None and not isinstance(value, Mapping):
                        raise SettingsError(PASS2_KEY, "expected a mapping of pass-2 values or None")
                    pass2_layers = None if value is None else [*(pass2_layers or []), value]
                else:
                    raw[resolve_key(name)] = value
        first = cls(raw)
        if pass2_layers is None:
            return first
        return cls(first._raw, first._pass2_from(pass2_layers))

    def _pass2_from(self, layers: Iterable[Mapping[str, Any]]) -> Settings:
        raw = dict(self._raw)
        for layer in layers:
            for name, value in layer.items():
                key = resolve_key(name)
                if FIELD_BY_KEY[key].section != "job":
                    raw[key] = value
        try:
            return Settings(raw)
        except SettingsError as err:
            raise SettingsError(f"{PASS2_KEY}.{err.key}", err.message) from err

    def replace(self, **attrs: Any) -> Settings:
        """Return a copy with some values changed (by attribute name; ``pass2=`` sets the pass-2 settings).

        Raises:
            SettingsError: unknown name or bad value.
        """
        pass2 = attrs.pop("pass2", self.pass2)
        raw = dict(self._raw)
        raw.update({resolve_key(k): v for k, v in attrs.items()})
        if isinstance(pass2, Mapping):
            return Settings(raw, Settings(raw)._pass2_from([pass2]))
        return Settings(raw, pass2)

    def for_pass(self, n: int) -> Settings:
        """Settings for Difference pass ``n``.

        Pass 2 takes the pass-2 values of the pass-2-overridable fields only, and only when
        ``use_2nd_pass_settings`` is ticked in the pass-2 values; otherwise pass 1 is reused unchanged.
        """
        if n not in (1, 2):
            raise ValueError(f"pass must be 1 or 2, got {n}")
        if n == 1 or self.pass2 is None or not self.pass2.use_2nd_pass_settings:
            return self
        raw = dict(self._raw)
        raw.update({f.key: self.pass2._raw[f.key] for f in FIELDS if f.pass2})
        return Settings(raw)

    def to_json_dict(self) -> dict[str, Any]:
        """The reference export layout: settings keys in table order, ``2nd pass`` (Difference only), then
        ``mode``, ``model``, ``vae``, ``te``, ``original prompt``, ``target prompt``."""
        raw = self.raw
        out = {f.key: raw[f.key] for f in FIELDS if f.section != "job"}
        if self.mode == "Difference":
            raw2 = None if self.pass2 is None else self.pass2.raw
            out[PASS2_KEY] = None if raw2 is None else {f.key: raw2[f.key] for f in FIELDS if f.section != "job"}
        out.update({k: raw[k] for k in _JSON_JOB_KEYS})
        return out

    def to_json(self) -> str:
        """:meth:`to_json_dict` as 4-space indented JSON text (as the reference writes it)."""
        return json.dumps(self.to_json_dict(), indent=4, ensure_ascii=False) + "\n"

    @classmethod
    def from_json_dict(cls, d: Mapping[str, Any]) -> tuple[Settings, list[str]]:
        """Load a preset or snapshot (ours or the reference product's, unchanged).

        Missing keys take defaults; legacy keys are renamed or dropped and unknown keys ignored, one
        warning each; optimizer names match case-insensitively; ``"2nd pass"`` nesting is read.

        Returns:
            The settings and the warnings.

        Raises:
            SettingsError: a value cannot be coerced.
        """
        if not isinstance(d, Mapping):
            raise SettingsError("json", f"expected a JSON object of settings, got {type(d).__name__}")
        warnings: list[str] = []
        return cls.from_layers(_normalize_json(d, warnings)), warnings


# ---------------------------------------------------------------- validation


def _check(errors: list[SettingsError], ok: bool, key: str, message: str) -> None:
    if not ok:
        errors.append(SettingsError(key, message))


def _check_choices(s: Settings, errors: list[SettingsError]) -> None:
    for f in FIELDS:
        if f.widget != "dropdown" or not f.choices or not isinstance(f.choices[0], str) or s.mode not in f.modes:
            continue
        value = s.raw[f.key]
        if f.key == "train_optimizer" and value == SEPARATOR:
            errors.append(SettingsError(f.key, "the separator line was chosen; choose a real optimizer, not the "
                                               "separator line"))
        elif value not in f.choices:
            legal = ", ".join(c for c in f.choices if c != SEPARATOR)
            errors.append(SettingsError(f.key, f"unknown {value!r}; choose one of {legal}"))


def _check_ranges(s: Settings, errors: list[SettingsError]) -> None:
    """Every number against its table range, in the modes where the field has an effect."""
    for f in FIELDS:
        if f.minimum is None and f.maximum is None or s.mode not in f.modes:
            continue
        value = getattr(s, f.attr)
        if value is not None and f.out_of_range(value):
            hint = f.range_hint or f"use e.g. {f.default}"
            errors.append(SettingsError(f.key, f"{_num(value)} is outside {f.range_text}; {hint}"))


def _check_numbers(s: Settings, errors: list[SettingsError]) -> None:
    """What a single range cannot say: relations between fields and per-mode meanings."""
    te_lr = s.train_textencoder_learning_rate
    if s.mode == "LoRA" and te_lr is not None:
        _check(errors, te_lr > 0, "train_textencoder_learning_rate", "must be > 0; leave empty for the U-Net rate")
    lo, hi = s.train_min_timesteps, s.train_max_timesteps
    _check(errors, lo < hi, "train_min_timesteps", f"{lo} is not below train_max_timesteps {hi}; lower it")
    # DoRA renormalises the magnitude, so a strength cannot be baked into its file (the save would fail)
    _check(errors, s.network_type != "dora" or s.network_strength == 1, "network_strength",
           f"{s.network_strength:g} cannot be baked into a dora file; use 1 and set the LoRA weight in the prompt")


def _check_images(s: Settings, errors: list[SettingsError]) -> None:
    key = _SIZE_KEY
    if s.mode in FIELD_BY_KEY[key].modes:
        bad = [n for n in s.image_size if n <= 0 or n % 8 or n > MAX_IMAGE_PX]
        _check(errors, not bad, key, f"{bad[0] if bad else ''} is not a multiple of 8 in 8-{MAX_IMAGE_PX}; "
                                     "use e.g. 512 or 768,512")
    if s.mode in ("LoRA", "Multi-ADDifT"):
        step, small, large = s.image_buckets_step, min(s.image_size), max(s.image_size)
        _check(errors, 0 < step <= small, "image_buckets_step",
               f"{step} must be > 0 and <= the smaller image side {small}; use e.g. 64")
        _check(errors, 0 < s.image_min_length <= large, "image_min_length",
               f"{s.image_min_length} must be > 0 and <= the larger image side {large}; lower it")


def _check_practice(s: Settings, errors: list[SettingsError]) -> None:
    """The kohya-style controls: counts, rates, the reg folder and the preview prompts."""
    from pathlib import Path

    if s.mode in FIELD_BY_KEY["train_epochs"].modes:
        _check(errors, bool(s.caption_separator), "caption_separator", "is empty; use ',' (the tag separator)")
    if s.mode in FIELD_BY_KEY["reg_data_directory"].modes and s.reg_data_directory.strip():
        reg = Path(s.reg_data_directory.strip()).expanduser()
        _check(errors, reg.is_dir(), "reg_data_directory",
               f"folder {reg} does not exist; give the folder of regularization images or leave it empty")
    if s.sample_every_n_steps > 0 and s.sample_prompts.strip():
        from trainer.sampling.prompts import parse_sample_prompts

        try:
            parse_sample_prompts(s.sample_prompts)
        except SettingsError as err:
            errors.append(err)


def _check_inputs(s: Settings, errors: list[SettingsError]) -> None:
    try:
        safe_name(s.save_lora_name, "save_lora_name")
    except SettingsError as err:
        errors.append(err)
    if s.mode in ("LoRA", "Multi-ADDifT"):
        _check(errors, bool(s.lora_data_directory.strip()), "lora_data_directory",
               f"is empty; {s.mode} trains on a folder of images: give its path")
    if s.mode == "Multi-ADDifT":
        _check(errors, bool(s.diff_target_name.strip()), "diff_target_name",
               "is empty; give the suffix that names target images, e.g. _after")
    if s.mode == "iLECO":
        _check(errors, bool(s.original_prompt.strip()), "original prompt",
               "is empty; iLECO needs the concept to change, e.g. 'red hair'")
    if s.mode in ("Difference", "ADDifT"):
        for key in ("original image", "target image"):
            _check(errors, bool(s.raw[key].strip()), key, f"is missing; {s.mode} needs an original and a target image")
    _check(errors, bool(s.network_blocks), _BLOCKS_KEY, "no block selected; tick at least one block")


def validate(s: Settings) -> list[SettingsError]:
    """Check everything relevant to ``s.mode`` before any model is touched; report all problems at once.

    Args:
        s: the settings of one job (Difference pass 2 is checked too when its settings are in use).

    Returns:
        One :class:`SettingsError` per problem (empty when the settings are usable). Messages read
        ``<key>: <problem>; <fix>``.
    """
    errors: list[SettingsError] = []
    _check_choices(s, errors)
    _check_ranges(s, errors)
    _check_numbers(s, errors)
    _check_images(s, errors)
    _check_practice(s, errors)
    _check_inputs(s, errors)
    if s.mode == "Difference" and s.for_pass(2) is not s:
        seen = {str(e) for e in errors}
        for err in validate(s.for_pass(2)):
            if str(err) not in seen:
                errors.append(SettingsError(f"{PASS2_KEY}.{err.key}", err.message))
    return errors


# ---------------------------------------------------------------- table helpers


def fields_for(mode: str | None, section: str | None = None) -> tuple[Field, ...]:
    """Fields that apply to ``mode`` (any mode when None), optionally of one section, in table order.

    Raises:
        SettingsError: unknown mode or section.
    """
    if mode is not None and mode not in MODES:
        raise SettingsError("mode", f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if section is not None and section not in SECTIONS:
        raise SettingsError("section", f"unknown section {section!r}; choose one of {', '.join(SECTIONS)}")
    return tuple(f for f in FIELDS if (mode is None or mode in f.modes) and (section is None or f.section == section))


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_markdown() -> str:
    """The README's settings table (key, default, choices, modes, help), generated from :data:`FIELDS`."""
    rows = ["| key | default | choices | modes | help |", "|---|---|---|---|---|"]
    for f in FIELDS:
        choices = ", ".join(str(c) for c in f.choices if c != SEPARATOR)
        if f.range_text:
            choices = f"{choices} (range {f.range_text})" if choices else f"range {f.range_text}"
        if f.key == _BLOCKS_KEY:
            choices, default = "BASE, IN00-IN11, M00, OUT00-OUT11", "all"
        else:
            default = json.dumps(f.default)
        modes = "all" if f.modes == _ALL else ", ".join(m for m in MODES if m in f.modes)
        modes += " (+pass 2)" if f.pass2 and f.section != "pass2" else ""
        rows.append(f"| `{_md(f.key)}` | {_md(default)} | {_md(choices)} | {modes} | {_md(f.help)} |")
    return "\n".join(rows) + "\n"


def parse_set_args(items: list[str]) -> dict[str, Any]:
    """Parse CLI ``--set KEY=VALUE`` items into a layer for :meth:`Settings.from_layers`.

    Args:
        items: e.g. ``["network_rank=8", "image_size(height, width)=768,512", "2nd pass.train_iterations=200"]``.
            Keys are exact reference keys or attribute names; a ``2nd pass.`` (or ``pass2.``) prefix sets a
            Difference pass-2 value. Values stay text and are coerced by ``from_layers``.

    Returns:
        A mapping by exact key (pass-2 values under ``"2nd pass"``).

    Raises:
        SettingsError: an item without ``=`` or an unknown key (close matches listed).
    """
    layer: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if "(" in name and ")" not in name and ")" in item:
            # a key such as 'network_blocks(BASE = TextEncoder)' holds '=' itself: split after its ')'
            close = item.index(")") + 1
            head, sep, value = item[close:].partition("=")
            name = item[:close] if not head.strip() else name
        name = name.strip()
        if not sep or not name:
            raise SettingsError(name or item, f"'{item}' is not KEY=VALUE; write e.g. --set network_rank=8")
        for prefix in (PASS2_KEY + ".", "pass2."):
            if name.startswith(prefix):
                layer.setdefault(PASS2_KEY, {})[resolve_key(name[len(prefix):].strip())] = value
                break
        else:
            layer[resolve_key(name)] = value
    return layer
