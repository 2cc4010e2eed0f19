"""The flow-matching DiT families on their tiny built-ins: objective, every mode's promise, saved keys.

Predictions here are velocities v̂ = ε̂ − x̂₀; the denoised estimate is x̂₀ = x_σ − σ·v̂.
"""

from __future__ import annotations

import pytest
import torch

from trainer.errors import SettingsError
from trainer.modes.objective import DDPMObjective, FlowObjective, FlowSchedule
from trainer.network import network_from_file

from .conftest import fixed_noise

# Z-Image/Anima need diffusers >= 0.42 (0.37's Z-Image transformer gives NaN; trainer/models/dit.py refuses it)
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in __import__("diffusers").__version__.split(".")[:2]) < (0, 42),
    reason="Z-Image/Anima need diffusers >= 0.42")


MODELS = ("tiny-zimage", "tiny-anima")
SIGMAS = torch.tensor([0.2, 0.4, 0.6, 0.8])


# -- the objective --------------------------------------------------------------------------------


def test_flow_objective_path_target_and_shift():
    obj = FlowObjective(FlowSchedule(shift=3.0), "uniform")
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.0, 1.0])
    noisy = obj.noisy(x0, eps, sigma)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[1], eps[1])
    assert torch.equal(obj.target(x0, eps, sigma), eps - x0)
    # s·σ/(1+(s−1)σ) with s = 3: 0.5 → 0.75; the decile timestep 500 of ADDifT lands there too
    assert obj.at(500, 2, torch.device("cpu")).tolist() == pytest.approx([0.75, 0.75])
    gen = torch.Generator().manual_seed(0)
    drawn = obj.sample_t(4000, 200, 600, fixed_in_batch=False, generator=gen, device=torch.device("cpu"))
    assert 0.2 <= float(drawn.min()) and float(drawn.max()) <= 0.6
    assert float(drawn.mean()) > 0.4 + 0.05  # the shift pushes σ up (unshifted mean would be 0.4)
    fixed = obj.sample_t(3, 0, 1000, fixed_in_batch=True, generator=gen, device=torch.device("cpu"))
    assert fixed.unique().numel() == 1


@pytest.mark.parametrize("sampling", ["uniform", "sigmoid", "logit_normal"])
def test_flow_sampling_spreads(sampling):
    obj = FlowObjective(FlowSchedule(shift=1.0), sampling)
    drawn = obj.sample_t(4000, 0, 1000, fixed_in_batch=False, generator=torch.Generator().manual_seed(1),
                         device=torch.device("cpu"))
    assert abs(float(drawn.mean()) - 0.5) < 0.03
    # uniform spreads most, sigmoid(N(0,1)) concentrates in the middle
    assert (float(drawn.std()) > 0.27) == (sampling == "uniform")


def test_resolution_dependent_shift_grows_with_tokens():
    sched = FlowSchedule(dynamic=True)
    assert sched.shift_for((32, 32)) == pytest.approx(torch.e ** 0.5, rel=1e-6)  # 256 tokens: base_shift
    assert sched.shift_for((128, 128)) == pytest.approx(torch.e ** 1.15, rel=1e-6)  # 4096 tokens: max_shift
    assert FlowSchedule(shift=3.0).shift_for((128, 128)) == 3.0


def test_ddpm_objective_is_the_old_forward_process():
    from trainer.modes.common import NoiseSchedule

    sched = NoiseSchedule(torch.linspace(0.999, 0.01, 1000))
    obj = DDPMObjective(sched, v_pred=True)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(obj.noisy(x0, eps, t), sched.add_noise(x0, eps, t))
    assert torch.equal(obj.target(x0, eps, t), sched.v_target(x0, eps, t))


# -- modes on the tiny DiTs ---------------------------------------------------------------------------


def _attached(bundle, path):
    network = network_from_file(bundle, path)
    network.attach()
    return network


def _predict(bundle, network, x, cond, m, sigmas=SIGMAS):
    with torch.no_grad(), network.scaled(m):
        return bundle.predict(x, sigmas[: x.shape[0]], cond)


@pytest.mark.parametrize("model", MODELS)
def test_lora_lowers_its_loss(trainer, image_folder, model):
    result = trainer.run(mode="LoRA", model=model, save_lora_name="l", train_iterations=12, train_learning_rate="1e-2",
                         lora_data_directory=str(image_folder), train_snr_gamma=0)
    assert result["status"] == "done"
    bundle = trainer.bundle(model)
    from .test_lora_mode import _pixels

    x0 = bundle.encode_images(torch.stack([_pixels(p) for p in sorted(image_folder.glob("*.png"))]),
                              torch.Generator().manual_seed(0))
    eps = fixed_noise(x0.shape, seed=5)
    cond = bundle.encode_prompts(["a shape"]).repeat(4)
    noisy = (1 - SIGMAS.view(-1, 1, 1, 1)) * x0 + SIGMAS.view(-1, 1, 1, 1) * eps
    network = _attached(bundle, result["lora_path"])
    try:
        before = (_predict(bundle, network, noisy, cond, 0.0) - (eps - x0)).pow(2).mean()
        after = (_predict(bundle, network, noisy, cond, 1.0) - (eps - x0)).pow(2).mean()
    finally:
        network.detach()
    assert after < 0.9 * before, (float(before), float(after))


@pytest.mark.parametrize("model", MODELS)
def test_ileco_moves_the_original_prompt_to_the_base_target(trainer, model):
    result = trainer.run(mode="iLECO", model=model, save_lora_name="i", train_iterations=40, train_learning_rate="5e-3",
                         ileco_fixed_noise=False, train_snr_gamma=0, **{"original prompt": "a cat", "target prompt": "a dog"})
    assert result["status"] == "done"
    bundle = trainer.bundle(model)
    network = _attached(bundle, result["lora_path"])
    try:
        z = fixed_noise((4, 16, 8, 8), seed=77)
        c_o, c_t = (bundle.encode_prompts([p]).repeat(4) for p in ("a cat", "a dog"))
        goal = _predict(bundle, network, z, c_t, 0.0)
        before = (_predict(bundle, network, z, c_o, 0.0) - goal).pow(2).mean()
        after = (_predict(bundle, network, z, c_o, 1.0) - goal).pow(2).mean()
    finally:
        network.detach()
    assert after <= 0.5 * before, (float(before), float(after))


def _pair_latents(bundle, pair):
    from .test_lora_mode import _pixels

    x = bundle.encode_images(torch.stack([_pixels(p) for p in pair]), torch.Generator().manual_seed(0))
    return [t.expand(4, -1, -1, -1) for t in x.split(1)]


@pytest.mark.parametrize("model", MODELS)
def test_addift_is_a_signed_slider(trainer, image_pair, model):
    orig, targ = image_pair
    result = trainer.run(mode="ADDifT", model=model, save_lora_name="a", train_iterations=30, train_learning_rate="2e-3",
                         train_batch_size=1, train_min_timesteps=200, train_max_timesteps=800, train_snr_gamma=0,
                         **{"original image": str(orig), "target image": str(targ)})
    assert result["status"] == "done"
    bundle = trainer.bundle(model)
    x_o, x_t = _pair_latents(bundle, (orig, targ))
    # held-out noise at σ between the trained deciles (shift 3 moves 0.2…0.8 to 0.43…0.92)
    sig = FlowSchedule(shift=3.0).apply(torch.tensor([0.3, 0.4, 0.6, 0.7]), None)
    eps, s = fixed_noise(x_o.shape, seed=31), sig.view(-1, 1, 1, 1)
    a_in, b_in = (1 - s) * x_o + s * eps, (1 - s) * x_t + s * eps
    cond = bundle.encode_prompts([""]).repeat(4)
    network = _attached(bundle, result["lora_path"])
    try:
        base = _predict(bundle, network, a_in, cond, 0.0, sig)
        seen = base - _predict(bundle, network, b_in, cond, 0.0, sig)
        shifts = {m: float(((_predict(bundle, network, a_in, cond, m, sig) - base) * seen).sum())
                  for m in (1.0, -1.0, 0.25, -0.25)}
    finally:
        network.detach()
    assert shifts[0.25] > 0 > shifts[-0.25], shifts  # the trained strengths move with the sign
    assert shifts[1.0] > shifts[-1.0], shifts


@pytest.mark.parametrize("model", MODELS)
def test_difference_moves_the_original_towards_the_target(trainer, image_pair, model):
    orig, targ = image_pair
    result = trainer.run(mode="Difference", model=model, save_lora_name="d", train_iterations=40, train_learning_rate="1e-2",
                         train_batch_size=2, train_snr_gamma=0, **{"original image": str(orig), "target image": str(targ)})
    assert result["status"] == "done"
    bundle = trainer.bundle(model)
    x_o, x_t = _pair_latents(bundle, (orig, targ))
    eps, s = fixed_noise(x_o.shape, seed=9), SIGMAS.view(-1, 1, 1, 1)
    noisy = (1 - s) * x_o + s * eps
    cond = bundle.encode_prompts([""]).repeat(4)
    network = _attached(bundle, result["lora_path"])
    try:  # x̂₀ = x_σ − σ·v̂
        shift = (noisy - s * _predict(bundle, network, noisy, cond, 1.0)) - (noisy - s * _predict(bundle, network, noisy, cond, 0.0))
    finally:
        network.detach()
    assert float((shift * (x_t - x_o)).sum()) > 0


@pytest.mark.parametrize("model", MODELS)
def test_multi_addift_trains(trainer, tmp_path, model):
    from .test_mode_effects import _pairs

    folder = _pairs(tmp_path / "pairs", count=2)
    result = trainer.run(mode="Multi-ADDifT", model=model, save_lora_name="m", train_iterations=6,
                         train_learning_rate="1e-3", train_snr_gamma=0, lora_data_directory=str(folder),
                         diff_target_name="_after")
    assert result["status"] == "done" and result["steps"] == 6
    card = result["report"]
    assert not card["failed"] and card["change"] > 1e-4


def test_flow_refuses_noise_offset(trainer, image_folder):
    with pytest.raises(SettingsError, match="noise_offset"):
        trainer.run(mode="LoRA", model="tiny-zimage", save_lora_name="n", train_iterations=2,
                    lora_data_directory=str(image_folder), noise_offset=0.05)


def test_flow_refuses_v_prediction(trainer, image_folder):
    with pytest.raises(SettingsError, match="model_v_pred: a flow-matching model already predicts the velocity"):
        trainer.run(mode="LoRA", model="tiny-anima", save_lora_name="v", train_iterations=2,
                    lora_data_directory=str(image_folder), train_snr_gamma=0, model_v_pred=True)


# -- the flow settings ----------------------------------------------------------------------------------


def _settings(**values):
    from trainer.settings import Settings

    from .conftest import BASE

    return Settings.from_layers(BASE, {"mode": "LoRA", **values})


def _draws(objective, latent_hw=(128, 128)) -> torch.Tensor:
    return objective.sample_t(4000, 0, 1000, fixed_in_batch=False, generator=torch.Generator().manual_seed(2),
                              device=torch.device("cpu"), latent_hw=latent_hw)


def test_flow_settings_replace_the_familys_sampling_and_shift():
    from types import SimpleNamespace

    from trainer.modes.objective import objective_for

    bundle = SimpleNamespace(flow=FlowSchedule(shift=3.0), flow_sampling="logit_normal")
    family = objective_for(bundle, _settings())
    assert (family.sampling, family.schedule.shift) == ("logit_normal", 3.0)
    assert float(_draws(family).mean()) > 0.65  # shift 3 moves the centred draws up (0.5 → 0.75 at the median)
    plain = objective_for(bundle, _settings(flow_timestep_sampling="uniform", flow_shift=1))
    drawn = _draws(plain)
    assert abs(float(drawn.mean()) - 0.5) < 0.03 and float(drawn.std()) > 0.27  # unshifted uniform
    # a set shift is constant: it replaces a resolution-dependent one (e^1.15 ≈ 3.16 at 4096 tokens)
    dynamic = SimpleNamespace(flow=FlowSchedule(dynamic=True), flow_sampling="logit_normal")
    assert objective_for(dynamic, _settings()).schedule.shift_for((128, 128)) == pytest.approx(3.158, abs=1e-3)
    assert objective_for(dynamic, _settings(flow_shift=2)).schedule.shift_for((128, 128)) == 2.0


@pytest.mark.parametrize(("key", "value"), [("flow_timestep_sampling", "uniform"), ("flow_shift", 3.0)])
def test_ddpm_models_refuse_the_flow_settings(key, value):
    from types import SimpleNamespace

    from trainer.modes.objective import objective_for

    sd = SimpleNamespace(alphas_cumprod=torch.linspace(0.999, 0.01, 1000), v_pred=False)
    assert isinstance(objective_for(sd, _settings()), DDPMObjective)  # the defaults leave SD as it was
    with pytest.raises(SettingsError, match=f"^{key}: .* applies to flow-matching models"):
        objective_for(sd, _settings(**{key: value}))


def test_a_run_trains_with_the_chosen_flow_settings(trainer, image_folder, monkeypatch):
    seen = []
    original = FlowObjective.__init__

    def spy(self, schedule, sampling="logit_normal", **kwargs):
        seen.append((schedule.shift, sampling))
        original(self, schedule, sampling, **kwargs)

    monkeypatch.setattr(FlowObjective, "__init__", spy)
    result = trainer.run(mode="LoRA", model="tiny-anima", save_lora_name="f", train_iterations=2, train_snr_gamma=0,
                         lora_data_directory=str(image_folder), flow_shift=1.5, flow_timestep_sampling="uniform",
                         effect_check=False)
    assert result["status"] == "done" and seen == [(1.5, "uniform")]


@pytest.mark.parametrize("model", MODELS)
def test_slider_previews_use_the_flow_sampler(trainer, model, monkeypatch):
    import trainer.sampling.render as render

    calls = []
    original = render.sample_flow

    def spy(*args, **kwargs):
        calls.append(kwargs["shift"](torch.tensor([0.5], dtype=torch.float64)).item())
        return original(*args, **kwargs)

    monkeypatch.setattr(render, "sample_flow", spy)
    result = trainer.run(mode="iLECO", model=model, save_lora_name="pv", train_iterations=2, train_batch_size=1,
                         train_snr_gamma=0, sample_every_n_steps=2, sample_prompts="a cat --s 2",
                         **{"original prompt": "a cat", "target prompt": "a dog"})
    events = result["history"].previews
    assert [len(e.multipliers) for e in events] == [3]  # the −1/0/+1 strip
    from PIL import Image

    assert Image.open(events[0].path).size == (64 * 3, 64)
    assert calls == [pytest.approx(0.75)] * 3  # shift 3 from the family's scheduler config, one run per strength
