"""LR schedules by UI name (``train_lr_scheduler``), stepped once per optimizer step.

The seven diffusers names are our own ``LambdaLR`` factories with ``diffusers.optimization``
semantics (diffusers is not in the Web-UI; the tests use it as the oracle). The rest are torch
schedulers with the reference's defaults. ``reduce_on_plateau`` is fed an EMA of the loss (the
reference stepped it without a metric, so it never did anything), and ``one_cycle`` is never stepped
past its length (the reference raised at its last step, behavior §17 #3).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from trainer.errors import SettingsError
from trainer.optim import is_schedule_free

SCHEDULER_CHOICES: tuple[str, ...] = (
    "cosine_annealing", "cosine_annealing_with_restarts", "linear", "cosine", "cosine_with_restarts",
    "polynomial", "constant", "constant_with_warmup", "piecewise_constant", "exponential", "step",
    "multi_step", "reduce_on_plateau", "cyclic", "one_cycle",
)  # fmt: skip

_PLATEAU_EMA_DECAY = 0.9  # smooths per-step diffusion loss, which is too noisy to compare raw
_LAMBDA_KEYS = {"polynomial": ("lr_end",)}  # extra settings our LambdaLR factories take


class Schedule:
    """One LR schedule, stepped once per optimizer step.

    Args:
        optimizer: the optimizer whose groups are scheduled.
        scheduler: the torch scheduler, or None when the lr is fixed or managed by the optimizer.
        max_steps: stop stepping the scheduler after this many steps (one_cycle cannot go past its end).
        notes: warnings for the user, e.g. a scheduler that is replaced.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: object | None = None,
        *,
        max_steps: int | None = None,
        notes: list[str] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_steps = max_steps
        self.notes = notes or []
        self.num_steps = 0

    def step(self, loss: float | None = None) -> None:
        """Advance one optimizer step. ``loss`` is used only by reduce_on_plateau."""
        if self.scheduler is not None and (self.max_steps is None or self.num_steps < self.max_steps):
            self.scheduler.step()
        self.num_steps += 1

    def lrs(self) -> list[float]:
        """The lr each param group uses now (× the adapted step size ``d`` for Prodigy/D-Adaptation)."""
        return [float(g["lr"]) * float(g.get("d", 1.0)) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        """Everything needed to resume (the scheduler's own state plus our step count)."""
        inner = self.scheduler.state_dict() if self.scheduler is not None else None
        return {"num_steps": self.num_steps, "scheduler": inner}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.num_steps = int(state["num_steps"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class PlateauSchedule(Schedule):
    """ReduceLROnPlateau fed with an exponential moving average of the loss."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: object) -> None:
        super().__init__(optimizer, scheduler)
        self.ema_loss: float | None = None

    def step(self, loss: float | None = None) -> None:
        """Update the EMA and let the plateau test see it; a step without a loss only counts."""
        self.num_steps += 1
        if loss is None or not math.isfinite(loss):
            return
        loss = float(loss)
        d = _PLATEAU_EMA_DECAY
        self.ema_loss = loss if self.ema_loss is None else d * self.ema_loss + (1 - d) * loss
        self.scheduler.step(self.ema_loss)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ema_loss": self.ema_loss}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema_loss = state.get("ema_loss")


class ScheduleFreeSchedule(Schedule):
    """No scheduler: the optimizer warms up and averages by itself; report the lr it is using."""

    def lrs(self) -> list[float]:
        out = []
        for g in self.optimizer.param_groups:
            if "scheduled_lr" in g:  # the schedulefree package records it
                out.append(float(g["scheduled_lr"]))
                continue
            warmup, step = int(g.get("warmup_steps", 0) or 0), int(g.get("step", 0) or 0)
            out.append(float(g["lr"]) * (min(1.0, step / warmup) if warmup > 0 else 1.0))
        return out


class WarmupSchedule(Schedule):
    """Linear warmup in front of a torch scheduler, which has none of its own.

    Step ``s < warmup`` runs at ``s / warmup`` of the scheduler's starting lr (0 at step 0, as the diffusers
    schedules); from step ``warmup`` the scheduler runs from its own start over the remaining steps.
    """

    def __init__(self, inner: Schedule, warmup_steps: int) -> None:
        super().__init__(inner.optimizer, None, notes=inner.notes)
        self.inner, self.warmup = inner, int(warmup_steps)
        self.peak = [float(g["lr"]) for g in self.optimizer.param_groups]  # what the scheduler starts from
        self._scale(0)

    def _scale(self, step: int) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.peak, strict=True):
            group["lr"] = lr * min(1.0, step / self.warmup)

    def step(self, loss: float | None = None) -> None:
        self.num_steps += 1
        if self.num_steps <= self.warmup:
            self._scale(self.num_steps)  # the last warmup step restores the scheduler's own lr exactly
        else:
            self.inner.step(loss)

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "peak": self.peak, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps, self.peak = int(state["num_steps"]), [float(x) for x in state["peak"]]
        self.inner.load_state_dict(state["inner"])
        if self.num_steps <= self.warmup:
            self._scale(self.num_steps)


class AdafactorSchedule(Schedule):
    """Adafactor with relative_step picks its own step size; report it (initial lr before stepping)."""

    def lrs(self) -> list[float]:
        out = []
        for g in self.optimizer.param_groups:
            state = self.optimizer.state.get(g["params"][0], {})
            if state.get("step"):
                out.append(float(self.optimizer._get_lr(g, state)))
            else:
                out.append(float(g.get("initial_lr") or 0.0))
        return out


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    step_rules: str = "",
    settings: dict | None = None,
) -> Schedule:
    """Build the LR schedule named in the UI.

    Schedule-free optimizers and Adafactor with ``relative_step`` schedule themselves: they get a
    schedule that only reports their lr, and a note says the chosen scheduler is not used.

    Args:
        name: a ``train_lr_scheduler`` choice, matched case-insensitively.
        optimizer: the optimizer to schedule (or the ``OptimizerBundle`` holding it).
        total_steps: the exact number of optimizer steps the trainer will take (``train_iterations``).
        warmup_steps: linear warmup (negative → 0): built into the diffusers-style schedules, put in front
            of the torch schedulers (which then run over the remaining steps); constant and
            piecewise_constant have none (a note says so).
        num_cycles: hard restarts for cosine_with_restarts (≤ 0 → 1).
        power: polynomial power (≤ 0 → 1.0).
        step_rules: piecewise_constant rules such as ``1:100,0.1:200,0.01``.
        settings: extra keyword arguments parsed from ``train_lr_scheduler_settings``. Not mutated.

    Returns:
        A ``Schedule``.

    Raises:
        SettingsError: unknown name, unknown or rejected settings, bad step rules.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # an OptimizerBundle is accepted too
    key = name.strip().lower()
    if key not in _BUILDERS:
        raise SettingsError("train_lr_scheduler", f"unknown '{name}'; choose one of {', '.join(SCHEDULER_CHOICES)}")
    kwargs = dict(settings or {})
    if is_schedule_free(optimizer):
        note = f"{type(optimizer).__name__} schedules its own learning rate; train_lr_scheduler '{name}' is not used"
        return ScheduleFreeSchedule(optimizer, notes=[note])
    if type(optimizer).__name__ == "Adafactor" and optimizer.defaults.get("relative_step"):
        note = f"Adafactor (relative_step) schedules its own learning rate; train_lr_scheduler '{name}' is not used"
        return AdafactorSchedule(optimizer, notes=[note])
    plan = _Plan(
        optimizer=optimizer, total_steps=max(1, int(total_steps)), warmup_steps=max(0, int(warmup_steps)),
        num_cycles=int(num_cycles) if num_cycles > 0 else 1, power=float(power) if power > 0 else 1.0,
        step_rules=step_rules, kwargs=kwargs,
    )  # fmt: skip
    if key in _TORCH and plan.warmup_steps > 0:
        # torch schedulers know no warmup: warm up first, then run the scheduler over the remaining steps
        rest = dataclasses.replace(plan, total_steps=max(1, plan.total_steps - plan.warmup_steps), warmup_steps=0)
        return WarmupSchedule(_BUILDERS[key](rest), plan.warmup_steps)
    schedule = _BUILDERS[key](plan)
    if key in _NO_WARMUP and plan.warmup_steps > 0:
        schedule.notes.append(f"train_lr_scheduler '{name}' has no warmup (as in kohya and diffusers); "
                              f"train_lr_warmup_steps {plan.warmup_steps} is not used: choose constant_with_warmup")
    return schedule


@dataclass(frozen=True)
class _Plan:
    """The normalised arguments of one build_scheduler call."""

    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup_steps: int
    num_cycles: int
    power: float
    step_rules: str
    kwargs: dict


# ---------------------------------------------------------------- diffusers-style LambdaLR factories


def _lambda(fn: Callable[[_Plan], Callable[[int], float]], key: str) -> Callable[[_Plan], Schedule]:
    def build(plan: _Plan) -> Schedule:
        _reject_unknown(key, plan.kwargs, _LAMBDA_KEYS.get(key, ()))
        return Schedule(plan.optimizer, LambdaLR(plan.optimizer, fn(plan)))

    return build


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _constant(plan: _Plan) -> Callable[[int], float]:
    return lambda _: 1.0  # diffusers' constant ignores warmup


def _constant_with_warmup(plan: _Plan) -> Callable[[int], float]:
    w = plan.warmup_steps
    return lambda s: _warmup(s, w) if s < w else 1.0


def _linear(plan: _Plan) -> Callable[[int], float]:
    w, n = plan.warmup_steps, plan.total_steps
    return lambda s: _warmup(s, w) if s < w else max(0.0, (n - s) / max(1, n - w))


def _cosine(plan: _Plan) -> Callable[[int], float]:
    """A half cosine from 1 to 0 after warmup (diffusers passes no cycles to it)."""
    w, n = plan.warmup_steps, plan.total_steps

    def f(s: int) -> float:
        if s < w:
            return _warmup(s, w)
        progress = (s - w) / max(1, n - w)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))

    return f


def _cosine_with_restarts(plan: _Plan) -> Callable[[int], float]:
    w, n, cycles = plan.warmup_steps, plan.total_steps, plan.num_cycles

    def f(s: int) -> float:
        if s < w:
            return _warmup(s, w)
        progress = (s - w) / max(1, n - w)
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))

    return f


def _polynomial(plan: _Plan) -> Callable[[int], float]:
    """Decay from the optimizer's default lr to ``lr_end``; like diffusers, the base is ``defaults['lr']``."""
    w, n, power = plan.warmup_steps, plan.total_steps, plan.power
    lr_end = float(plan.kwargs.get("lr_end", 1e-7))
    lr_init = float(plan.optimizer.defaults["lr"])
    if not lr_init > lr_end:
        raise SettingsError(
            "train_lr_scheduler_settings",
            f"polynomial: lr_end ({lr_end:g}) must be below the learning rate ({lr_init:g})",
        )

    def f(s: int) -> float:
        if s < w:
            return _warmup(s, w)
        if s > n:
            return lr_end / lr_init
        remaining = 1 - (s - w) / max(1, n - w)
        return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init

    return f


def _piecewise_constant(plan: _Plan) -> Callable[[int], float]:
    rules, last = parse_step_rules(plan.step_rules)

    def f(s: int) -> float:
        return next((mult for until, mult in rules if s < until), last)

    return f


def parse_step_rules(text: str) -> tuple[list[tuple[int, float]], float]:
    """Parse ``1:100,0.1:200,0.01`` into ``([(100, 1.0), (200, 0.1)], 0.01)``.

    Each ``multiplier:step`` applies before that step; the last bare number applies afterwards.

    Args:
        text: the ``train_lr_step_rules`` value (spaces ignored).

    Returns:
        The (until_step, multiplier) pairs sorted by step, and the final multiplier.

    Raises:
        SettingsError: empty or malformed rules, duplicate steps.
    """
    example = "e.g. '1:100,0.1:200,0.01' (×1 before step 100, ×0.1 before step 200, then ×0.01)"
    parts = [p for p in "".join((text or "").split()).split(",")]
    if not parts or not parts[-1]:
        raise SettingsError("train_lr_step_rules", f"piecewise_constant needs rules, {example}")
    rules: dict[int, float] = {}
    try:
        for part in parts[:-1]:
            mult, until = part.split(":")
            if int(until) in rules:
                raise SettingsError("train_lr_step_rules", f"step {int(until)} appears twice in '{text}'")
            rules[int(until)] = float(mult)
        last = float(parts[-1])
    except ValueError as err:
        raise SettingsError("train_lr_step_rules", f"cannot read '{text}': {err}; {example}") from err
    if any(m < 0 for m in [*rules.values(), last]) or any(s <= 0 for s in rules):
        raise SettingsError("train_lr_step_rules", f"steps must be > 0 and multipliers >= 0 in '{text}'")
    return sorted(rules.items()), last


# ---------------------------------------------------------------- torch schedulers


def _torch_scheduler(cls_name: str, defaults: Callable[[_Plan], dict], fixed: tuple[str, ...] = ()):
    """Build ``torch.optim.lr_scheduler.<cls_name>`` with our defaults under the user's settings."""

    def build(plan: _Plan) -> Schedule:
        cls = getattr(torch.optim.lr_scheduler, cls_name)
        skip = {"self", "optimizer", "last_epoch", "verbose", *fixed}
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        params = inspect.signature(cls.__init__).parameters.values()
        accepted = [p.name for p in params if p.kind in kinds and p.name not in skip]
        _reject_unknown(cls_name, plan.kwargs, accepted)
        try:
            scheduler = cls(plan.optimizer, **{**defaults(plan), **plan.kwargs})
        except (ValueError, TypeError, KeyError) as err:
            raise SettingsError("train_lr_scheduler_settings", f"{cls_name} rejected {plan.kwargs}: {err}") from err
        if cls_name == "ReduceLROnPlateau":
            return PlateauSchedule(plan.optimizer, scheduler)
        max_steps = plan.total_steps if cls_name == "OneCycleLR" else None
        return Schedule(plan.optimizer, scheduler, max_steps=max_steps)

    return build


def _reject_unknown(scheduler: str, kwargs: dict, accepted: tuple[str, ...] | list[str]) -> None:
    for key in kwargs:
        if key not in accepted:
            choices = ", ".join(accepted) if accepted else "nothing (leave it empty)"
            raise SettingsError(
                "train_lr_scheduler_settings", f"{scheduler} does not accept '{key}'; accepted: {choices}"
            )


@functools.lru_cache(maxsize=1)
def _cyclic_cycles_betas() -> bool:
    """torch < 2.2's CyclicLR can cycle only ``momentum``, not Adam's ``betas`` (found on A1111's torch 2.1)."""
    param = torch.nn.Parameter(torch.zeros(1))
    try:
        torch.optim.lr_scheduler.CyclicLR(torch.optim.Adam([param], lr=1e-3), 1e-5, 1e-3, cycle_momentum=True)
    except ValueError:
        return False
    return True


def _cyclic_defaults(plan: _Plan) -> dict:
    """CyclicLR cycles momentum by default and raises on optimizers without it; only cycle what exists."""
    defaults = plan.optimizer.defaults
    has_momentum = float(defaults.get("momentum") or 0) > 0 or ("betas" in defaults and _cyclic_cycles_betas())
    return {"base_lr": 1e-5, "max_lr": 1e-3, "mode": "triangular", "cycle_momentum": has_momentum}


def _one_cycle_defaults(plan: _Plan) -> dict:
    """OneCycleLR also cycles momentum by default and raises on optimizers with neither ``momentum`` nor
    ``betas`` (Tiger, ...); only cycle what exists (the same test torch makes)."""
    defaults = plan.optimizer.defaults
    return {"max_lr": 1e-3, "total_steps": plan.total_steps,
            "cycle_momentum": "momentum" in defaults or "betas" in defaults}


_BUILDERS: dict[str, Callable[[_Plan], Schedule]] = {
    "linear": _lambda(_linear, "linear"),
    "cosine": _lambda(_cosine, "cosine"),
    "cosine_with_restarts": _lambda(_cosine_with_restarts, "cosine_with_restarts"),
    "polynomial": _lambda(_polynomial, "polynomial"),
    "constant": _lambda(_constant, "constant"),
    "constant_with_warmup": _lambda(_constant_with_warmup, "constant_with_warmup"),
    "piecewise_constant": _lambda(_piecewise_constant, "piecewise_constant"),
    "cosine_annealing": _torch_scheduler("CosineAnnealingLR", lambda p: {"T_max": p.total_steps}),
    "cosine_annealing_with_restarts": _torch_scheduler("CosineAnnealingWarmRestarts", lambda p: {"T_0": 10}),
    "exponential": _torch_scheduler("ExponentialLR", lambda p: {"gamma": 0.9}),
    "step": _torch_scheduler("StepLR", lambda p: {"step_size": 10}),
    "multi_step": _torch_scheduler("MultiStepLR", lambda p: {"milestones": [30, 60, 90]}),
    "reduce_on_plateau": _torch_scheduler("ReduceLROnPlateau", lambda p: {"mode": "min"}),
    "cyclic": _torch_scheduler("CyclicLR", _cyclic_defaults),
    # total_steps is exactly the trainer's step count; Schedule.max_steps keeps it from stepping past it.
    "one_cycle": _torch_scheduler(
        "OneCycleLR",
        _one_cycle_defaults,
        ("total_steps", "epochs", "steps_per_epoch"),
    ),
}

_TORCH = frozenset(k for k, b in _BUILDERS.items() if b.__qualname__.startswith("_torch_scheduler"))
_NO_WARMUP = frozenset({"constant", "piecewise_constant"})  # diffusers' own: warmup ignored (kohya refuses it)
