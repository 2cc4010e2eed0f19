"""LoRA: learn the user's images with the denoising objective.

Each step takes a same-bucket batch of cached latents, noises them at timesteps drawn from
[min, max), and trains the adapters so the U-Net predicts the noise (or v for v-models) under the
images' captions. Text-encoder adapters train too when BASE is selected; otherwise caption
encodings are computed once.
"""

from __future__ import annotations

import json

import torch

from trainer.data import BucketBatcher, plan_samples, scan_images
from trainer.effect import measure_effect
from trainer.modes.common import sample_timesteps, save_steps
from trainer.modes.setup import (
    CaptionConds,
    ModeOutcome,
    RunContext,
    build_adapters,
    encode_dataset_images,
    finish,
    plan_kwargs,
    run_pass,
    train_text_encoder,
)


def planned_suffixes(s) -> list[str]:
    return [""] + [f"_{k}steps" for k in sorted(save_steps(int(s.train_iterations), int(s.save_per_steps)))]


def load_dataset(ctx: RunContext, s):
    """Scan, plan (buckets, sub-images, mirrors) and encode the image folder."""
    scan = scan_images(s.lora_data_directory)
    for path, reason in scan.skipped:
        ctx.note(f"skipped {path}: {reason}")
    plan = plan_samples(scan.images, **plan_kwargs(s))
    return plan, encode_dataset_images(ctx, plan)


def run(ctx: RunContext) -> ModeOutcome:
    s, bundle = ctx.settings, ctx.bundle
    plan, data = load_dataset(ctx, s)
    batcher = ctx.track("batcher", BucketBatcher(data, int(s.train_batch_size), ctx.seed, ctx.rank, ctx.world_size))
    bundle.offload("vae")
    train_te = train_text_encoder(s)
    # build adapters before caching captions: with BASE the text encoder runs with its adapters every step
    network = build_adapters(ctx, s, resume=s.network_resume)
    captions = [c for b in data.buckets for c in b.captions]
    conds = None if train_te else CaptionConds(bundle, captions)
    if not train_te:
        bundle.offload("text_encoders")
    bundle.set_gradient_checkpointing(bool(s.use_gradient_checkpointing))
    gen, loss_fn = ctx.generator(1), ctx.loss_fn(s)
    lo, hi, fixed = int(s.train_min_timesteps), int(s.train_max_timesteps), bool(s.train_fixed_timsteps_in_batch)

    def loss_step(step: int) -> torch.Tensor:
        ref = next(batcher)
        batch = data.gather(ref.bucket_index, list(ref.indices))
        x0 = batch.latents
        eps = torch.randn(x0.shape, generator=gen, device=gen.device, dtype=x0.dtype).to(x0.device)
        t = sample_timesteps(x0.shape[0], lo, hi, fixed_in_batch=fixed, generator=gen, device=x0.device)
        cond = bundle.encode_prompts(batch.captions) if train_te else conds.lookup(batch.captions)
        pred = bundle.predict(ctx.noise.add_noise(x0, eps, t), t, cond)
        target = ctx.noise.v_target(x0, eps, t) if bundle.v_pred else eps
        return loss_fn(pred, target, t)

    def probe() -> float:
        first = data.buckets[0]
        cond = bundle.encode_prompts(first.captions[:1]) if train_te else conds.lookup(first.captions[:1])
        return measure_effect(bundle, network, cond, latent_hw=tuple(first.latents.shape[-2:]),
                              autocast=ctx.precision.autocast())

    counts = {f"{w}x{h}": n for (w, h), n in data.counts().items()}
    extra = {"ss_tag_frequency": json.dumps({"1": plan.tag_frequency()}), "ss_num_train_images": str(len(plan.samples)),
             "ss_bucket_info": json.dumps({"buckets": counts}), "traintrain_data": str(s.lora_data_directory)}
    sidecar = {"activation_text": s.lora_trigger_word, "preferred_weight": 1.0, "sd_version": bundle.family.name}
    try:
        result, written = run_pass(ctx, s, network, loss_step, epoch=lambda: batcher.epoch,
                                   summary={"images": len(plan.samples), "buckets": counts}, extra=extra)
        return finish(ctx, s, network, result, written, extra=extra, sidecar=sidecar, effect_probe=probe)
    finally:
        network.detach()
        bundle.set_gradient_checkpointing(False)
