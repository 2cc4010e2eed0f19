"""Run one job: validate, plan outputs, acquire the model from the host, run the mode, report.

Everything is checked before the model is touched (R3); the host restores itself on the way out,
after success, stop or error alike.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.csvlog import resume_dir
from trainer.errors import SettingsError, ValidationError
from trainer.modes import MODES
from trainer.modes.dataset import resolve_epochs
from trainer.modes.setup import OutputPlan, RunContext
from trainer.paths import safe_name
from trainer.progress import Events


def resolve_seed(seed: int) -> int:
    """A negative seed draws one in [0, 2³²−1] (the reference's inclusive 2³² overflowed NumPy)."""
    return random.SystemRandom().randrange(0, 2**32) if seed < 0 else seed


def run_job(
    settings,
    host,
    *,
    events: Events,
    stop: Callable[[], str | None] = lambda: None,
    logs_root: Path | None = None,
    json_root: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    grad_sync: Callable | None = None,
) -> dict[str, Any]:
    """Train one job and return the structured result.

    Args:
        rank, world_size, grad_sync: data-parallel context (``trainer.distributed``); defaults: one process.

    Returns:
        ``{"status", "message", "lora_path", "steps", "final_loss", "seconds", "seed", "report", ...}``;
        ``status`` is ``done``, ``stopped``, ``saved_stop`` or ``failed`` (the report card found NaN/inf:
        nothing was saved); ``report`` is the card (trainer/report.py) or None when it was not run.

    Raises:
        ValidationError: settings problems (nothing was loaded or written).
        TrainTrainError: a clear, named failure during the run.
    """
    from trainer.settings import validate

    started = time.perf_counter()
    problems = validate(settings)
    if problems:
        raise ValidationError(problems)
    if settings.mode not in MODES:
        raise SettingsError("mode", f"unknown '{settings.mode}'; choose one of {', '.join(MODES)}")
    recipe = MODES[settings.mode]
    # train_epochs sets train_iterations from the dataset (before outputs are planned: step files depend on it)
    early_notes: list[str] = []
    settings, dataset = resolve_epochs(settings, world_size=world_size, note=early_notes.append)
    seed = resolve_seed(settings.train_seed)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    name = safe_name(settings.save_lora_name, "save_lora_name")
    states = resume_dir(logs_root, name, stamp) if logs_root is not None and settings.save_resume_state else None
    out = OutputPlan(host.lora_dir(), name, stamp, bool(settings.save_overwrite),
                     logs_root if settings.logging_save_csv else None, samples_root=logs_root, state_root=states)
    out.check_free(recipe.planned_suffixes(settings))
    snapshot = None
    if settings.save_as_json and json_root is not None and rank == 0:
        from trainer.presets import write_snapshot

        snapshot = write_snapshot(settings, json_root)
    model = settings.model or host.default_model()
    with host.acquire(model, settings.vae, precision=settings.train_model_precision,
                      v_pred=True if settings.model_v_pred else None,
                      use_ema=bool(getattr(settings, "model_use_ema", False)), text_encoder=settings.te) as bundle:
        ctx = RunContext.create(settings, bundle, events, stop, out, seed, rank=rank, world_size=world_size,
                                grad_sync=grad_sync)
        for note in getattr(bundle, "notes", ()):  # what the host could not do (e.g. TE training on OpenCLIP)
            ctx.note(note)
        for note in early_notes:
            ctx.note(note)
        ctx.dataset = dataset
        watch = _vram_watch(settings, bundle, events)
        try:
            outcome = recipe.run(ctx)
        finally:
            if watch is not None:
                events.sinks.remove(watch)
    for path, sidecar in outcome.saved if rank == 0 else ():
        host.on_saved(path, sidecar if settings.save_sidecar_json else None)
    seconds = time.perf_counter() - started
    result = {
        "status": outcome.status,
        "lora_path": str(outcome.lora_path) if outcome.lora_path else None,
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "seconds": round(seconds, 3),
        "seed": seed,
        "mode": settings.mode,
        "report": outcome.report,
        # where this run's CSV log(s) and preview folder are: logs/<day>/<name>-<stamp>*
        "log_folder": str(Path(logs_root) / stamp[:8]) if logs_root is not None else None,
        "files": [str(p) for p, _ in outcome.saved],
        "snapshot": str(snapshot) if snapshot else None,
        "resume_state": str(out.states[-1]) if out.states else None,
        "notes": list(outcome.notes),
    }
    result["message"] = _message(result)
    return result


def _vram_watch(settings, bundle, events: Events):
    """Log the VRAM estimate (one line) and, on CUDA, watch step times for spilling (trainer/vram.py)."""
    from trainer.vram import SpillWatch, estimate_vram

    device = getattr(getattr(bundle, "device", None), "type", "")
    try:
        estimate = estimate_vram(settings, bundle)
        # "Estimated VRAM" on a CPU run reads as a claim about this machine; say what the figure means
        events.info(estimate.line() if device == "cuda" else
                    f"On a GPU this run would need about {estimate.total_gb:.1f} GB of VRAM "
                    f"(this run is on {device or 'the host device'})")
    except (AttributeError, TypeError, ValueError) as err:  # a host bundle without counts: no estimate, no failure
        events.info(f"no VRAM estimate for this model ({err})")
    if device != "cuda":
        return None
    watch = SpillWatch(events.warning)
    events.add(watch)
    return watch


def _message(result: dict[str, Any]) -> str:
    path, status = result["lora_path"], result["status"]
    card = result.get("report") or {}
    tail = f" ({result['steps']} steps, {result['seconds']:.1f} s)"
    if status == "failed":
        return f"Failed, nothing saved: {card.get('verdict', 'the LoRA is broken')}{tail}"
    if status == "stopped":
        return "Stopped" + (f". Last saved to {path}" if path else "") + tail
    if status == "saved_stop":
        said = f", and the report card says: {card.get('verdict', '')}" if card and not card.get("learned") else ""
        return f"Stopped and saved the LoRA to {path}{said}{tail}"
    if not path:
        return "Done (nothing saved)" + tail
    if card and not card.get("learned"):  # saved, but the user must not take it for a working LoRA
        return f"Done. LoRA saved to {path}, but the report card says: {card.get('verdict', '')}{tail}"
    return f"Done. LoRA saved to {path}{tail}"
