"""The report card after every run: did the LoRA learn, did it stay local, is it healthy.

One definition, used by training (right before the final save) and by ``python -m trainer check``.
Everything is measured in latent space on the model itself, so it works on any model with no extra
download:

* **Efficacy**, per mode, on held-out noise (drawn from :data:`REPORT_SEED`, never from the job seed)
  at fixed timesteps spread over the run's range:
  - LoRA: the denoising loss on (up to two of) its own images at weight 1 against weight 0 (% lower);
  - iLECO: how much of the distance from the Original prompt's prediction to the base's Target
    prediction the LoRA closed (%);
  - Difference: how far weight 1 moves the denoised estimate of the Original along Original→Target,
    as a % of that difference; ADDifT / Multi-ADDifT: how much of the difference the mode trains
    (the frozen model's Original prediction minus its Target prediction, at the trained multiplier)
    weight 1 reproduces (%). For these three, weight −1 must move the other way (``reverse``; ADDifT only
    when it trained reverse steps, ``diff_alt_ratio`` > 0).
* **Specificity**: the drift of the prediction for neighbour prompts (a small built-in set, the
  user's ``report_neighbours``, and for LoRA the dataset captions without the trigger word) as a % of
  the move on the LoRA's own prompt. Lower is more local.
* **Health**: NaN/inf weights or outputs, a LoRA whose weight-1 and weight-0 outputs are identical,
  an exploded up/down norm.

The inputs are described by a small JSON :class:`Probe` stored in the file's metadata
(``traintrain_report_probe``), so ``check`` re-runs exactly the same measurement on the saved file.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPORT_SEED = 0x7E57_C0DE  # held-out noise: a fixed stream no training step draws from
PROBES = 4  # noise draws, each at its own timestep
BUILTIN_NEIGHBOURS = ("a photo of a dog on grass", "a city street at night", "a bowl of fruit on a table")
MAX_IMAGES = 8  # LoRA mode: own images measured (the draws are spread over them: the cost stays fixed)
MAX_PAIRS = 4  # Multi-ADDifT: pairs measured (4: the draws stay at PROBES, the cost of one pair but the VAE encodes)
IMAGE_DRAWS = 2 * PROBES  # LoRA mode: noise draws in all, spread over the images and the timesteps
MAX_CAPTION_NEIGHBOURS = 2
EXPLODED_NORM = 1e3  # a LoRA up/down tensor this large (Frobenius) is far outside any trained file
IDENTICAL = 1e-6  # relative output change below which weight 1 and weight 0 count as identical
# below FLOOR the run did not learn; below WEAK it learned a little (efficacy in %)
FLOOR = {"prompt": 5.0, "images": 0.5}
WEAK = {"prompt": 20.0, "images": 2.0}
# The pair modes (Difference, ADDifT, Multi-ADDifT) are judged by how much weight 1 changes the output
# (``change``, relative), not by the sign of their efficacy. Measured on tiny-sd1 (3 seeds each, probe on
# held-out noise): ADDifT defaults (30 steps, lr 1e-4) efficacy -0.005..+0.046 %, change 2.0e-3..2.2e-3;
# lr 1e-3: efficacy -0.12..+0.64 %, change 2.3e-2..2.6e-2; Multi-ADDifT (3 pairs, 30 steps) lr 1e-4:
# -0.006..+0.032 %, change 1.7e-3..2.2e-3, lr 1e-3: 0.007..0.29 %, change 1.8e-2..2.2e-2; Difference (40
# steps, lr 1e-2): efficacy -10..+5 %, weight -1 +0.3..+21 %, change 0.71..0.84. The same runs at lr 1e-12:
# change printed 0 in ADDifT/Multi-ADDifT, 1e-6 in Difference (the old rule, change < 1e-6, missed it). Efficacy takes either sign in normal runs (a tiny random model has no
# consistent Original->Target direction), so a floor on it would fail good runs; the change separates the
# two by > 4 orders of magnitude, and the floor sits 17x below the weakest normal run.
CHANGE_FLOOR = {"pair": 1e-4, "addift": 1e-4}
BLEED = 50.0  # neighbours moving more than this % of the target's move: the LoRA is not local
VERSION = "3"  # 2: LoRA draws spread over up to 8 images, Multi-ADDifT over up to 4 pairs; 3: ADDifT layout below
# ADDifT / Multi-ADDifT probe layout 3 (the card must cost < 5% of a default run, and ADDifT's is 30 steps):
# ADDifT on one draw (one timestep, the centre of its range; Multi-ADDifT keeps PROBES: its run is 100 steps),
# two built-in neighbours for ADDifT, each neighbour on one draw, weight −1 only when reverse steps were
# trained, one forward per multiplier (the reference rides in the weight-0 forward).
# Measured on small-sd1 (bench shape: 128 px, batch 2, CPU, 1 thread), ADDifT 30 steps; each card below on
# five held-out seeds (REPORT_SEED + 7919·k), min..max:
#   layout 2 (4 draws, 3 neighbours on every draw: 40 rows in 10 forwards): bench 15-20% of the run;
#     lr 1e-4 efficacy 0.57..0.64 %, reverse 0.50..0.57, neighbours 58..60 %, change 3.22e-2..3.34e-2;
#     lr 1e-3 efficacy 11.8..12.4 %, reverse -2.9..-2.4, neighbours 59..60 %, change 0.459..0.467
#   2 draws, 3 neighbours (14 rows): bench 5.1%; lr 1e-4 efficacy 0.67..0.71, change 3.05e-2..3.21e-2
#   1 draw, 3 neighbours (10 rows): bench 4.9-5.1%; neighbours 58..61 (lr 1e-4), 60..63 (lr 1e-3)
#   1 draw, 2 neighbours (8 rows, this layout): bench 4.5-4.6%; lr 1e-4 efficacy 0.67..0.75, reverse
#     0.61..0.68, neighbours 59..63, change 3.05e-2..3.27e-2; lr 1e-3 efficacy 13.0..14.0, reverse -3.0..-2.3,
#     neighbours 61..65, change 0.420..0.449; lr 1e-12: change 0 on every seed.
# One draw moves the change by 7% across seeds against a 300x margin over CHANGE_FLOOR; efficacy keeps its
# size (~10% higher: timestep 750 alone instead of four) and reverse its sign. The three built-in neighbours
# drift alike here (per neighbour 54..66 %), so the third adds least (the card's neighbours: 60 -> 62 %).
# At ADDifT's default batch 1 (bench --batch 1) that layout cost 6.9% of the run: one built-in neighbour
# (6 rows) 5.8%; the reference in the weight-0 forward (3 forwards) 5.6%: a LoRA that changes nothing then
# shows a change below IDENTICAL, not exactly 0 (another batch size rounds differently), and is still
# 'did not learn' by CHANGE_FLOOR. Tried and dropped: all rows in one forward with a multiplier per row
# (0.451 vs 0.454 s: on a CPU the card costs ~0.06 s a row plus ~0.15 s of VAE encode, weight reload and
# health; 6 rows is the least that measures efficacy, reverse and one neighbour).
DRAWS = {"ADDifT": 1}  # timesteps (noise draws) per mode; others PROBES
# built-in neighbours per mode; others all (a user's list is always measured whole). ADDifT none: its sliders
# (style, action) are meant to move every prompt, so stock neighbours say little, and its 30-step run
# leaves the card 4 rows (4.2-4.3% of a batch-1 run, bench; 6 rows with one neighbour cost 5.6%)
BUILTIN = {"ADDifT": 0}
LAYOUT = 3  # probes stored before layout 3 (no ``layout`` key) are measured the old way: check gives their numbers


@dataclass
class Probe:
    """What the card measures on: enough to re-run it from the file alone.

    Attributes:
        kind: ``prompt`` (iLECO, or a file from elsewhere), ``images`` (LoRA), ``pair`` (Difference:
            denoised-estimate space) or ``addift`` (ADDifT / Multi-ADDifT: prediction space).
        mode: the training mode (for the words).
        size: (height, width) in pixels of the probe latents / images.
        timesteps: one per noise draw.
        prompt: the LoRA's own prompt (iLECO Original; the conditioning of the pair modes).
        target: iLECO Target prompt; ADDifT: the Original branch's prompt.
        images: image files (LoRA: own images; pair modes: Original, Target, and Multi-ADDifT's further
            pairs in the same order).
        captions: LoRA: one per image; Multi-ADDifT: one per image of the pairs (each pair's own prompts).
        neighbours: prompts the LoRA should leave alone.
        scale: the multiplier the pair modes train at (ADDifT 0.25); efficacy is per that multiplier.
        lr, steps, fixed_noise: what the verdict's advice refers to.
        reverse: measure weight −1 (ADDifT: only when it trained reverse steps, ``diff_alt_ratio`` > 0).
        layout: how the draws are laid out (:data:`LAYOUT`; 2 for files written before it).
    """

    kind: str
    mode: str
    size: tuple[int, int]
    timesteps: list[int]
    prompt: str = ""
    target: str = ""
    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    scale: float = 1.0
    lr: float | None = None
    steps: int | None = None
    fixed_noise: bool | None = None
    reverse: bool = True
    layout: int = LAYOUT

    def to_json(self) -> str:
        """For the file's metadata: images as ``<folder name>/<file name>``, never the user's absolute
        paths (a shared LoRA must not leak them; issue 16). :meth:`from_json` finds them again."""
        raw = asdict(self)
        raw["images"] = [f"{Path(p).parent.name}/{Path(p).name}" for p in self.images]
        return json.dumps(raw, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, roots: tuple[str | Path, ...] = ()) -> Probe:
        """Read a stored probe; each ``folder/file`` image is looked up under ``roots`` (as
        ``root/folder/file``, ``root/file``), then the working folder. One not found keeps its stored
        name, and measuring it raises the usual InputError (efficacy unknown)."""
        raw = json.loads(text)
        raw["size"] = tuple(raw["size"])
        raw.setdefault("layout", 2)
        raw["images"] = [_find_image(name, roots) for name in raw.get("images", [])]
        return cls(**{k: v for k, v in raw.items() if k in cls.__dataclass_fields__})


def _find_image(stored: str, roots: tuple[str | Path, ...]) -> str:
    path = Path(stored)
    if path.is_absolute():  # files written before names replaced paths
        return stored
    for root in (*roots, Path.cwd()):
        for candidate in (Path(root) / path, Path(root) / path.name):
            if candidate.is_file():
                return str(candidate)
    return stored


def run_probe(s, kind: str, **fields: Any) -> Probe:
    """A probe with the run's size, timestep range and the numbers the verdict's advice quotes."""
    fields.setdefault("size", tuple(int(v) for v in s.image_size))
    count = DRAWS.get(s.mode, PROBES) if kind == "addift" else PROBES
    return Probe(kind=kind, mode=s.mode, timesteps=probe_timesteps(int(s.train_min_timesteps), int(s.train_max_timesteps), count),
                 lr=float(s.train_learning_rate), steps=int(s.train_iterations), **fields)


def probe_timesteps(lo: int, hi: int, count: int = PROBES) -> list[int]:
    """``count`` timesteps at the centres of equal slices of [lo, hi): fixed, so every run is comparable."""
    return [min(int(lo + (hi - lo) * (k + 0.5) / count), 999) for k in range(count)]


def neighbour_prompts(user: str, exclude: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                      builtin: int | None = None) -> list[str]:
    """The user's neighbours (one per line) or the first ``builtin`` (default all) of the built-in set, then
    ``extra``; own prompts left out."""
    listed = [line.strip() for line in (user or "").splitlines() if line.strip()]
    own = {p.strip().lower() for p in exclude}
    out = [p for p in dict.fromkeys([*(listed or BUILTIN_NEIGHBOURS[:builtin]), *extra]) if p.strip().lower() not in own]
    return out


def caption_neighbours(captions: list[str], trigger: str) -> tuple[str, ...]:
    """LoRA: dataset captions that do not contain the trigger word (what the LoRA should not change)."""
    if not trigger.strip():
        return ()
    word = trigger.strip().lower()
    return tuple(dict.fromkeys(c for c in captions if word not in c.lower()))[:MAX_CAPTION_NEIGHBOURS]


# -- the card --------------------------------------------------------------------------------------


@dataclass
class Card:
    """The measured numbers and the words (JSON-ready through :meth:`to_dict`)."""

    kind: str
    mode: str
    efficacy: float | None
    specificity: float | None
    reverse: float | None
    change: float
    max_norm: float
    health: list[str]
    failed: bool
    learned: bool
    verdict: str
    neighbours: int
    seconds: float = 0.0
    dtype: str = "fp32"  # the model precision measured in: check loads the model in it to print the same numbers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """Three lines for the CLI: verdict; numbers; health."""
        what = EFFICACY_WORDS.get(self.kind, "")
        eff = "–" if self.efficacy is None else f"{self.efficacy:.1f}%"
        nums = f"efficacy {eff} ({what})" if what else f"efficacy {eff}"
        if self.reverse is not None:
            nums += f" · weight −1 {self.reverse:+.1f}%"
        if self.specificity is not None:
            nums += f" · neighbours {self.specificity:.1f}% of its move ({self.neighbours} prompts)"
        health = "; ".join(self.health) if self.health else f"ok (largest up/down norm {self.max_norm:.3g})"
        return [f"report: {self.verdict}", f"  {nums}", f"  health: {health}"]

    def metadata(self) -> dict[str, str]:
        """``traintrain_report_*`` keys for the saved file."""
        def num(x: float | None) -> str:
            return "none" if x is None else f"{x:.4g}"

        return {"traintrain_report_version": VERSION, "traintrain_report_efficacy": num(self.efficacy),
                "traintrain_report_specificity": num(self.specificity), "traintrain_report_reverse": num(self.reverse),
                "traintrain_report_learned": str(self.learned).lower(), "traintrain_report_verdict": self.verdict,
                "traintrain_report_health": "; ".join(self.health) or "ok", "traintrain_report_dtype": self.dtype}


EFFICACY_WORDS = {
    "prompt": "of the Original→Target gap closed",
    "images": "lower loss on its own images",
    "pair": "of Original→Target moved",
    "addift": "of the trained difference reproduced",
}


UNMEASURED = ("not measured: the model's prediction without the LoRA was NaN/inf on the probe (the host's "
              "conditioning or model, not this LoRA)")


def weight_health(state_dict: dict[str, torch.Tensor]) -> tuple[list[str], float]:
    """Non-finite or exploded tensors in the saved weights. Returns (problems, largest up/down norm)."""
    problems, largest, bad = [], 0.0, []
    for key, tensor in state_dict.items():
        if not torch.is_floating_point(tensor):
            continue
        t = tensor.float()
        if not bool(torch.isfinite(t).all()):
            bad.append(key)
            continue
        if key.partition(".")[2] not in ("alpha", "dora_scale"):  # the factor tensors (up/down, LyCORIS w1/w2…)
            largest = max(largest, float(t.norm()))
    if bad:
        problems.append(f"NaN/inf in {len(bad)} weight tensor(s), e.g. {bad[0]}")
    if largest > EXPLODED_NORM:
        problems.append(f"an up/down norm exploded ({largest:.3g})")
    return problems, largest


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def card_precision(bundle) -> tuple[str, contextlib.AbstractContextManager]:
    """(name, autocast) the card runs in: full precision on fp32 weights; on half weights autocast in their
    dtype, exactly as the run trained (``RunPrecision.autocast``). Upcasting a half model for the card would
    double its memory on the GPU, so instead ``check`` loads the model in the stored precision."""
    dtype = getattr(bundle, "dtype", torch.float32)
    if dtype in (torch.float16, torch.bfloat16):
        return DTYPE_NAMES[dtype], torch.autocast(bundle.device.type, dtype=dtype)
    return "fp32", contextlib.nullcontext()


@torch.no_grad()
def measure(bundle, network, probe: Probe, state_dict: dict[str, torch.Tensor]) -> Card:
    """Run the card's measurement on an attached network (the one saved, or loaded from the file), in
    :func:`card_precision` (the same for training and ``check`` on a model loaded in the same precision).

    Args:
        bundle: the model, adapters attached.
        network: varied over multipliers 0, 1 (and −1 for the pair modes).
        probe: what to measure on.
        state_dict: the tensors as saved (weight health).
    """
    started = time.perf_counter()
    problems, largest = weight_health(state_dict)
    was_training = network.training
    network.train(False)  # no adapter dropout in the measurement
    dtype_name, autocast = card_precision(bundle)
    try:
        with autocast:
            numbers = _MEASURES[probe.kind](bundle, network, probe)
    finally:
        network.train(was_training)
    efficacy, specificity, reverse, change, finite, base_finite = numbers
    broken_weights = any(p.startswith("NaN/inf in") for p in problems)
    if not base_finite:  # measured in a real Neo: NaN conditioning from the host after a <lora> generation
        problems.insert(0, UNMEASURED)
    elif not finite:
        problems.insert(0, "NaN/inf in the LoRA's output")
    # only the LoRA's own NaN makes it broken (and unsaved); a NaN the model gives without it is not its fault
    failed = broken_weights or (base_finite and not finite)
    identical = not failed and change < IDENTICAL
    if identical:
        problems.append("weight 1 and weight 0 give identical outputs: this LoRA changes nothing")
    card = Card(probe.kind, probe.mode, _clean(efficacy), _clean(specificity), _clean(reverse), change, largest,
                problems, failed, False, "", len(probe.neighbours))
    card.dtype = dtype_name
    card.learned, card.verdict = verdict(card, probe, identical)
    card.seconds = round(time.perf_counter() - started, 3)
    return card


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def verdict(card: Card, probe: Probe, identical: bool) -> tuple[bool, str]:
    """(learned, words): what happened and, when it did not learn, the likely cause and the setting."""
    if UNMEASURED in card.health and not card.failed:
        return False, UNMEASURED + "; the LoRA was saved, check it with python -m trainer check"
    if card.failed:
        return False, ("broken: the LoRA holds NaN/inf values (likely a learning rate too high or an fp16 "
                       "overflow); lower train_learning_rate or train in bf16/fp32")
    if card.max_norm > EXPLODED_NORM:
        return False, (f"broken: an up/down norm exploded ({card.max_norm:.3g}); lower train_learning_rate "
                       "or set train_max_grad_norm")
    low = card.efficacy is not None and card.efficacy < FLOOR.get(card.kind, -math.inf)
    still = card.change < CHANGE_FLOOR.get(card.kind, 0.0)
    if identical or low or still:
        what = ("weight 1 changes nothing" if identical else
                f"weight 1 changes the output by {100 * card.change:.3g}%" if still else f"efficacy {card.efficacy:.1f}%")
        return False, f"did not learn ({what}); {_cause(card, probe)}"
    words = "learned"
    if card.efficacy is None:  # a file with no stored probe (another trainer): only the change is known
        words = (f"changes the output by {100 * card.change:.1f}% (efficacy not measured: no TrainTrain probe "
                 "in this file)")
    elif card.kind in CHANGE_FLOOR:  # pair modes: learned by the change; the sign of efficacy is a warning
        if card.efficacy <= 0:
            words += (f"; on the probe weight 1 does not move towards the Target ({card.efficacy:.1f}%): "
                      f"{_cause(card, probe)}")
    elif card.efficacy < WEAK.get(card.kind, 0.0):
        words = f"learned weakly ({card.efficacy:.1f}%); {_cause(card, probe)}"
    if card.reverse is not None and card.reverse <= 0:
        words += "; weight −1 does not move the other way"
    if card.specificity is not None:
        words += f"; neighbours moved {card.specificity:.0f}% of the target's move"
        if card.specificity > BLEED:
            fix = "list prompts to keep in ileco_keep_prompts, or " if card.kind == "prompt" else ""
            words += f" (not local: {fix}lower train_learning_rate or network_rank, or train fewer network_blocks)"
    return True, words


def _cause(card: Card, probe: Probe) -> str:
    if probe.lr is not None and probe.lr <= 0:
        return "likely cause: train_learning_rate is 0; set it (typical 1e-4 LoRA, 1e-3 iLECO/ADDifT)"
    now = []
    if probe.lr is not None:
        now.append(f"train_learning_rate (now {probe.lr:g})")
    if probe.steps is not None:
        now.append(f"train_iterations (now {probe.steps})")
    advice = "likely cause: too few steps or too low a learning rate"
    advice += "; raise " + " or ".join(now) if now else " when it was trained"
    if card.kind == "prompt" and probe.fixed_noise:
        advice += ", or turn ileco_fixed_noise off (one noise latent does not carry over to other noise)"
    return advice


# -- measurements per kind -------------------------------------------------------------------------


def _noise(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(REPORT_SEED)  # CPU draws: the same numbers on every device
    return torch.randn(shape, generator=gen).to(device)


def _conds(bundle, network, prompts: list[str], multiplier: float):
    """Encodings at a multiplier (text-encoder adapters, when the LoRA has them, change them too)."""
    with network.scaled(multiplier):
        return bundle.encode_prompts(prompts)


def _text_adapters(network) -> bool:
    """Whether the network changes the text encoders (unknown network classes: assume it does)."""
    targets = getattr(network, "targets", None)
    return targets is None or any(getattr(t, "component", "") != "unet" for t in targets)


def _predict(bundle, network, x: torch.Tensor, t: torch.Tensor, cond, multiplier: float) -> torch.Tensor:
    with network.scaled(multiplier):
        return bundle.predict(x, t, cond.repeat(x.shape[0]) if cond.context.shape[0] == 1 else cond).float()


def _drift(bundle, network, x, t, neighbours: list[str], move: float) -> float | None:
    """RMS over neighbour prompts of ‖U₁ − U₀‖, as a % of the own prompt's move ``move``."""
    if not neighbours or move <= 0:
        return None
    c0, c1 = _conds(bundle, network, neighbours, 0.0), _conds(bundle, network, neighbours, 1.0)
    drifts = []
    for i in range(len(neighbours)):
        a = _predict(bundle, network, x, t, c0.select([i]), 0.0)
        b = _predict(bundle, network, x, t, c1.select([i]), 1.0)
        drifts.append(float((b - a).norm()) ** 2)
    return 100.0 * math.sqrt(sum(drifts) / len(drifts)) / move


def _spread(items: int, draws: int, slots: int = PROBES) -> tuple[list[int], list[int]]:
    """(item, timestep index) of each draw: items in turn, each item's draws on successive timesteps, so
    every item sees different timesteps and the cost is ``draws`` forward passes however many items."""
    return ([k % items for k in range(draws)], [(k % items + k // items) % slots for k in range(draws)])


def _latent_shape(bundle, probe: Probe) -> tuple[int, ...]:
    h, w = probe.size
    f = bundle.vae_scale_factor
    return (PROBES, getattr(bundle, "latent_channels", 4), max(h // f, 8), max(w // f, 8))


def _t(bundle, probe: Probe) -> torch.Tensor:
    return torch.tensor(probe.timesteps, dtype=torch.long, device=bundle.device)


def _measure_prompt(bundle, network, probe: Probe):
    x, t = _noise(_latent_shape(bundle, probe), bundle.device), _t(bundle, probe)
    own0, own1 = (_conds(bundle, network, [probe.prompt], m) for m in (0.0, 1.0))
    e0 = _predict(bundle, network, x, t, own0, 0.0)
    e1 = _predict(bundle, network, x, t, own1, 1.0)
    move = float((e1 - e0).norm())
    finite = bool(torch.isfinite(e1).all())
    base_finite = bool(torch.isfinite(e0).all())
    efficacy = None
    if probe.mode == "iLECO":
        e_t = _predict(bundle, network, x, t, _conds(bundle, network, [probe.target], 0.0), 0.0)
        gap = float((e0 - e_t).norm())
        efficacy = 100.0 * (1.0 - float((e1 - e_t).norm()) / gap) if gap > 0 else None
    spec = _drift(bundle, network, x, t, probe.neighbours, move)
    return efficacy, spec, None, move / max(float(e0.norm()), 1e-12), finite, base_finite


def load_latents(bundle, paths: list[str], size: tuple[int, int]) -> torch.Tensor:
    """The probe images, resized to cover ``size`` (h, w) and centre-cropped, encoded with a fixed draw.

    Raises:
        InputError: an image that is missing or unreadable.
    """
    import numpy as np
    from PIL import Image

    from trainer.errors import InputError

    h, w = size
    pixels = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                scale = max(w / img.width, h / img.height)
                if img.size != (w, h):
                    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                                     Image.Resampling.BICUBIC)
                    left, top = (img.width - w) // 2, (img.height - h) // 2
                    img = img.crop((left, top, left + w, top + h))
                pixels.append(np.asarray(img, dtype=np.float32))
        except OSError as err:
            raise InputError(str(path), f"the report card cannot read this image ({err})") from err
    batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1.0
    gen = torch.Generator().manual_seed(REPORT_SEED)
    return bundle.encode_images(batch.to(bundle.device), generator=gen).float()


def _noise_schedule(bundle):
    from trainer.modes.common import NoiseSchedule

    return NoiseSchedule(bundle.alphas_cumprod)


def _measure_images(bundle, network, probe: Probe):
    latents = load_latents(bundle, probe.images, probe.size)
    item, t_index = _spread(latents.shape[0], max(IMAGE_DRAWS, latents.shape[0]))
    x0 = latents[item]
    eps = _noise((len(item), *latents.shape[1:]), bundle.device)
    t = _t(bundle, probe)[t_index]
    schedule = _noise_schedule(bundle)
    noisy = schedule.add_noise(x0, eps, t)
    goal = schedule.v_target(x0, eps, t) if bundle.v_pred else eps
    caps = [probe.captions[i] for i in item]
    u0 = _predict(bundle, network, noisy, t, _conds(bundle, network, caps, 0.0), 0.0)
    u1 = _predict(bundle, network, noisy, t, _conds(bundle, network, caps, 1.0), 1.0)
    l0, l1 = float(((u0 - goal) ** 2).mean()), float(((u1 - goal) ** 2).mean())
    move = float((u1 - u0).norm())
    spec = _drift(bundle, network, noisy, t, probe.neighbours, move)
    efficacy = 100.0 * (l0 - l1) / l0 if l0 > 0 else None
    return (efficacy, spec, None, move / max(float(u0.norm()), 1e-12), bool(torch.isfinite(u1).all()),
            bool(torch.isfinite(u0).all()))


def _measure_pair(bundle, network, probe: Probe):
    from trainer.modes.inputs import denoised

    latents = load_latents(bundle, probe.images, probe.size)
    pairs = latents.shape[0] // 2  # Multi-ADDifT: every pair, the draws spread over them (same cost up to 4)
    pair, t_index = _spread(pairs, max(PROBES, pairs))
    x_o, x_t = latents[0::2][pair], latents[1::2][pair]
    eps = _noise((len(pair), *latents.shape[1:]), bundle.device)
    t, schedule = _t(bundle, probe)[t_index], _noise_schedule(bundle)
    a_o, a_t = schedule.add_noise(x_o, eps, t), schedule.add_noise(x_t, eps, t)
    # each pair's own prompts when the probe has them (Multi-ADDifT captions), else the run's two prompts
    own = [probe.captions[2 * k + 1] for k in pair] if len(probe.captions) == 2 * pairs else [probe.prompt]
    frozen = [probe.captions[2 * k] for k in pair] if len(probe.captions) == 2 * pairs else [probe.target]
    c = {m: _conds(bundle, network, own, m) for m in (0.0, 1.0, -1.0)}
    if probe.kind == "pair":  # Difference: the denoised estimate of the Original moves along x_t − x_o
        x, direction = a_o, (x_t - x_o)
        space = lambda u: denoised(schedule, x, u, t, bundle.v_pred)  # noqa: E731
    else:  # ADDifT: on the Target's noisy latent, weight +scale reproduces the frozen Original prediction
        x = a_t
        ref = _predict(bundle, network, a_o, t, _conds(bundle, network, frozen, 0.0), 0.0)
        space = lambda u: u  # noqa: E731
    u = {m: _predict(bundle, network, x, t, c[m], m) for m in (0.0, 1.0, -1.0)}
    if probe.kind != "pair":
        direction = ref - u[0.0]
    base, denom = space(u[0.0]), float((direction ** 2).sum())

    def moved(m: float) -> float | None:
        if denom <= 0:
            return None
        return 100.0 * probe.scale * float(((space(u[m]) - base) * direction).sum()) / denom

    move = float((u[1.0] - u[0.0]).norm())
    spec = _drift(bundle, network, x, t, probe.neighbours, move)
    rev = moved(-1.0)
    finite = bool(torch.isfinite(u[1.0]).all() and torch.isfinite(u[-1.0]).all())
    base_finite = bool(torch.isfinite(u[0.0]).all())
    return (moved(1.0), spec, None if rev is None else -rev, move / max(float(u[0.0].norm()), 1e-12), finite,
            base_finite)


def _measure_addift(bundle, network, probe: Probe):
    """ADDifT / Multi-ADDifT, layout 3: weight +scale on the Target's noisy latent should reproduce the frozen
    prediction on the Original's; each pair on its own draws, neighbour i on draw i mod draws, the own rows
    and the neighbours of one multiplier in one forward."""
    if probe.layout < 3:
        return _measure_pair(bundle, network, probe)
    latents = load_latents(bundle, probe.images, probe.size)
    pairs, slots = latents.shape[0] // 2, len(probe.timesteps)
    pair, t_index = _spread(pairs, max(slots, pairs), slots)
    draws, near = len(pair), [i % len(pair) for i in range(len(probe.neighbours))]
    eps = _noise((draws, *latents.shape[1:]), bundle.device)
    t, schedule = _t(bundle, probe)[t_index], _noise_schedule(bundle)
    a_o = schedule.add_noise(latents[0::2][pair], eps, t)
    a_t = schedule.add_noise(latents[1::2][pair], eps, t)
    per_pair = len(probe.captions) == 2 * pairs  # Multi-ADDifT: each pair's own prompts
    own = [probe.captions[2 * k + 1] for k in pair] if per_pair else [probe.prompt] * draws
    frozen = [probe.captions[2 * k] for k in pair] if per_pair else [probe.target] * draws
    prompts = list(dict.fromkeys([*own, *frozen, *probe.neighbours]))  # one encode: equal token lengths
    # forwards of (multiplier, rows (latent, draw, prompt)); the reference rides in the weight-0 batch (one
    # forward fewer), so weight 1's batch is smaller and rounds differently: a LoRA that changes nothing
    # shows a change of ~1e-7, under IDENTICAL and far under CHANGE_FLOOR
    mine = [(a_t[d], d, own[d]) for d in range(draws)]
    nbrs = [(a_t[d], d, p) for d, p in zip(near, probe.neighbours, strict=True)]
    calls = [(0.0, [(a_o[d], d, frozen[d]) for d in range(draws)] + mine + nbrs), (1.0, mine + nbrs)]
    if probe.reverse:
        calls.append((-1.0, mine))
    out, encoded = [], {}
    for m, batch in calls:
        key = m if _text_adapters(network) else 0.0  # UNet-only LoRA: one encoding serves every multiplier
        if key not in encoded:
            encoded[key] = _conds(bundle, network, prompts, m)
        cond = encoded[key].select([prompts.index(p) for _, _, p in batch])
        x = torch.stack([r[0] for r in batch])
        out.append(_predict(bundle, network, x, t[[r[1] for r in batch]], cond, m))
    ref, u0, nb0 = out[0].split([draws, draws, len(nbrs)])
    u1, nb1 = out[1].split([draws, len(nbrs)])
    direction = ref - u0
    denom = float((direction ** 2).sum())

    def moved(u: torch.Tensor) -> float | None:
        return 100.0 * probe.scale * float(((u - u0) * direction).sum()) / denom if denom > 0 else None

    step = (u1 - u0).flatten(1).norm(dim=1)  # the own move per draw
    move, spec = float(step.norm()), None
    own_there = float(step[near].norm()) if near else 0.0  # the own move on the neighbours' draws
    if near and move > 0 and own_there > 0:
        spec = 100.0 * float((nb1 - nb0).norm()) / own_there
    rev = moved(out[2]) if probe.reverse else None
    finite = bool(torch.isfinite(u1).all() and (not probe.reverse or torch.isfinite(out[2]).all()))
    return (moved(u1), spec, None if rev is None else -rev, move / max(float(u0.norm()), 1e-12), finite,
            bool(torch.isfinite(u0).all()))


_MEASURES = {"prompt": _measure_prompt, "images": _measure_images, "pair": _measure_pair, "addift": _measure_addift}


# -- training side ---------------------------------------------------------------------------------


@contextlib.contextmanager
def as_saved(network, state_dict: dict[str, torch.Tensor]):
    """Temporarily give ``network`` the weights exactly as saved (precision, strength), so the card
    describes the file, and ``check`` on that file measures the same numbers."""
    backup = {k: v.detach().clone() for k, v in network.state_dict().items()}
    report = getattr(network, "load_report", None)
    try:
        network.load_kohya_state_dict(state_dict)
        yield network
    finally:
        network.load_state_dict(backup)
        network.load_report = report


def measure_saved(ctx, network, probe: Probe, state_dict: dict[str, torch.Tensor],
                  isolate: contextlib.AbstractContextManager | None = None) -> Card:
    """The card of a finished run, on the weights as they will be saved; ``isolate`` sets other networks
    aside (Difference's copier is not in the file, so ``check`` measures without it too)."""
    with isolate or contextlib.nullcontext(), as_saved(network, state_dict):
        return measure(ctx.bundle, network, probe, state_dict)
