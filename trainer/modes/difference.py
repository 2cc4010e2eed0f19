"""Difference (copy-machine): a copier LoRA learns the Original image, then a second LoRA learns the Target
on top of it, so the second LoRA holds only what differs.

Pass 1 trains the copier with the denoising objective on the Original's latent (or loads a saved
copier from ``diff_load_1st_pass``). Pass 2 keeps the copier attached at multiplier 1, frozen, and
trains a new LoRA on the Target's latent with the same prompt. Only the pass-2 LoRA is the result.
Both passes are conditioned on the Original prompt (an explicit setting; empty = unconditional).
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.errors import InputError, SettingsError
from trainer.modes.common import NoiseControls, check_timestep_range, save_steps
from trainer.modes.inputs import encode_prompt_pair, load_image_pair
from trainer.modes.resume import read_state
from trainer.modes.setup import ModeOutcome, RunContext, build_adapters, finish, run_pass, save_network
from trainer.report import neighbour_prompts, run_probe


def planned_suffixes(s) -> list[str]:
    total, every = int(s.train_iterations), int(s.save_per_steps)
    suffixes = [""] + [f"_{k}steps" for k in sorted(save_steps(total, every))]
    if (s.diff_save_1st_pass or s.diff_1st_pass_only) and not s.diff_load_1st_pass:
        suffixes.append("_copy")
    return suffixes


def resolve_copier(ctx: RunContext, value: str) -> Path:
    """A path, or a LoRA file name (``.safetensors`` optional) inside the output folder.

    Raises:
        InputError: no such file.
    """
    path = Path(value)
    if path.is_file():
        return path
    name = value if value.endswith(".safetensors") else f"{value}.safetensors"
    matches = sorted(ctx.out.lora_dir.rglob(Path(name).name))
    if not matches:
        raise InputError("diff_load_1st_pass", f"'{value}' was not found in {ctx.out.lora_dir}; give the copier's file path")
    return matches[0]


def denoise_loss(ctx: RunContext, s, latent: torch.Tensor, cond, gen: torch.Generator):
    """A loss_step that trains the denoising objective on one latent repeated over the batch."""
    bundle, loss_fn, noise = ctx.bundle, ctx.loss_fn(s), NoiseControls.from_settings(s)  # s: this pass's
    batch = int(s.train_batch_size)
    lo, hi, fixed = int(s.train_min_timesteps), int(s.train_max_timesteps), bool(s.train_fixed_timsteps_in_batch)
    check_timestep_range(lo, hi)
    x0, cond, objective = latent.expand(batch, *latent.shape[1:]), cond.repeat(batch), ctx.objective

    def loss_step(step: int) -> torch.Tensor:
        eps = noise.like(x0, gen)
        t = objective.sample_t(batch, lo, hi, fixed_in_batch=fixed, generator=gen, device=x0.device,
                               latent_hw=tuple(x0.shape[-2:]))
        pred = bundle.predict(objective.noisy(x0, eps, t), t, cond)
        return loss_fn(pred, objective.target(x0, eps, t), t)

    return loss_step


def run(ctx: RunContext) -> ModeOutcome:
    s, bundle = ctx.settings, ctx.bundle
    # a pass-1 state resumes the copier; a pass-2 state carries the trained copier and resumes pass 2
    state = read_state(s.train_resume_state) if s.train_resume_state else None
    resume_pass = state["pass_index"] if state else 0
    pair = load_image_pair(ctx, s)
    cond, _ = encode_prompt_pair(bundle, s.original_prompt, s.target_prompt)
    bundle.offload("vae")
    bundle.offload("text_encoders")  # conditioning is precomputed: only U-Net adapters train here
    bundle.set_gradient_checkpointing(bool(s.use_gradient_checkpointing))
    extra = {"traintrain_original_image": Path(s.original_image).name, "traintrain_target_image": Path(s.target_image).name,
             "traintrain_original_prompt": s.original_prompt, "traintrain_image_size": "x".join(map(str, pair.size_hw))}
    networks = []
    try:
        if resume_pass == 2:
            copier, outcome = _copier_from_state(ctx, s, state), None
        else:
            copier, outcome = _copier(ctx, s, pair, cond, extra)
        networks.append(copier)
        if outcome is not None:
            return outcome
        s2 = s.for_pass(2)
        ctx2 = ctx.for_pass(s2)  # pass 2's own seed, adapter precision (and checkpointing below)
        _note_job_wide(ctx, s)
        ctx2.frozen_networks["copier"] = copier
        bundle.set_gradient_checkpointing(bool(s2.use_gradient_checkpointing))
        with copier.frozen():  # the copier stays attached at multiplier 1 and receives no gradient
            copier.set_multiplier(1.0)
            diff = build_adapters(ctx2, s2, seed_offset=1, text_encoder=False)
            networks.append(diff)
            gen = ctx2.generator(2)  # pass 2 draws its own noise stream from its seed
            result, written = run_pass(ctx2, s2, diff, denoise_loss(ctx2, s2, pair.target, cond, gen), pass_index=2,
                                       summary={"pass": "difference"}, extra=extra,
                                       resume=s.train_resume_state if resume_pass == 2 else "")

            # measured without the copier: it is not in the file, and check measures the file alone
            probe = run_probe(s2, "pair", size=tuple(pair.size_hw), prompt=s.original_prompt,
                              images=[str(Path(s.original_image).resolve()), str(Path(s.target_image).resolve())],
                              neighbours=neighbour_prompts(s.report_neighbours, exclude=(s.original_prompt,)))

            sidecar = {"activation_text": "", "preferred_weight": 1.0, "sd_version": bundle.family.name}
            return finish(ctx2, s2, diff, result, written, extra=extra, sidecar=sidecar, probe=probe,
                          isolate=lambda: copier.scaled(0.0))
    finally:
        for network in reversed(networks):
            network.detach()
        bundle.set_gradient_checkpointing(False)


def _note_job_wide(ctx: RunContext, s) -> None:
    """Say so when pass-2 values of job-wide settings differ (they have no pass-2 mark in the table)."""
    if s.pass2 is None or not s.pass2.use_2nd_pass_settings:
        return
    for key, why in (("train_model_precision", "the model is loaded once per job"),
                     ("model_v_pred", "the model is loaded once per job"),
                     ("save_overwrite", "the job's files are planned once, before pass 1")):
        if s.pass2.raw[key] != s.raw[key]:
            ctx.note(f"2nd pass {key} = {s.pass2.raw[key]} is not used: {why}, with {key} = {s.raw[key]}")


def _copier_from_state(ctx: RunContext, s, state):
    """The trained copier saved in a pass-2 resume state (pass 1 is not run again)."""
    if "copier" not in state.get("frozen", {}):
        raise SettingsError("train_resume_state", "this pass-2 state holds no copier; resume from a newer state file")
    copier = build_adapters(ctx, s, text_encoder=False)
    copier.load_state_dict(state["frozen"]["copier"], strict=True)
    ctx.events.info("copier restored from the resume state; pass 1 skipped")
    return copier


def _copier(ctx: RunContext, s, pair, cond, extra):
    """Pass 1: load or train the copier. Returns (copier, outcome-if-the-job-ends-here)."""
    if s.diff_load_1st_pass:
        from trainer.network import network_from_file

        path = resolve_copier(ctx, s.diff_load_1st_pass)
        copier = network_from_file(ctx.bundle, path, trained=True)  # as trained: no baked-in strength
        copier.attach()
        ctx.events.info(f"copier loaded from {path}: {copier.summary()}; pass 1 skipped")
        return copier, None
    copier = build_adapters(ctx, s, text_encoder=False)
    result, written = run_pass(ctx, s, copier, denoise_loss(ctx, s, pair.original, cond, ctx.generator(1)),
                               suffix="_copy", csv_suffix="_copy", summary={"pass": "copier"}, extra=extra,
                               resume=s.train_resume_state)
    ctx.files.extend((p, None) for p in written)
    if result.status != "done":
        return copier, ModeOutcome(result.status, Path(result.last_save) if result.last_save else None, result.steps,
                                   result.final_loss, list(ctx.files), None, list(ctx.notes))
    if s.diff_1st_pass_only:  # the copier is the result: it gets the card (a LoRA of the Original image)
        probe = run_probe(s, "images", size=tuple(pair.size_hw), images=[str(Path(s.original_image).resolve())],
                          captions=[s.original_prompt],
                          neighbours=neighbour_prompts(s.report_neighbours, exclude=(s.original_prompt,)))
        return copier, finish(ctx, s, copier, result, [], suffix="_copy", extra=extra, probe=probe)
    if s.diff_save_1st_pass:
        copy_path = save_network(ctx, s, copier, ctx.out.path("_copy"), steps=result.steps, extra=extra)
        ctx.files.append((copy_path, None))
    return copier, None
