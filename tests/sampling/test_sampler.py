"""The preview loop on an oracle denoiser (exact answers), its schedules, the hook's pure parts and the
isolation of a preview from the training RNG and module flags."""

from __future__ import annotations

import random

import pytest
import torch

from trainer.errors import SettingsError
from trainer.models.bundle import Cond
from trainer.sampling.hook import default_prompt, isolated, preview_multipliers, resolve_prompts, strip
from trainer.sampling.sampler import ddim_timesteps, euler_timesteps, sample_latents
from trainer.settings import Settings, validate


def _alphas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _oracle(ac: torch.Tensor, targets: list[torch.Tensor], v_pred: bool):
    """The ideal denoiser of a point mass at ``targets[row]`` (row = the Cond's first context value)."""

    def predict(x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        a = ac[t].double().view(-1, 1, 1, 1)
        x0 = torch.stack([targets[int(c)] for c in cond.context[:, 0, 0]]).double()
        eps = (x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * x0 if v_pred else eps).float()

    return predict


def _cond(index: int) -> Cond:
    return Cond(torch.full((1, 2, 3), float(index)))


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
@pytest.mark.parametrize("v_pred", [False, True])
def test_the_loop_lands_on_the_data_point_and_guidance_extrapolates(sampler, v_pred):
    ac, gen = _alphas(), torch.Generator().manual_seed(0)
    uncond_x0, cond_x0 = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    predict = _oracle(ac, [uncond_x0, cond_x0], v_pred)
    noise = torch.randn(1, 4, 8, 8, generator=gen)
    kw = dict(alphas_cumprod=ac, noise=noise, steps=5, v_pred=v_pred, sampler=sampler)
    # for a point mass ε is constant along the ODE path, so every step of the loop is exact
    plain = sample_latents(predict, _cond(1), None, cfg_scale=1.0, **kw)
    assert torch.allclose(plain[0], cond_x0, atol=1e-4)
    guided = sample_latents(predict, _cond(1), _cond(0), cfg_scale=3.0, **kw)
    assert torch.allclose(guided[0], uncond_x0 + 3.0 * (cond_x0 - uncond_x0), atol=1e-4)


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_zero_terminal_snr_schedules_sample_finite_latents(sampler):
    """ᾱ reaches 0 at t = 999 (σ = ∞): the loop starts from A1111's floor instead and still lands."""
    from trainer.models.components import compute_alphas_cumprod

    ac = compute_alphas_cumprod({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                 "num_train_timesteps": 1000, "rescale_betas_zero_snr": True}).float()
    assert ac[-1] == 0
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    out = sample_latents(_oracle(ac, [x0], True), _cond(0), None, alphas_cumprod=ac, noise=noise, steps=8,
                         cfg_scale=1.0, v_pred=True, sampler=sampler)
    assert torch.isfinite(out).all() and torch.allclose(out[0], x0, atol=1e-3)


def test_schedules_place_the_steps_like_the_webui_samplers():
    ac = _alphas()
    assert euler_timesteps(ac, 4).tolist() == [999, 666, 333, 0]
    ddim = ddim_timesteps(ac, 20)
    assert ddim[0] == 951 and ddim[-1] == 1 and len(ddim) == 20 and (ddim[:-1] - ddim[1:] == 50).all()
    assert ddim_timesteps(ac, 1).tolist() == [1]


def test_an_unknown_sampler_names_the_field():
    with pytest.raises(SettingsError, match="sample_sampler.*Euler, DDIM"):
        sample_latents(lambda *a: a[0], _cond(0), None, alphas_cumprod=_alphas(), noise=torch.zeros(1, 4, 2, 2),
                       steps=2, cfg_scale=1.0, v_pred=False, sampler="PLMS")


def test_a_bad_prompt_line_is_one_line_naming_the_field_and_the_fix():
    s = Settings.from_layers({"sample_every_n_steps": 10, "sample_prompts": "a cat --s 20\na dog --w wide"})
    problems = [p for p in validate(s) if p.key == "sample_prompts"]
    assert len(problems) == 1
    text = str(problems[0])
    assert "\n" not in text and "line 2" in text and "--w 'wide'" in text and "--w 512" in text


@pytest.mark.parametrize(("mode", "pass_index", "expected"), [
    ("LoRA", 1, (1.0,)), ("iLECO", 1, (-1.0, 0.0, 1.0)), ("Difference", 1, (1.0,)), ("Difference", 2, (-1.0, 0.0, 1.0)),
    ("ADDifT", 1, (-1.0, 0.0, 1.0)), ("Multi-ADDifT", 1, (-1.0, 0.0, 1.0)),
])
def test_slider_modes_preview_a_strip(mode, pass_index, expected):
    assert preview_multipliers(mode, pass_index) == expected


def test_default_prompts_and_sizes_follow_the_run():
    base = {"image_size(height, width)": "96,64", "original prompt": "a cat", "target prompt": "a dog",
            "negative prompt": "blurry", "lora_trigger_word": "sks"}
    ileco = Settings.from_layers(base, {"mode": "iLECO"})
    assert default_prompt(ileco).prompt == "a cat" and default_prompt(ileco).negative == "blurry"
    assert default_prompt(Settings.from_layers(base, {"mode": "ADDifT"})).prompt == "a dog"
    assert default_prompt(Settings.from_layers(base, {"mode": "Difference"})).prompt == "a cat"
    assert default_prompt(Settings.from_layers(base, {"mode": "LoRA"})).prompt == "sks"
    [p] = resolve_prompts(ileco, seed=7)
    assert (p.height, p.width, p.seed, p.steps, p.cfg_scale) == (96, 64, 7, 20, 7.0)
    given = Settings.from_layers(base, {"mode": "LoRA", "sample_prompts": "x --w 32 --d 3\n# note\n\ny --h 16"})
    assert [(p.prompt, p.width, p.height, p.seed) for p in resolve_prompts(given, 7)] == [("x", 32, 96, 3), ("y", 64, 16, 7)]


def test_strip_puts_images_left_to_right():
    from PIL import Image

    images = [Image.new("RGB", (4, 2), (v, 0, 0)) for v in (10, 20, 30)]
    out = strip(images)
    assert out.size == (12, 2) and [out.getpixel((x, 0))[0] for x in (0, 4, 8)] == [10, 20, 30]
    assert strip(images[:1]) is images[0]


def test_isolated_restores_rng_and_module_flags():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    net[1].eval()
    torch.manual_seed(3)
    random.seed(3)
    expected_torch, expected_py = torch.randn(3), random.random()
    torch.manual_seed(3)
    random.seed(3)
    with isolated([net], torch.device("cpu")):
        assert not torch.is_grad_enabled() and not net.training and not net[0].training
        torch.randn(100)  # a host sampler drawing from the global generators
        random.random()
        net.train()
    assert torch.equal(torch.randn(3), expected_torch) and random.random() == expected_py
    assert net.training and net[0].training and not net[1].training


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_reaches_the_oracle_target_with_the_family_shift(shift):
    """The ideal velocity of a point mass at x₀ is (x − x₀)/σ; Euler on it lands on x₀ exactly, and with
    guidance 3 between two targets it lands on the extrapolation uncond + 3·(cond − uncond)."""
    from trainer.modes.objective import FlowSchedule
    from trainer.sampling.sampler import flow_sigmas, sample_flow

    targets = [torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(i))[0] for i in range(2)]

    def predict(x, t, cond):
        x0 = torch.stack([targets[int(c)] for c in cond.context[:, 0, 0]]).double()
        return ((x.double() - x0) / t.double().view(-1, 1, 1, 1)).float()

    sched = FlowSchedule(shift=shift)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(9))
    out = sample_flow(predict, _cond(1), None, noise=noise, steps=6, cfg_scale=1.0, shift=lambda u: sched.apply(u, None))
    assert torch.allclose(out[0], targets[1], atol=1e-5)
    sig = flow_sigmas(4, lambda u: sched.apply(u, None))
    assert float(sig[0]) == 1.0 and float(sig[-1]) == 0.0
    assert float(sig[2]) == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5))
    guided = sample_flow(predict, _cond(1), _cond(0), noise=noise, steps=6, cfg_scale=3.0,
                         shift=lambda u: sched.apply(u, None))
    assert torch.allclose(guided[0], targets[0] + 3 * (targets[1] - targets[0]), atol=1e-4)
