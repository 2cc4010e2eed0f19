"""ADDifT: train the difference between an Original and a Target image directly, with no copier.

Both branches share one noise draw and one timestep. On forward steps the LoRA at +0.25, applied to
the Target's noisy latent, must reproduce the frozen model's prediction on the Original's noisy latent;
on reverse steps the LoRA at −0.25·|diff_alt_ratio| applied to the Original must reproduce the frozen
prediction on the Target. The LoRA so learns a signed direction: at +1 it moves the model's denoised
estimate by about four times the trained Original→Target shift, at −1 the other way. A negative
``diff_alt_ratio`` turns reverse steps into a regulariser on pure noise, and 0 means no reverse pass:
every step is a forward step. Timesteps follow a deterministic schedule over the odd deciles of
[min, max), each used for a forward and a reverse step (once, without a reverse pass).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from trainer.modes.common import NoiseControls, check_timestep_range
from trainer.modes.inputs import check_diff_mask, encode_prompt_pair, load_image_pair
from trainer.modes.setup import ModeOutcome, RunContext, build_adapters, finish, run_pass
from trainer.report import BUILTIN, neighbour_prompts, run_probe

TRAIN_MULTIPLIER = 0.25


def planned_suffixes(s) -> list[str]:
    from trainer.modes.lora import planned_suffixes as lora_suffixes

    return lora_suffixes(s)


def decile_timestep(step: int, lo: int, hi: int) -> int:
    """The deterministic schedule: steps 2k and 2k+1 use lo + span·(2·(k mod 5) + 1), span = (hi − lo)/10.

    min 500, max 1000 → 550, 550, 650, 650, 750, 750, 850, 850, 950, 950, 550, …
    """
    span = (hi - lo) / 10
    even = step - step % 2
    return min(int(lo + span * ((even % 10) + 1)), 999)


def addift_loss(ctx: RunContext, s, network, draw: Callable[[int], tuple]) -> Callable[[int], torch.Tensor]:
    """The shared ADDifT step. ``draw(step)`` returns (x_orig, x_targ, c_orig, c_targ, mask | None)."""
    bundle, loss_fn, gen, objective = ctx.bundle, ctx.loss_fn(s), ctx.generator(1), ctx.objective
    noise = NoiseControls.from_settings(s)  # s: this pass's settings
    lo, hi = int(s.train_min_timesteps), int(s.train_max_timesteps)
    check_timestep_range(lo, hi)
    ratio, revert = float(s.diff_alt_ratio), bool(s.diff_revert_original_target)
    use_mask = bool(s.diff_use_diff_mask)
    # a reverse step at multiplier 0 would skip the adapters (no gradient at all): 0 = no reverse pass
    alternate = ratio != 0

    def loss_step(step: int) -> torch.Tensor:
        x_o, x_t, c_o, c_t, mask = draw(step)
        if revert:
            x_o, x_t, c_o, c_t = x_t, x_o, c_t, c_o
        forward = step % 2 == 0 or not alternate
        slot = step if alternate else 2 * step  # forward-only: each step takes the next decile
        t = objective.at(decile_timestep(slot, lo, hi), x_o.shape[0], x_o.device, tuple(x_o.shape[-2:]))
        eps = noise.like(x_o, gen)
        if ratio < 0 and not forward:
            x_o = x_t = eps  # regulariser: on pure noise the negative LoRA must change nothing
        a_in = objective.noisy(x_o if forward else x_t, eps, t)
        b_in = objective.noisy(x_t if forward else x_o, eps, t)
        with torch.no_grad(), network.scaled(0.0):
            reference = bundle.predict(a_in, t, c_o)
        multiplier = TRAIN_MULTIPLIER if forward else -TRAIN_MULTIPLIER * abs(ratio)
        with network.scaled(multiplier):
            pred = bundle.predict(b_in, t, c_t)
        return loss_fn(pred, reference, t, mask if use_mask else None)

    return loss_step


def addift_probe(s, images: list[str], original: str, target: str, size: tuple[int, int],
                 captions: list[str] | None = None):
    """The report card's inputs: the pair(s) (swapped like training when reverted), the LoRA branch's prompt
    and the frozen branch's prompt; efficacy is per the trained multiplier.

    Args:
        images: Original, Target (Multi-ADDifT: then the further pairs, in the same order).
        captions: Multi-ADDifT: one per image (each pair's own prompts); None uses ``original``/``target``.
    """
    captions = list(captions or [])
    if s.diff_revert_original_target:  # reversing the flat list swaps every pair (and the pairs' order)
        images, captions, original, target = images[::-1], captions[::-1], target, original
    own = (original, target, *captions)
    # weight −1 is a promise only when reverse steps trained it (0: none, negative: a noise regulariser)
    return run_probe(s, "addift", size=size, images=images, prompt=target, target=original, scale=TRAIN_MULTIPLIER,
                     captions=captions, reverse=float(s.diff_alt_ratio) > 0,
                     neighbours=neighbour_prompts(s.report_neighbours, exclude=own, builtin=BUILTIN.get(s.mode)))


def run(ctx: RunContext) -> ModeOutcome:
    s, bundle = ctx.settings, ctx.bundle
    batch = int(s.train_batch_size)
    pair = load_image_pair(ctx, s)
    if s.diff_use_diff_mask:
        check_diff_mask(pair.diff_mask, f"{s.original_image} -> {s.target_image}")
    c_o, c_t = encode_prompt_pair(bundle, s.original_prompt, s.target_prompt)
    bundle.offload("vae")
    bundle.offload("text_encoders")
    bundle.set_gradient_checkpointing(bool(s.use_gradient_checkpointing))
    network = build_adapters(ctx, s, resume=s.diff_load_1st_pass or s.network_resume, text_encoder=False)
    x_o = pair.original.expand(batch, *pair.original.shape[1:])
    x_t = pair.target.expand(batch, *pair.target.shape[1:])
    c_o, c_t, mask = c_o.repeat(batch), c_t.repeat(batch), pair.diff_mask.expand(batch, -1, -1, -1)
    loss_step = addift_loss(ctx, s, network, lambda step: (x_o, x_t, c_o, c_t, mask))

    images = [str(Path(s.original_image).resolve()), str(Path(s.target_image).resolve())]
    probe = addift_probe(s, images, s.original_prompt, s.target_prompt, tuple(pair.size_hw))

    extra = {"traintrain_original_image": Path(s.original_image).name, "traintrain_target_image": Path(s.target_image).name,
             "traintrain_original_prompt": s.original_prompt, "traintrain_target_prompt": s.target_prompt,
             "traintrain_timesteps": f"{s.train_min_timesteps},{s.train_max_timesteps}",
             "traintrain_revert": str(bool(s.diff_revert_original_target)),
             "traintrain_image_size": "x".join(map(str, pair.size_hw))}
    sidecar = {"activation_text": s.lora_trigger_word, "preferred_weight": 1.0, "sd_version": bundle.family.name}
    try:
        result, written = run_pass(ctx, s, network, loss_step, summary={"pair": "x".join(map(str, pair.size_hw))}, extra=extra)
        return finish(ctx, s, network, result, written, extra=extra, sidecar=sidecar, probe=probe)
    finally:
        network.detach()
        bundle.set_gradient_checkpointing(False)
