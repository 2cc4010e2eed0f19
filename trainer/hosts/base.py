"""The ``Host`` protocol: where models come from, where LoRAs go, and how the host is restored."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trainer.models.bundle import ModelBundle


@runtime_checkable
class Host(Protocol):
    """A place the trainer runs in: the standalone app/CLI, or the A1111/Forge Web-UI.

    Attributes:
        name: ``"standalone"``, ``"a1111"`` or ``"forge"``.
    """

    name: str

    def list_models(self) -> list[str]:
        """Model choices for the Model dropdown (titles or paths; built-in tiny models standalone)."""
        ...

    def list_vaes(self) -> list[str]:
        """VAE choices (``""`` means the checkpoint's own VAE)."""
        ...

    def default_model(self) -> str:
        """The model a job uses when its ``model`` is empty: the one the host has loaded."""
        ...

    def lora_dir(self) -> Path:
        """Folder the LoRA files are written to (created if missing)."""
        ...

    def acquire(self, model: str, vae: str, *, precision: str, v_pred: bool | None,
                use_ema: bool = False, text_encoder: str = "") -> AbstractContextManager[ModelBundle]:
        """Load or borrow the model for training (``use_ema``: the EMA U-Net a checkpoint carries;
        ``text_encoder``: the separate text-encoder file a Z-Image transformer file needs, standalone only).

        The context manager restores the host (model, devices, dtypes, hooks, flags, locks) on exit,
        after success, stop or error alike.
        """
        ...

    def on_saved(self, path: Path, sidecar: dict[str, Any] | None) -> None:
        """Called after a LoRA file was written (refresh the host's Lora list, write the card sidecar)."""
        ...

    def report(self, step: int, total: int, text: str) -> None:
        """Mirror progress into the host's own progress display (no-op standalone)."""
        ...

    def interrupted(self) -> bool:
        """True when the host asked to stop (the Web-UI's Interrupt button)."""
        ...
