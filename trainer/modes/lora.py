"""LoRA: learn the user's images with the denoising objective.

Each step takes a same-bucket batch of cached latents, noises them at timesteps drawn from
[min, max), and trains the adapters so the U-Net predicts the noise (or v for v-models) under the
images' captions. Text-encoder adapters train too when BASE is selected; otherwise caption
encodings are computed once.
"""

from __future__ import annotations

import json

import torch

from trainer.data import BucketBatcher, CaptionAugment
from trainer.modes.common import NoiseControls, save_steps
from trainer.modes.dataset import dataset_metadata, plan_lora_data, plan_steps
from trainer.modes.setup import (
    CaptionEncoder,
    ModeOutcome,
    RunContext,
    build_adapters,
    encode_dataset_images,
    finish,
    run_pass,
    train_text_encoder,
)
from trainer.paths import folder_name
from trainer.report import MAX_IMAGES, caption_neighbours, neighbour_prompts, run_probe


def planned_suffixes(s) -> list[str]:
    return [""] + [f"_{k}steps" for k in sorted(save_steps(int(s.train_iterations), int(s.save_per_steps)))]


def load_dataset(ctx: RunContext, s):
    """Scan, plan (buckets, sub-images, mirrors, repeats, masks, reg images) and encode the image folder;
    the run's length goes to the log first."""
    plan = ctx.dataset if ctx.dataset is not None else plan_lora_data(s, ctx.note)
    ctx.events.info(plan_steps(s, plan, world_size=ctx.world_size).line())
    return plan, encode_dataset_images(ctx, plan)


def caption_augment(ctx: RunContext, s, captions: list[str]) -> CaptionAugment:
    """The run's caption controls; notes captions that ``keep_tokens`` leaves nothing to shuffle in."""
    augment = CaptionAugment.from_settings(s, ctx.seed, ctx.rank)
    short, example = augment.short_captions(captions)
    if short:
        ctx.note(f"keep_tokens: {short} caption(s) have no more than {augment.keep_tokens} tag(s) after the trigger "
                 f"word (e.g. '{example}'), so nothing in them is shuffled or dropped; lower keep_tokens")
    return augment


def lora_probe(s, plan):
    """The report card's inputs: the first training images (not reg), their captions, and as neighbours
    the built-in set plus captions without the trigger word."""
    own = list({x.path: x for x in plan.samples if not x.is_reg and not x.is_sub and not x.mirrored}.values())[:MAX_IMAGES]
    captions = [x.caption for x in own]
    extra = caption_neighbours([x.caption for x in plan.samples], str(s.lora_trigger_word))
    return run_probe(s, "images", images=[str(x.path.resolve()) for x in own], captions=captions,
                     neighbours=neighbour_prompts(s.report_neighbours, exclude=tuple(captions), extra=extra))


def run(ctx: RunContext) -> ModeOutcome:
    s, bundle = ctx.settings, ctx.bundle
    plan, data = load_dataset(ctx, s)
    batcher = ctx.track("batcher", BucketBatcher(data, int(s.train_batch_size), ctx.seed, ctx.rank, ctx.world_size))
    bundle.offload("vae")
    train_te = train_text_encoder(s)
    # build adapters before caching captions: with BASE the text encoder runs with its adapters every step
    network = build_adapters(ctx, s, resume=s.network_resume)
    captions = [c for b in data.buckets for c in b.captions]
    # the keep_tokens note looks at training captions only: reg captions are short class names by design
    augment = caption_augment(ctx, s, [x.caption for x in plan.samples if not x.is_reg])
    encode = CaptionEncoder(bundle, captions, augment, train_te=train_te)
    if not encode.per_step:
        bundle.offload("text_encoders")
    bundle.set_gradient_checkpointing(bool(s.use_gradient_checkpointing))
    gen, loss_fn, noise, objective = ctx.generator(1), ctx.loss_fn(s), NoiseControls.from_settings(s), ctx.objective
    lo, hi, fixed = int(s.train_min_timesteps), int(s.train_max_timesteps), bool(s.train_fixed_timsteps_in_batch)
    masked, reg = bool(s.masked_loss), any(x.is_reg for x in plan.samples)
    prior = float(s.prior_loss_weight)

    def loss_step(step: int) -> torch.Tensor:
        ref = next(batcher)
        batch = data.gather(ref.bucket_index, list(ref.indices), bundle.device)  # this batch only to the device
        x0 = batch.latents
        eps = noise.like(x0, gen, x0.dtype)
        t = objective.sample_t(x0.shape[0], lo, hi, fixed_in_batch=fixed, generator=gen, device=x0.device,
                               latent_hw=tuple(x0.shape[-2:]))
        cond = encode(batch.captions, step).with_size(batch.size_ids)  # SDXL: each image's own size and crop
        pred = bundle.predict(objective.noisy(x0, eps, t), t, cond)
        target = objective.target(x0, eps, t)
        # kohya's prior preservation: regularization samples count prior_loss_weight times
        weights = torch.where(batch.is_reg, prior, 1.0) if reg else None
        return loss_fn(pred, target, t, batch.masks if masked else None, weights)

    probe = lora_probe(s, plan)

    counts = {f"{w}x{h}": n for (w, h), n in data.counts().items()}
    train_count = sum(1 for x in plan.samples if not x.is_reg)
    extra = {"ss_tag_frequency": json.dumps({"1": plan.tag_frequency()}), "ss_num_train_images": str(train_count),
             "ss_bucket_info": json.dumps({"buckets": counts}), "traintrain_data": folder_name(s.lora_data_directory)}
    extra.update(dataset_metadata(s, plan, batcher.steps_per_epoch))
    if reg:
        extra["traintrain_reg_data"] = folder_name(s.reg_data_directory)
    sidecar = {"activation_text": s.lora_trigger_word, "preferred_weight": 1.0, "sd_version": bundle.family.name}
    summary = {"images": train_count, "buckets": counts, "epochs": f"{s.train_iterations / batcher.steps_per_epoch:g}"}
    try:
        result, written = run_pass(ctx, s, network, loss_step, epoch=lambda: batcher.current_epoch, summary=summary,
                                   extra=extra, steps_per_epoch=batcher.steps_per_epoch)
        return finish(ctx, s, network, result, written, extra=extra, sidecar=sidecar, probe=probe)
    finally:
        network.detach()
        bundle.set_gradient_checkpointing(False)
