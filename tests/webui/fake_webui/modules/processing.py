"""Fake ``modules.processing``: the class-level cond caches and a minimal txt2img path.

``process_images`` behaves like A1111 1.10's where it matters to a caller inside training: it reloads the
checkpoint ``opts.sd_model_checkpoint`` names, activates extra networks from ``<lora:…>`` tags unless
``disable_extra_networks``, fills the class-level cond caches in place, writes ``params.txt`` and
``shared.state``'s progress fields, seeds the *global* torch RNG, and samples through ``apply_model`` and
``decode_first_stage`` of the loaded model (so adapters patched into its modules are seen).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

SAMPLERS = ("Euler", "Euler a", "DDIM", "DPM++ 2M")
calls: list[dict] = []


class StableDiffusionProcessing:
    cached_c = [None, None]
    cached_uc = [None, None]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, prompt="", negative_prompt="", seed=-1, sampler_name="Euler", steps=20, cfg_scale=7.0,
                 width=512, height=512, batch_size=1, n_iter=1, do_not_save_samples=False, do_not_save_grid=False,
                 **kwargs):
        self.prompt, self.negative_prompt, self.seed, self.sampler_name = prompt, negative_prompt, seed, sampler_name
        self.steps, self.cfg_scale, self.width, self.height = steps, cfg_scale, width, height
        self.batch_size, self.n_iter = batch_size, n_iter
        self.do_not_save_samples, self.do_not_save_grid = do_not_save_samples, do_not_save_grid
        self.disable_extra_networks = False
        self.do_not_reload_embeddings = False
        self.scripts = None
        self.override_settings = dict(kwargs.get("override_settings") or {})

    @property
    def sd_model(self):
        from modules import shared

        return shared.sd_model


class Processed:
    def __init__(self, images):
        self.images = images


def _conds(model, prompt: str, width: int, height: int):
    from modules.prompt_parser import SdConditioning

    if getattr(model, "is_sdxl", False):
        return model.get_learned_conditioning(SdConditioning([prompt], width=width, height=height))
    return model.get_learned_conditioning([prompt])


def _cached(cache: list, key, compute):
    """A1111's get_conds_with_caching: the class-level list is updated in place."""
    if cache[0] == key:
        return cache[1]
    cache[0], cache[1] = key, compute()
    return cache[1]


def process_images(p: StableDiffusionProcessingTxt2Img) -> Processed:
    import networks

    from modules import paths, sd_models, shared

    if p.sampler_name not in SAMPLERS:
        raise ValueError(f"sampler not found: {p.sampler_name}")
    sd_models.reload_model_weights()  # to the checkpoint the settings name (a swap if they name another)
    tags = re.findall(r"<lora:([^:>]+)[^>]*>", p.prompt)
    prompt = re.sub(r"<lora:[^>]*>", "", p.prompt)
    if not p.disable_extra_networks:
        networks.load_networks(tags)
    calls.append({"prompt": prompt, "sampler": p.sampler_name, "steps": p.steps, "seed": p.seed, "size": (p.width, p.height),
                  "extra_networks": not p.disable_extra_networks, "scripts": p.scripts})
    state = shared.state
    state.job, state.job_count, state.job_no = "Batch 1 out of 1", 1, 0
    state.sampling_steps, state.textinfo = p.steps, "fake txt2img"
    Path(paths.data_path, "params.txt").write_text(f"{p.prompt}\nSteps: {p.steps}", encoding="utf-8")
    model = p.sd_model
    model.alphas_cumprod = model.alphas_cumprod.clone()  # A1111 re-derives it per generation
    with torch.no_grad():
        c = _cached(StableDiffusionProcessing.cached_c, prompt, lambda: _conds(model, prompt, p.width, p.height))
        uc = _cached(StableDiffusionProcessing.cached_uc, p.negative_prompt,
                     lambda: _conds(model, p.negative_prompt, p.width, p.height))
        torch.manual_seed(p.seed)  # A1111 draws its noise from the global generator
        ac = model.alphas_cumprod.double()
        ts = torch.linspace(999, 0, p.steps).round().long()
        sigmas = torch.cat([((1 - ac[ts]) / ac[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])
        x = torch.randn(1, 4, p.height // 8, p.width // 8, dtype=torch.float64) * sigmas[0]
        for i, t in enumerate(ts):
            x_t = (x / (sigmas[i] ** 2 + 1).sqrt()).float()
            e_c = model.apply_model(x_t, t.repeat(1), c).double()
            e_u = model.apply_model(x_t, t.repeat(1), uc).double()
            x = x + (sigmas[i + 1] - sigmas[i]) * (e_u + p.cfg_scale * (e_c - e_u))
            state.sampling_step = i + 1
        pixels = model.decode_first_stage(x.float())[0].clamp(-1, 1)
    array = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Processed([Image.fromarray(array)])
