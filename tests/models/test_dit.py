"""DiTBundle's conventions, checked against diffusers' own pipeline arithmetic, and the tiny VAEs' posterior."""

from __future__ import annotations

import pytest
import torch

from trainer.models.diffusers_runtime import load_bundle

# Z-Image/Anima need diffusers >= 0.42 (0.37's Z-Image transformer gives NaN; trainer/models/dit.py refuses it)
pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in __import__("diffusers").__version__.split(".")[:2]) < (0, 42),
    reason="Z-Image/Anima need diffusers >= 0.42")


def _pattern(seed: int) -> torch.Tensor:
    """A (1, 3, 64, 64) image in [-1, 1]: a bright square on a dark ground, placed by ``seed``."""
    image = torch.full((1, 3, 64, 64), -0.8)
    at = 8 + 8 * seed
    image[:, seed % 3, at:at + 24, at:at + 24] = 0.9
    return image


@pytest.mark.parametrize("model", ["tiny-zimage", "tiny-anima"])
def test_tiny_vae_latents_are_the_image_not_the_draw(model):
    # A trained VAE's posterior is narrow: two draws for one image are nearly equal, two images are not.
    # The random tiny VAEs had log-variance ≈ 0, so a run's latents and a test's were different images.
    bundle = load_bundle(model, device="cpu")
    pixels = torch.cat([_pattern(0), _pattern(1)])
    one = bundle.encode_images(pixels, torch.Generator().manual_seed(0))
    two = bundle.encode_images(pixels, torch.Generator().manual_seed(7))
    draws = float((one - two).norm())
    images = float((one[0] - one[1]).norm())
    assert draws < 0.1 * images, (draws, images)
    assert 0.3 < float(one.std()) < 3.0  # normalised latents have about unit spread, as the real models'


def test_anima_prediction_follows_diffusers_cosmos2_pipeline():
    """diffusers' Cosmos2TextToImagePipeline (Anima's transformer class) denoises EDM latents L at σ_edm as:
    t = σ/(σ+1); the transformer sees (1−t)·L at timestep t; x̂₀ = (1−t)·L − t·output. With x_t = (1−t)·L
    that is rectified flow at σ = t with the output as velocity ε − x₀, which ``predict`` must return as is."""
    bundle = load_bundle("tiny-anima", device="cpu")
    cond = bundle.encode_prompts(["a red cat"])
    edm = torch.tensor([0.25, 1.5, 9.0])
    t = edm / (edm + 1)
    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(3)) * edm.view(-1, 1, 1, 1)
    x_t = (1 - t).view(-1, 1, 1, 1) * latents
    with torch.no_grad():
        out = bundle.unet(x_t.unsqueeze(2), t, cond.context.expand(3, -1, -1), return_dict=False)[0].squeeze(2)
        pipeline_x0 = x_t - t.view(-1, 1, 1, 1) * out
        ours_x0 = x_t - t.view(-1, 1, 1, 1) * bundle.predict(x_t, t, cond.repeat(3))
    assert torch.allclose(ours_x0, pipeline_x0, atol=1e-5)
    # a sign flip or σ ↔ 1−σ would move x̂₀ by about the output's own size
    assert float((pipeline_x0 - x_t).abs().mean()) > 0.05


def test_anima_latents_follow_the_wan_normalisation():
    """The pipeline decodes L / (1/latents_std) + latents_mean: normalising is (z − mean) / std per channel."""
    bundle = load_bundle("tiny-anima", device="cpu")
    cfg = bundle.vae.config
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (cfg.latents_mean, cfg.latents_std))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = bundle.decode_latents(latents)
        theirs = bundle.vae.decode((latents * std + mean).unsqueeze(2)).sample.squeeze(2).clamp(-1, 1)
        assert torch.allclose(ours, theirs, atol=1e-5)
        z = bundle.vae.encode(_pattern(0).unsqueeze(2)).latent_dist.mode().squeeze(2)
        encoded = bundle.encode_images(_pattern(0), torch.Generator().manual_seed(0))
    assert torch.allclose(encoded, (z - mean) / std, atol=0.05)
