"""The A1111 / Forge Web-UI host: its model lists, its LoRA folder, and in-place training of its loaded
model under its generation lock, with everything put back afterwards.

The traps handled here were measured inside A1111 1.10.1 (``shared/reference/webui-inplace.md``):
the U-Net's parameters default to ``requires_grad=True``, a built-in Lora merge stays in the weights
until the next generation, the cond cache does not see text-encoder adapters, and a generation started
during training must wait for ``queue_lock``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.errors import TrainTrainError
from trainer.models.bundle import Family
from trainer.models.webui_dit import NeoDiTBundle, neo_dit_family
from trainer.models.webui_runtime import WebUIBundle, own_inference_weights

log = logging.getLogger("traintrain")

QUANTIZED_MSG = (
    "Forge stores this U-Net as {dtype}; in-place training needs fp32, fp16 or bf16 weights. "
    "Set 'Diffusion in Low Bits' to Automatic (or a 16/32-bit choice) and reload the model."
)
LOWVRAM_MSG = (
    "TrainTrain cannot train while the Web-UI runs with --lowvram (it moves each U-Net block off the GPU "
    "between uses, which breaks backward). Restart without --lowvram (--medvram works)."
)


def _modules() -> Any:
    """Import the Web-UI's modules lazily (the core never imports them)."""
    from modules import shared

    return shared


def _instance_forwards(root: nn.Module) -> dict[int, tuple[nn.Module, Any]]:
    return {id(m): (m, m.__dict__["forward"]) for m in root.modules() if "forward" in m.__dict__}


def model_roots(sd_model: Any) -> nn.Module:
    """One module holding everything trainable: A1111's model itself; on Forge (whose engine is not an
    ``nn.Module``) its U-Net, text encoders and VAE gathered under one container."""
    if isinstance(sd_model, nn.Module):
        return sd_model
    objects = sd_model.forge_objects
    parts = {
        "unet": getattr(getattr(objects, "unet", None), "model", None),
        "clip": getattr(getattr(objects, "clip", None), "cond_stage_model", None),
        "vae": getattr(getattr(objects, "vae", None), "first_stage_model", None),
    }
    root = nn.Module()
    for name, part in parts.items():
        if isinstance(part, nn.Module):
            root.add_module(name, part)  # a view: torch modules may have several parents; nothing is copied
    return root


_ABSENT = object()


def _set_requires_grad(p: torch.Tensor, flag: bool) -> None:
    """Set ``requires_grad`` only where it differs. Forge builds its model under ``inference_mode``:
    torch refuses ``requires_grad_(True)`` on such a tensor outside inference mode, inside it is allowed."""
    if p.requires_grad == flag:
        return
    if flag and p.is_inference():
        with torch.inference_mode():
            p.requires_grad_(True)
    else:
        p.requires_grad_(flag)


class _Snapshot:
    """Everything about the model that training may touch and the host must put back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = [(p, p.requires_grad, p.device, p.dtype) for p in model.parameters()]
        self.buffers = [(b, b.device, b.dtype) for b in model.buffers()]
        self.training = [(m, m.training) for m in model.modules()]
        self.forwards = _instance_forwards(model)
        # sgm's embedder flag (raised while text encoders train); absent means "class default"
        self.flags = [(m, m.__dict__.get("is_trainable", _ABSENT)) for m in model.modules()]

    def restore(self) -> list[str]:
        """Put the model back; returns what had to be repaired (for the log)."""
        repaired: list[str] = []
        now = _instance_forwards(self.model)
        stray = [m for key, (m, fwd) in now.items() if key not in self.forwards or self.forwards[key][1] is not fwd]
        for m in stray:
            del m.__dict__["forward"]
        for m, fwd in self.forwards.values():
            if m.__dict__.get("forward") is not fwd:
                m.forward = fwd
        if stray:
            repaired.append(f"removed {len(stray)} instance forwards left on modules")
        remaining = [k for k in _instance_forwards(self.model) if k not in self.forwards]
        assert not remaining, f"{len(remaining)} instance forwards remain after restore"
        moved = 0
        failed: list[str] = []
        with torch.no_grad():
            for p, flag, device, dtype in self.params:
                # one parameter that cannot be put back must not stop the rest: collect, report once
                try:
                    p.grad = None
                    if p.device != device or p.dtype != dtype:
                        p.data = p.data.to(device=device, dtype=dtype)
                        moved += 1
                    _set_requires_grad(p, flag)
                except RuntimeError as err:
                    failed.append(f"{tuple(p.shape)}: {err}")
            for b, device, dtype in self.buffers:
                if b.device != device or b.dtype != dtype:
                    b.data = b.data.to(device=device, dtype=dtype)
                    moved += 1
        if moved:
            repaired.append(f"moved {moved} parameters back to their device/dtype")
        if failed:
            repaired.append(f"{len(failed)} parameters could not be restored, first: {failed[0]}")
        for m, flag in self.training:
            m.training = flag
        changed = 0
        for m, value in self.flags:
            if m.__dict__.get("is_trainable", _ABSENT) is not value:
                changed += 1
                if value is _ABSENT:
                    del m.__dict__["is_trainable"]
                else:
                    m.is_trainable = value
        if changed:
            repaired.append(f"reset is_trainable on {changed} modules")
        return repaired


class WebUIHost:
    """:class:`~trainer.hosts.base.Host` for A1111 1.10 and Forge.

    Args:
        name: ``"a1111"`` or ``"forge"``; detected when None.
    """

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self._detect()
        self.notes: list[str] = []
        _ensure_temp_dir()

    @staticmethod
    def _detect() -> str:
        import importlib.util

        shared = _modules()
        if hasattr(getattr(shared, "sd_model", None), "forge_objects") or importlib.util.find_spec("modules_forge"):
            return "forge"
        return "a1111"

    # -- lists -----------------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        from modules import sd_models

        return list(sd_models.checkpoint_tiles())

    def list_vaes(self) -> list[str]:
        from modules import sd_vae

        return [""] + list(sd_vae.vae_dict)

    def default_model(self) -> str:
        """Always "": an empty Model field means the model the Web-UI has loaded when the job starts.
        A name here would be stored by the Web-UI's ui-config.json as the field's value at first launch
        and later swap that (stale) model in for every job (measured in A1111 1.10.1)."""
        return ""

    def loaded_model(self) -> str:
        """The title of the checkpoint the Web-UI has loaded (or selected, on Forge), for display."""
        shared = _modules()
        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        return str(getattr(info, "title", None) or getattr(shared.opts, "sd_model_checkpoint", "") or "")

    def lora_dir(self) -> Path:
        shared = _modules()
        folder = getattr(shared.cmd_opts, "lora_dir", None)
        if not folder:
            from modules import paths

            folder = Path(paths.models_path) / "Lora"
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- progress --------------------------------------------------------------------------------

    def report(self, step: int, total: int, text: str) -> None:
        state = _modules().state
        state.job_count = 1
        state.job_no = 0
        state.sampling_steps = max(int(total), 1)
        state.sampling_step = int(step)
        state.textinfo = text

    def interrupted(self) -> bool:
        return bool(getattr(_modules().state, "interrupted", False))

    def on_saved(self, path: Path, sidecar: dict[str, Any] | None) -> None:
        """Write A1111's ``<name>.json`` card sidecar and refresh the built-in Lora list."""
        path = Path(path)
        if sidecar is not None:
            from trainer.paths import atomic_write_text

            atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=4, ensure_ascii=False))
        try:
            import networks  # A1111/Forge extensions-builtin/Lora is on sys.path
        except ImportError:
            return
        refresh = getattr(networks, "list_available_networks", None)
        if refresh is not None:
            try:
                refresh()
            except Exception as err:  # a failing refresh must not lose the saved file's success
                log.warning("TrainTrain: refreshing the Lora list failed: %s", err)

    # -- acquire ---------------------------------------------------------------------------------

    @contextmanager
    def acquire(self, model: str, vae: str, *, precision: str, v_pred: bool | None,
                use_ema: bool = False, text_encoder: str = "") -> Iterator[WebUIBundle]:
        """Borrow the Web-UI's model for training, holding ``queue_lock`` for the whole span.

        Raises:
            TrainTrainError: ``--lowvram``, a quantized Forge U-Net, a model that cannot be loaded, or a
                merged Lora that cannot be undone.
        """
        shared = _modules()
        if getattr(shared.cmd_opts, "lowvram", False):
            raise TrainTrainError(LOWVRAM_MSG)
        medvram = bool(getattr(shared.cmd_opts, "medvram", False) or getattr(shared.cmd_opts, "medvram_sdxl", False))
        self.notes = []
        if medvram:
            self.notes.append("--medvram: latents and prompts are cached first, then the U-Net trains alone")
        if use_ema:  # its model configs say use_ema: False: model_ema.* is never loaded into the Web-UI
            self.notes.append("model_use_ema: the Web-UI loads a checkpoint's regular weights, so they are trained; "
                              "train EMA weights in the standalone app or CLI")
        if text_encoder and text_encoder != "None":  # the Web-UI's own loader chose the model's text encoder
            self.notes.append("te: the Web-UI trains the model it has loaded with its own text encoder; the text "
                              "encoder file is used by the standalone app and CLI only")
        from modules.call_queue import queue_lock

        with queue_lock:
            shared.state.begin(job="traintrain")
            try:
                if self.name == "forge":
                    _forge_load_selected()
                with self._loaded(model, vae):
                    yield from self._span(shared, precision=precision, v_pred=v_pred, medvram=medvram)
            finally:
                _clear_cond_cache()
                shared.state.end()

    def _span(self, shared: Any, *, precision: str, v_pred: bool | None, medvram: bool) -> Iterator[WebUIBundle]:
        sd_model = shared.sd_model
        forge = hasattr(sd_model, "forge_objects")
        if not forge and not isinstance(sd_model, nn.Module):
            raise TrainTrainError("model: the Web-UI has no model loaded; pick a checkpoint in its checkpoint "
                                  "dropdown (or generate once) and start again")
        dit = neo_dit_family(sd_model) if forge else None  # refuses flow families we do not train, untouched
        if forge:
            _forge_prepare(sd_model)
            # Forge builds its weights under inference_mode: autograd needs normal tensors
            owned = own_inference_weights(sd_model.forge_objects.unet.model)
            if owned:
                log.info("TrainTrain: %d U-Net weights were inference tensors; now normal tensors", owned)
        else:
            _undo_merged_lora(sd_model)
        model_id = id(sd_model)
        root = model_roots(sd_model)
        snap = _Snapshot(root)
        for p in root.parameters():
            _set_requires_grad(p, False)
        bundle = None
        try:
            if dit is not None:  # Neo's Z-Image / Anima
                bundle = NeoDiTBundle(sd_model, device=_device(root))
            else:
                zero_snr_option = getattr(shared.opts, "sd_noise_schedule", "Default") == "Zero Terminal SNR"
                bundle = WebUIBundle(sd_model, device=_device(root), v_pred=v_pred, medvram=medvram,
                                     zero_snr_option=zero_snr_option, renderer=None if forge else _a1111_renderer)
            bundle.notes[:0] = self.notes
            bundle.clip_skip = _host_clip_skip(shared.opts, bundle.family, forge=bundle.forge)
            if precision and _DTYPES.get(precision) not in (None, bundle.dtype):
                bundle.notes.append(f"precision {precision} ignored: the Web-UI's model stays in {str(bundle.dtype).replace('torch.', '')} (trained in place)")
            for note in bundle.notes:
                log.info("TrainTrain: %s", note)
            yield bundle
        finally:
            if bundle is not None:
                bundle.release()
            if id(shared.sd_model) != model_id:
                log.warning("TrainTrain: the Web-UI model changed during training; restoring the one trained")
            for line in snap.restore():
                log.warning("TrainTrain: %s", line)

    @contextmanager
    def _loaded(self, model: str, vae: str) -> Iterator[None]:
        """Load the chosen checkpoint/VAE through the Web-UI's own loader; put the previous ones back."""
        shared = _modules()
        from modules import sd_models, sd_vae

        prev_info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        prev_vae = getattr(sd_vae, "loaded_vae_file", None)
        changed_model = changed_vae = False
        try:
            if model and model not in (getattr(prev_info, "title", None), getattr(prev_info, "name", None)):
                info = sd_models.get_closet_checkpoint_match(model)
                if info is None:
                    raise TrainTrainError(f"model: '{model}' is not one of the Web-UI's checkpoints; press refresh or pick one from the list")
                if self.name == "forge":
                    raise TrainTrainError(f"model: on Forge, select '{model}' in the Web-UI's checkpoint dropdown first (or leave Model empty to train the loaded one)")
                sd_models.reload_model_weights(info=info)
                changed_model = True
            if vae:
                if vae not in sd_vae.vae_dict:
                    raise TrainTrainError(f"vae: '{vae}' is not one of the Web-UI's VAEs; press refresh or pick one from the list")
                if self.name == "forge":
                    raise TrainTrainError("vae: on Forge, choose the VAE in the Web-UI's VAE selector (leave this empty)")
                if sd_vae.vae_dict[vae] != prev_vae:
                    sd_vae.reload_vae_weights(shared.sd_model, vae_file=sd_vae.vae_dict[vae])
                    changed_vae = True
            yield
        finally:
            if changed_model and prev_info is not None:
                sd_models.reload_model_weights(info=prev_info)
            if changed_vae or (changed_model and getattr(sd_vae, "loaded_vae_file", None) != prev_vae):
                sd_vae.reload_vae_weights(shared.sd_model, vae_file=prev_vae)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _host_clip_skip(opts: Any, family: Family, *, forge: bool) -> int | None:
    """The Clip skip the Web-UI's prompt encoding uses, as kohya's ``ss_clip_skip`` (1 = last layer).

    A1111 applies ``CLIP_stop_at_last_layers`` to SD1's encoder only (its SD2 encoder is fixed at
    OpenCLIP's penultimate layer, kohya's 1); Forge applies it to SD2 too. SDXL and the DiTs: None (kohya writes none).
    """
    if family is Family.SDXL or family.is_dit:
        return None
    if family is Family.SD2 and not forge:
        return 1
    return max(1, int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1))


def _device(root: nn.Module) -> torch.device:
    try:
        from modules import devices

        return torch.device(devices.device)
    except (ImportError, AttributeError):
        return next(root.parameters()).device


def _clear_cond_cache() -> None:
    """A1111's cond cache key has no term for text-encoder weights: clear it around training."""
    try:
        from modules.processing import StableDiffusionProcessing
    except ImportError:
        return
    StableDiffusionProcessing.cached_c = [None, None]
    StableDiffusionProcessing.cached_uc = [None, None]


def _undo_merged_lora(sd_model: Any) -> None:
    """Put back weights the built-in Lora extension merged at the last generation.

    Raises:
        TrainTrainError: merged weights are present and the Lora extension cannot restore them.
    """
    merged = [m for m in sd_model.modules() if getattr(m, "network_current_names", ())]
    try:
        import networks
    except ImportError:
        networks = None
    if networks is not None and getattr(networks, "loaded_networks", None):
        networks.load_networks([])
    if not merged:
        return
    if networks is None or not hasattr(networks, "network_apply_weights"):
        raise TrainTrainError("a Lora used at the last generation is still merged into the model and the built-in Lora extension cannot be reached to undo it; generate once without <lora:...> and retry")
    with torch.no_grad():
        for m in merged:
            networks.network_apply_weights(m)
    left = sum(1 for m in sd_model.modules() if getattr(m, "network_current_names", ()))
    if left:
        raise TrainTrainError(f"{left} modules still hold a merged Lora; generate once without <lora:...> and retry")


def _ensure_temp_dir() -> None:
    """Create the Web-UI's ``temp_dir`` if it names a missing folder.

    Forge Neo saves every unsaved PIL image a tab hands to Gradio (our preview gallery) into
    ``opts.temp_dir`` (its ``modules/ui_tempdir.py``), creating the folder only when the option is empty;
    Neo's default is ``<data>/tmp``, which nothing creates, so the first preview update failed with
    FileNotFoundError on a fresh install (measured). A1111 and Forge default to "" (Gradio's own cache).
    """
    folder = getattr(getattr(_modules(), "opts", None), "temp_dir", "") or ""
    if folder:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a read-only location: the gallery fails as before, the tab still loads
            log.warning("TrainTrain: cannot create the Web-UI's temp_dir %s: %s", folder, err)


def _a1111_renderer(bundle: WebUIBundle) -> Any:
    from trainer.hosts.webui_preview import A1111Renderer

    return A1111Renderer(bundle)


def _forge_load_selected() -> None:
    """Forge and Forge Neo load the checkpoint selected in their dropdown only when a generation needs
    it (``forge_model_reload``): until then ``shared.sd_model`` is None or a placeholder. Load it the
    same way a generation does; a no-op when it is loaded already.

    Raises:
        TrainTrainError: no checkpoint is selected or it cannot be loaded.
    """
    from modules import sd_models

    reload = getattr(sd_models, "forge_model_reload", None)
    if reload is None:
        return
    try:
        reload()
    except (ValueError, AssertionError, KeyError) as err:
        raise TrainTrainError(f"model: the Web-UI has no checkpoint selected ({err}); pick one in its checkpoint "
                              "dropdown and start again") from err
    except (OSError, RuntimeError) as err:
        raise TrainTrainError(f"model: the Web-UI could not load its selected checkpoint ({err}); "
                              "check that it generates, then start again") from err


def _forge_prepare(sd_model: Any) -> None:
    """Forge: refuse quantized U-Net storage, drop LoRA patches, and load the U-Net onto the GPU."""
    patcher = sd_model.forge_objects.unet
    storage = getattr(patcher.model, "storage_dtype", None)
    if storage is not None and storage not in (torch.float32, torch.float16, torch.bfloat16):
        raise TrainTrainError(QUANTIZED_MSG.format(dtype=storage))
    original = getattr(sd_model, "forge_objects_original", None)
    if original is not None and hasattr(original, "shallow_copy"):
        sd_model.forge_objects = original.shallow_copy()
        patcher = sd_model.forge_objects.unet
    try:
        from backend import memory_management
    except ImportError:
        return
    memory_management.load_model_gpu(patcher)
