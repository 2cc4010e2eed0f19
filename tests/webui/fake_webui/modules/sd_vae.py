"""Fake ``modules.sd_vae``: VAE name -> path, the loaded file, and a recorder of reloads."""

from __future__ import annotations

vae_dict: dict[str, str] = {}
loaded_vae_file: str | None = None
reloads: list[str | None] = []


def reload_vae_weights(sd_model=None, vae_file=None):
    global loaded_vae_file
    reloads.append(vae_file)
    loaded_vae_file = vae_file
    return sd_model
