"""What only a GPU can check (issue 20): a few training steps per family in fp16 (autocast + GradScaler) and
bf16, previews rendered on the GPU, and the NaN guard stopping an fp16 run that overflows, without a file.

Marked ``gpu`` and skipped without CUDA; run on the device machine with ``python -m pytest -m gpu tests``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.errors import TrainTrainError
from trainer.hosts.standalone import StandaloneHost
from trainer.progress import CallbackSink, Events, PreviewEvent
from trainer.runner import run_job
from trainer.settings import Settings

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FAMILIES = ["tiny-sd1", "tiny-sd2v", "tiny-sdxl"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from trainer.bench import _square_images

    folder = tmp_path_factory.mktemp("gpu_data")
    _square_images(folder, 4, 64)
    return folder


def _settings(model: str, precision: str, data: Path, **extra) -> Settings:
    return Settings.from_layers({
        "mode": "LoRA", "model": model, "lora_data_directory": str(data), "image_size(height, width)": "64",
        "image_buckets_step": 32, "image_min_length": 32, "train_iterations": 4, "train_batch_size": 2,
        "train_model_precision": precision, "network_rank": 4, "network_alpha": 4, "train_learning_rate": "1e-3",
        "train_seed": 0, "logging_save_csv": False, "effect_check": False, "save_sidecar_json": False,
        "save_lora_name": f"gpu_{model}_{precision}", "save_overwrite": True, "save_precision": "fp32", **extra,
    })


def _run(settings: Settings, folder: Path, events: list | None = None) -> dict:
    sink = CallbackSink(events.append) if events is not None else None
    return run_job(settings, StandaloneHost(lora_dir=folder, device="cuda"), events=Events([sink] if sink else []))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("model", FAMILIES)
def test_steps_train_every_family_in_half_precision(model, precision, data, tmp_path):
    from trainer.modes.common import resolve_precision

    scaler = resolve_precision(precision, "fp32", torch.device("cuda")).make_scaler()
    assert scaler.is_enabled() is (precision == "fp16")  # a real GradScaler only for fp16
    result = _run(_settings(model, precision, data), tmp_path)
    assert result["status"] == "done" and result["steps"] == 4
    assert torch.isfinite(torch.tensor(result["final_loss"]))
    state = load_file(result["lora_path"])
    ups = [v for k, v in state.items() if k.endswith("lora_up.weight")]
    assert ups and all(torch.isfinite(v).all() for v in state.values())
    # lora_up starts at zero: a non-zero one means the optimizer stepped (a GradScaler skipping every step would not)
    assert max(float(v.abs().max()) for v in ups) > 0


def test_previews_render_on_the_gpu(data, tmp_path):
    from PIL import Image

    events: list = []
    settings = _settings("tiny-sd1", "bf16", data, sample_every_n_steps=2, sample_prompts="a cat --w 64 --h 64 --s 4")
    result = _run(settings, tmp_path, events)
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert result["status"] == "done" and {2, 4} <= {p.step for p in previews}
    import numpy as np

    pixels = torch.from_numpy(np.asarray(Image.open(previews[-1].path).convert("L"), dtype=np.float32))
    assert pixels.std() > 1  # an image, not a flat (NaN-turned-black) square


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_nan_guard_stops_an_exploding_run_without_a_file(precision, data, tmp_path):
    settings = _settings("tiny-sd1", precision, data, train_learning_rate="1e30", train_optimizer="SGDNesterov",
                         train_iterations=6)
    with pytest.raises(TrainTrainError) as info:
        _run(settings, tmp_path)
    message = str(info.value)
    assert "\n" not in message and ("nan" in message.lower() or "inf" in message.lower()), message
    assert "learning_rate" in message or "learning rate" in message, message
    assert not list(tmp_path.glob("*.safetensors"))
