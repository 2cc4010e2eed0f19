"""iLECO (instant LECO): make the model answer the Original prompt as the base model answers the Target.

Each step draws timesteps and compares, on a noise latent (fresh each step unless ``ileco_fixed_noise``), the adapted U-Net's prediction
for the Original prompt with the un-adapted U-Net's prediction (adapters at multiplier 0, no
gradients) for the Target prompt. An empty Target erases the concept; the Negative prompt is stored
but not trained on. No images are needed.
"""

from __future__ import annotations

import json

import torch

from trainer.modes.common import check_timestep_range
from trainer.modes.inputs import encode_prompt_pair
from trainer.modes.setup import ModeOutcome, RunContext, build_adapters, finish, run_pass, train_text_encoder
from trainer.report import neighbour_prompts, run_probe


def planned_suffixes(s) -> list[str]:
    from trainer.modes.lora import planned_suffixes as lora_suffixes

    return lora_suffixes(s)


def run(ctx: RunContext) -> ModeOutcome:
    s, bundle = ctx.settings, ctx.bundle
    lo, hi = int(s.train_min_timesteps), int(s.train_max_timesteps)
    check_timestep_range(lo, hi)
    batch = int(s.train_batch_size)
    height, width = s.image_size  # (height, width) in that order: portrait latents are possible (§17 #11)
    factor = bundle.vae_scale_factor
    bundle.offload("vae")
    train_te = train_text_encoder(s)
    network = build_adapters(ctx, s)  # before encoding: the base target is always taken at multiplier 0
    with network.scaled(0.0):
        original, target = encode_prompt_pair(bundle, s.original_prompt, s.target_prompt)
    target = target.repeat(batch)
    fixed_original = None if train_te else original.repeat(batch)
    if not train_te:
        bundle.offload("text_encoders")
    bundle.set_gradient_checkpointing(bool(s.use_gradient_checkpointing))
    gen, loss_fn = ctx.generator(1), ctx.loss_fn(s)
    # pure-noise inputs at every timestep (no denoising loop); by default fresh noise each step: the
    # reference's single fixed latent generalised worse on held-out noise (see the setting's help)
    channels = getattr(bundle, "latent_channels", 4)
    z = torch.randn((batch, channels, height // factor, width // factor), generator=gen, device=gen.device).to(bundle.device)

    fixed_noise = bool(s.ileco_fixed_noise)
    # prompts the LoRA must leave alone: their base predictions are a second target, one prompt per step
    keep_prompts = [line.strip() for line in (s.ileco_keep_prompts or "").splitlines() if line.strip()]
    keep_weight = float(s.ileco_keep_weight)
    if keep_prompts:
        with torch.no_grad(), network.scaled(0.0):
            keep_conds = [c.repeat(batch) for c in (bundle.encode_prompts([p]) for p in keep_prompts)]

    def loss_step(step: int) -> torch.Tensor:
        noise = z if fixed_noise else torch.randn(z.shape, generator=gen, device=gen.device).to(z.device)
        t = ctx.objective.sample_t(batch, lo, hi, fixed_in_batch=False, generator=gen, device=z.device,
                                   latent_hw=tuple(z.shape[-2:]))
        with torch.no_grad(), network.scaled(0.0):
            goal = bundle.predict(noise, t, target)
        cond = bundle.encode_prompts([s.original_prompt] * batch) if train_te else fixed_original
        loss = loss_fn(bundle.predict(noise, t, cond), goal, t)
        if keep_prompts:
            i = step % len(keep_prompts)
            keep = bundle.encode_prompts([keep_prompts[i]] * batch) if train_te else keep_conds[i]
            with torch.no_grad(), network.scaled(0.0):
                kept = bundle.predict(noise, t, keep_conds[i])
            loss = loss + keep_weight * loss_fn(bundle.predict(noise, t, keep), kept, t)
        return loss

    probe = run_probe(s, "prompt", prompt=s.original_prompt, target=s.target_prompt, fixed_noise=fixed_noise,
                      neighbours=neighbour_prompts(s.report_neighbours, exclude=(s.original_prompt, s.target_prompt)))
    extra = {
        "traintrain_original_prompt": s.original_prompt, "traintrain_target_prompt": s.target_prompt,
        "traintrain_negative_prompt": s.negative_prompt, "traintrain_timesteps": f"{lo},{hi}",
        "traintrain_keep_prompts": "\n".join(keep_prompts),
        "ss_tag_frequency": json.dumps({"1": {p: 1 for p in (s.original_prompt, s.target_prompt) if p}}),
    }
    sidecar = {"activation_text": s.original_prompt, "preferred_weight": 1.0, "sd_version": bundle.family.name}
    try:
        result, written = run_pass(ctx, s, network, loss_step, summary={"latent": f"{height}x{width}"}, extra=extra)
        return finish(ctx, s, network, result, written, extra=extra, sidecar=sidecar, probe=probe)
    finally:
        network.detach()
        bundle.set_gradient_checkpointing(False)
