"""Optimizers by UI name (``train_optimizer``), built from one well-kept package each.

torch covers AdamW/Adam/SGDNesterov; bitsandbytes the 8-bit and paged ones (probed on the real device
first, because 0.45–0.49 import fine and then fail on CPU tensors); pytorch-optimizer everything else,
with the single-purpose packages (prodigyopt, dadaptation, schedulefree, lion-pytorch, came-pytorch)
accepted when they are what is installed; transformers for AdaFactor. Every optional package is
imported inside the factory that needs it, so a missing one disables one choice, never the tab.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from trainer.errors import MissingPackage, SettingsError

# The dropdown order (separators included) is declared once, in the settings table.
from trainer.settings import OPTIMIZERS as OPTIMIZER_CHOICES
from trainer.settings import SEPARATOR

_PYTORCH_OPTIMIZER = "pytorch-optimizer"
# Keys we set ourselves; a user value for them would be a duplicate keyword.
_RESERVED = frozenset({"self", "params", "model", "lr", "args"})


@dataclass(frozen=True)
class OptimizerBundle:
    """What ``build_optimizer`` returns.

    Args:
        optimizer: the constructed optimizer, already in train mode when it is schedule-free.
        notes: warnings for the user (one line each), e.g. a fallback or an lr that will not work.
        schedule_free: the optimizer schedules its own lr and must be switched to eval before saving.
        adafactor_schedule: Adafactor computes its own step size; ``build_scheduler`` reports it.
    """

    optimizer: torch.optim.Optimizer
    notes: list[str] = field(default_factory=list)
    schedule_free: bool = False
    adafactor_schedule: bool = False


@dataclass
class _Request:
    """One build call, with private copies of the caller's groups and settings."""

    name: str
    groups: list[dict]
    lr: float
    kwargs: dict
    network: torch.nn.Module | None
    device: torch.device
    notes: list[str] = field(default_factory=list)
    adafactor_schedule: bool = False

    @property
    def feature(self) -> str:
        return f"train_optimizer '{self.name}'"

    def group_lrs(self) -> list[float]:
        return [float(g.get("lr", self.lr)) for g in self.groups]


def build_optimizer(
    name: str,
    param_groups: list[dict],
    *,
    lr: float,
    settings: dict,
    network: torch.nn.Module | None = None,
    device: torch.device | None = None,
) -> OptimizerBundle:
    """Build the optimizer named in the UI.

    Args:
        name: a ``train_optimizer`` choice, matched case-insensitively (``adamw8bit`` works).
        param_groups: torch param groups; each may carry its own ``lr`` (and a ``name``). Not mutated.
        lr: the global learning rate, used by groups without their own.
        settings: extra keyword arguments parsed from ``train_optimizer_settings``. Not mutated.
        network: the trained module; only AdamMini needs it (it groups parameters by name itself).
        device: where the parameters live; defaults to the first parameter's device. bitsandbytes is
            probed there.

    Returns:
        The optimizer, user notes and the schedule flags.

    Raises:
        SettingsError: separator line, unknown name, unknown or rejected keyword arguments.
        MissingPackage: the package behind this optimizer is not installed.
    """
    key = name.strip()
    if key and set(key) == {"-"}:
        raise SettingsError("train_optimizer", f"'{name}' is a separator; choose an optimizer")
    factory = OPTIMIZERS.get(key.lower())
    if factory is None:
        choices = ", ".join(c for c in OPTIMIZER_CHOICES if c != SEPARATOR)
        raise SettingsError("train_optimizer", f"unknown '{name}'; choose one of {choices}")
    groups = [dict(g) for g in param_groups]  # torch fills defaults into the dicts it is given
    req = _Request(
        name=_display_name(key), groups=groups, lr=float(lr), kwargs=dict(settings or {}),
        network=network, device=device or _first_device(groups),
    )  # fmt: skip
    optimizer = factory(req)
    schedule_free = is_schedule_free(optimizer)
    train_mode(optimizer)  # schedulefree's classes start in eval mode
    return OptimizerBundle(optimizer, req.notes, schedule_free, req.adafactor_schedule)


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """True for schedule-free optimizers (they expose ``train()``/``eval()``, plain torch ones do not)."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def train_mode(optimizer: torch.optim.Optimizer) -> None:
    """Put a schedule-free optimizer back on its training iterate (after a save); no-op for others."""
    if is_schedule_free(optimizer):
        optimizer.train()


def eval_mode(optimizer: torch.optim.Optimizer) -> None:
    """Move a schedule-free optimizer's parameters to the averaged weights (before every save or sample).

    The reference saved the training iterate instead (behavior §17 #13). No-op for other optimizers.
    """
    if is_schedule_free(optimizer):
        optimizer.eval()


# ---------------------------------------------------------------- construction helpers


def _display_name(key: str) -> str:
    return next((c for c in OPTIMIZER_CHOICES if c.lower() == key.lower()), key)


def _first_device(groups: list[dict]) -> torch.device:
    for group in groups:
        for p in group.get("params", []):
            return p.device
    return torch.device("cpu")


def _accepted(cls: type) -> list[str]:
    """Keyword names the constructor declares (``**kwargs`` catch-alls are not acceptance)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.kind in kinds and p.name not in _RESERVED]


def _check_kwargs(req: _Request, cls: type) -> None:
    accepted = _accepted(cls)
    for key in req.kwargs:
        if key not in accepted:
            hint = " (set train_learning_rate instead)" if key == "lr" else ""
            raise SettingsError(
                "train_optimizer_settings",
                f"{req.name} ({cls.__module__}.{cls.__name__}) does not accept '{key}'{hint}; "
                f"accepted: {', '.join(accepted)}",
            )


def _construct(req: _Request, cls: type, first: object, **fixed: object) -> torch.optim.Optimizer:
    """Check the user's keywords against the signature, then build; library refusals become SettingsError."""
    _check_kwargs(req, cls)
    kwargs = {**req.kwargs, **fixed}
    try:
        return cls(first, **kwargs)
    except (ValueError, TypeError, NotImplementedError) as err:
        raise SettingsError(
            "train_optimizer_settings", f"{req.name} rejected {req.kwargs or 'the defaults'}: {err}"
        ) from err


def _import_class(candidates: tuple[tuple[str, str], ...]) -> type | None:
    """The first ``module.attr`` that imports, in preference order."""
    for module, attr in candidates:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        cls = getattr(mod, attr, None)
        if cls is not None:
            return cls
    return None


# ---------------------------------------------------------------- torch


def _torch(cls_name: str, **defaults: object) -> Callable[[_Request], torch.optim.Optimizer]:
    def factory(req: _Request) -> torch.optim.Optimizer:
        cls = getattr(torch.optim, cls_name)
        req.kwargs = {**defaults, **req.kwargs}
        params = [p for g in req.groups for p in g["params"]]
        # one fused kernel per step instead of ~10 per tensor; CUDA float params only, the user's choice wins
        if (cls_name in ("Adam", "AdamW") and params and "fused" not in req.kwargs and "foreach" not in req.kwargs
                and all(p.is_cuda and p.is_floating_point() for p in params)):
            req.kwargs["fused"] = True
        return _construct(req, cls, req.groups, lr=req.lr)

    return factory


def _sgd_nesterov(req: _Request) -> torch.optim.Optimizer:
    _nesterov_kwargs(req)
    return _construct(req, torch.optim.SGD, req.groups, lr=req.lr)


def _nesterov_kwargs(req: _Request) -> None:
    """Momentum 0.9 unless given; nesterov forced on (that is what the name promises)."""
    req.kwargs.setdefault("momentum", 0.9)
    if req.kwargs.get("nesterov") is False:
        req.notes.append(f"{req.name}: nesterov is always on for this optimizer; 'nesterov=False' ignored")
    req.kwargs["nesterov"] = True
    if not float(req.kwargs["momentum"]) > 0:
        raise SettingsError("train_optimizer_settings", f"{req.name} needs momentum > 0 (got {req.kwargs['momentum']})")


# ---------------------------------------------------------------- bitsandbytes


@functools.cache
def _probe_bnb(cls_name: str, device: str) -> str | None:
    """Run one 8-bit step on 4096 elements on ``device``; None when it works, else why not.

    bitsandbytes 0.45–0.49 import on CPU-only machines and fail at the first step (platform §3),
    so importability proves nothing. Cached: one probe per class and device per process.
    """
    import bitsandbytes as bnb

    try:
        p = torch.nn.Parameter(torch.zeros(4096, device=device))  # >= min_8bit_size: the 8-bit path
        extra = {"momentum": 0.9} if cls_name.startswith("SGD") else {}
        opt = getattr(bnb.optim, cls_name)([p], lr=0.0, **extra)
        p.grad = torch.zeros_like(p)
        opt.step()
    except Exception as err:  # any failure means "unusable here"; the reason is reported
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} {cls_name} fails on {device}: {err}"
    return None


def _bnb(cls_name: str, fallback: str) -> Callable[[_Request], torch.optim.Optimizer]:
    """A bitsandbytes factory; ``fallback`` names the full-precision optimizer used when the probe fails."""

    def factory(req: _Request) -> torch.optim.Optimizer:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise MissingPackage("bitsandbytes", req.feature) from err
        except Exception as err:  # a broken CUDA setup raises other types at import: same as a failed probe
            return _bnb_fallback(req, f"bitsandbytes does not import: {err}", fallback)
        cls = getattr(bnb.optim, cls_name, None)
        if cls is None:
            raise MissingPackage("bitsandbytes>=0.50", req.feature)
        if cls_name.startswith("SGD"):
            _nesterov_kwargs(req)
        _check_kwargs(req, cls)  # typos are reported even when we end up falling back
        reason = _probe_bnb(cls_name, str(req.device))
        if reason is None:
            return _construct(req, cls, req.groups, lr=req.lr)
        return _bnb_fallback(req, reason, fallback)

    return factory


_FALLBACK_CLASSES: dict[str, Callable[[], type | None]] = {
    "adamw": lambda: torch.optim.AdamW,
    "adam": lambda: torch.optim.Adam,
    "sgdnesterov": lambda: torch.optim.SGD,
    "lion": lambda: _import_class(_LION),
}


def _bnb_fallback(req: _Request, reason: str, fallback: str) -> torch.optim.Optimizer:
    """Train anyway with the full-precision equivalent, and say why and how to get 8-bit back."""
    cls = _FALLBACK_CLASSES[fallback]()
    if cls is None:  # Lion8bit without any Lion package
        fallback, cls = "adamw", torch.optim.AdamW
    req.kwargs = _keep_accepted(req, cls)
    req.notes.append(
        f"{req.name}: {reason}. Using {_display_name(fallback)} ({cls.__module__}.{cls.__name__}) instead: "
        "same training, more optimizer memory. Fix: pip install -U 'bitsandbytes>=0.50' "
        "(CPU needs >= 0.50; CUDA needs a build matching your CUDA)."
    )
    return OPTIMIZERS[fallback](req)


def _keep_accepted(req: _Request, cls: type) -> dict:
    accepted = set(_accepted(cls))
    dropped = sorted(set(req.kwargs) - accepted)
    if dropped:
        req.notes.append(f"{req.name}: the fallback optimizer ignores {', '.join(dropped)}")
    return {k: v for k, v in req.kwargs.items() if k in accepted}


# ---------------------------------------------------------------- pytorch-optimizer and friends


def _package(candidates: tuple[tuple[str, str], ...], *, adaptive: bool = False):
    """A factory for the first importable class; ``adaptive`` adds the D-adaptation lr notes."""

    def factory(req: _Request) -> torch.optim.Optimizer:
        cls = _import_class(candidates)
        if cls is None:
            raise MissingPackage(_PYTORCH_OPTIMIZER, req.feature)
        if adaptive:
            _adaptive_notes(req)
        return _construct(req, cls, req.groups, lr=req.lr)

    return factory


def _adaptive_notes(req: _Request) -> None:
    """Prodigy and D-Adaptation estimate the step size; lr is a multiplier around 1.0."""
    lrs = req.group_lrs()
    if min(lrs) <= 0.1:
        req.notes.append(f"{req.name}: learning rate {min(lrs):g} is a multiplier here; set learning rate around 1.0")
    if len(set(lrs)) > 1:
        req.notes.append(
            f"{req.name}: parameter groups use different learning rates ({', '.join(f'{x:g}' for x in sorted(set(lrs)))}); "
            "the adapted step size is shared, so set them equal unless you mean to scale one group"
        )


_LION = (("pytorch_optimizer", "Lion"), ("lion_pytorch", "Lion"))


def _lion_class(req: _Request) -> type:
    cls = _import_class(_LION)
    if cls is None:
        raise MissingPackage(_PYTORCH_OPTIMIZER, req.feature)
    return cls


def _lion(req: _Request) -> torch.optim.Optimizer:
    return _construct(req, _lion_class(req), req.groups, lr=req.lr)


def _adam_mini(req: _Request) -> torch.optim.Optimizer:
    """AdamMini partitions parameters by their names, so it takes the module, not param groups."""
    cls = _import_class((("pytorch_optimizer", "AdamMini"),))
    if cls is None:
        raise MissingPackage(_PYTORCH_OPTIMIZER, req.feature)
    if not isinstance(req.network, torch.nn.Module):
        raise SettingsError(
            "train_optimizer", "AdamMini needs the network module, which this training mode does not provide; "
            "choose another optimizer (e.g. AdamW)"
        )  # fmt: skip
    if len(set(req.group_lrs())) > 1:
        req.notes.append("AdamMini: one learning rate for the whole network; per-group learning rates are not applied")
    return _construct(req, cls, req.network, lr=req.lr)


def _adafactor(req: _Request) -> torch.optim.Optimizer:
    """transformers' Adafactor; with relative_step it computes its own lr and replaces the scheduler."""
    try:
        from transformers.optimization import Adafactor
    except ImportError as err:
        raise MissingPackage("transformers", req.feature) from err
    kw = req.kwargs
    kw.setdefault("relative_step", True)
    if kw.get("warmup_init") and not kw["relative_step"]:
        req.notes.append("AdaFactor: warmup_init needs relative_step; relative_step turned on")
        kw["relative_step"] = True
    if not kw["relative_step"]:
        return _construct(req, Adafactor, req.groups, lr=req.lr)
    req.groups = [{k: v for k, v in g.items() if k != "lr"} for g in req.groups]
    req.notes.append(
        f"AdaFactor: relative_step is on, so learning rate {req.lr:g} is used as initial lr only; "
        "Adafactor computes its own step size and replaces the LR scheduler"
    )
    req.adafactor_schedule = True
    optimizer = _construct(req, Adafactor, req.groups, lr=None)
    for group in optimizer.param_groups:
        group["initial_lr"] = req.lr  # what the schedule reports before the first step
    return optimizer


def _dadapt(attr: str) -> Callable[[_Request], torch.optim.Optimizer]:
    return _package((("pytorch_optimizer", attr), ("dadaptation", attr)), adaptive=True)


OPTIMIZERS: dict[str, Callable[[_Request], torch.optim.Optimizer]] = {
    "adamw": _torch("AdamW"),
    "adam": _torch("Adam"),
    "sgdnesterov": _sgd_nesterov,
    "adamw8bit": _bnb("AdamW8bit", "adamw"),
    "adam8bit": _bnb("Adam8bit", "adam"),
    "sgdnesterov8bit": _bnb("SGD8bit", "sgdnesterov"),
    "lion8bit": _bnb("Lion8bit", "lion"),
    "pagedadamw8bit": _bnb("PagedAdamW8bit", "adamw"),
    "pagedlion8bit": _bnb("PagedLion8bit", "lion"),
    "pagedadamw": _bnb("PagedAdamW", "adamw"),
    "pagedadamw32bit": _bnb("PagedAdamW32bit", "adamw"),
    "adafactor": _adafactor,
    "lion": _lion,
    "prodigy": _package((("pytorch_optimizer", "Prodigy"), ("prodigyopt", "Prodigy")), adaptive=True),
    "dadaptadam": _dadapt("DAdaptAdam"),
    "dadaptlion": _dadapt("DAdaptLion"),
    "dadaptadagrad": _dadapt("DAdaptAdaGrad"),
    "dadaptadan": _dadapt("DAdaptAdan"),
    "dadaptsgd": _dadapt("DAdaptSGD"),
    "radamschedulefree": _package((("pytorch_optimizer", "ScheduleFreeRAdam"), ("schedulefree", "RAdamScheduleFree"))),
    "adamwschedulefree": _package((("pytorch_optimizer", "ScheduleFreeAdamW"), ("schedulefree", "AdamWScheduleFree"))),
    "sgdschedulefree": _package((("pytorch_optimizer", "ScheduleFreeSGD"), ("schedulefree", "SGDScheduleFree"))),
    "came": _package((("pytorch_optimizer", "CAME"), ("came_pytorch", "CAME"))),
    "tiger": _package((("pytorch_optimizer", "Tiger"),)),
    "adammini": _adam_mini,
}
