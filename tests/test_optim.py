"""Optimizers by name: every choice builds and trains or names its pip package; fallbacks and notes."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from trainer import optim
from trainer.errors import MissingPackage, SettingsError
from trainer.optim import OPTIMIZER_CHOICES, SEPARATOR, build_optimizer, eval_mode, train_mode

NAMES = [n for n in OPTIMIZER_CHOICES if n != SEPARATOR]
BNB = {"AdamW8bit", "Adam8bit", "SGDNesterov8bit", "Lion8bit", "PagedAdamW8bit", "PagedLion8bit", "PagedAdamW",
       "PagedAdamW32bit"}  # fmt: skip
TORCH = {"AdamW", "Adam", "SGDNesterov"}
ADAPTIVE = {"Prodigy", "DadaptAdam", "DadaptLion", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptSGD"}
HAS_PO = importlib.util.find_spec("pytorch_optimizer") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _expected_package(name: str) -> str:
    if name in BNB:
        return "bitsandbytes"
    return "transformers" if name == "AdaFactor" else "pytorch-optimizer"


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))


def _groups(net: torch.nn.Module, lr0: float = 1e-2, lr1: float = 1e-2) -> list[dict]:
    return [
        {"name": "unet", "params": list(net[0].parameters()), "lr": lr0},
        {"name": "te", "params": list(net[1].parameters()), "lr": lr1},
    ]


def _train(net: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 8) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen)
        net(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", NAMES)
def test_every_name_trains_or_names_its_package(name):
    net = _net()
    before = [p.detach().clone() for p in net.parameters()]
    lr = 1.0 if name in ADAPTIVE else 1e-2
    try:
        bundle = build_optimizer(name, _groups(net, lr, lr), lr=lr, settings={}, network=net)
    except MissingPackage as err:
        assert name not in TORCH
        assert err.package == _expected_package(name)
        assert name in err.feature and f"pip install {err.package}" in str(err)
        return
    _train(net, bundle.optimizer)
    changed = [not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True)]
    assert all(changed), f"{name} left parameters unchanged: {changed}"
    assert bundle.schedule_free == ("ScheduleFree" in name)
    assert bundle.adafactor_schedule == (name == "AdaFactor")


@pytest.mark.parametrize("name", ["CAME", "Prodigy", "AdamWScheduleFree", "DAdaptAdan", "Tiger", "AdamMini"])
def test_missing_pytorch_optimizer_raises_missing_package(name, monkeypatch):
    # None in sys.modules makes the import raise ImportError, as if not installed
    for module in ("pytorch_optimizer", "prodigyopt", "dadaptation", "schedulefree", "came_pytorch"):
        monkeypatch.setitem(sys.modules, module, None)
    net = _net()
    with pytest.raises(MissingPackage) as info:
        build_optimizer(name, _groups(net), lr=1.0, settings={}, network=net)
    assert info.value.package == "pytorch-optimizer"
    assert info.value.feature == f"train_optimizer '{name}'"


@pytest.mark.parametrize(
    ("name", "module"), [("AdamW8bit", "bitsandbytes"), ("AdaFactor", "transformers.optimization")]
)
def test_missing_other_packages(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingPackage) as info:
        build_optimizer(name, _groups(_net()), lr=1e-3, settings={})
    assert info.value.package == module.split(".")[0]


def test_names_match_case_insensitively():
    bundle = build_optimizer("  adamW ", _groups(_net()), lr=1e-3, settings={})
    assert type(bundle.optimizer) is torch.optim.AdamW
    assert bundle.optimizer.defaults["weight_decay"] == 0.01


def test_separator_and_unknown_names_raise():
    with pytest.raises(SettingsError, match="is a separator; choose an optimizer") as info:
        build_optimizer("-" * 26, _groups(_net()), lr=1e-3, settings={})
    assert info.value.key == "train_optimizer"
    with pytest.raises(SettingsError, match="unknown 'adamw9bit'; choose one of AdamW, AdamW8bit") as info:
        build_optimizer("adamw9bit", _groups(_net()), lr=1e-3, settings={})
    assert info.value.key == "train_optimizer" and "-----" not in info.value.message


def test_unknown_keyword_is_rejected_with_accepted_list():
    with pytest.raises(SettingsError, match=r"does not accept 'foo'; accepted: .*weight_decay") as info:
        build_optimizer("AdamW", _groups(_net()), lr=1e-3, settings={"foo": 1})
    assert info.value.key == "train_optimizer_settings"
    with pytest.raises(SettingsError, match="train_learning_rate"):
        build_optimizer("AdamW", _groups(_net()), lr=1e-3, settings={"lr": 1})


@pytest.mark.skipif(not HAS_PO, reason="pytorch-optimizer not installed")
def test_unknown_keyword_rejected_even_when_the_class_takes_kwargs():
    # pytorch_optimizer classes swallow **kwargs; a typo must not be silently ignored
    with pytest.raises(SettingsError, match="does not accept 'weight_decya'"):
        build_optimizer("CAME", _groups(_net()), lr=1e-3, settings={"weight_decya": 0.1})


def test_bad_value_becomes_settings_error():
    with pytest.raises(SettingsError, match="rejected") as info:
        build_optimizer("AdamW", _groups(_net()), lr=1e-3, settings={"betas": (2.0, 0.9)})
    assert info.value.key == "train_optimizer_settings"


def test_callers_settings_and_groups_are_not_mutated():
    net = _net()
    settings = {"weight_decay": 0.0}
    groups = _groups(net)
    snapshot = [dict(g) for g in groups]
    bundle = build_optimizer("SGDNesterov", groups, lr=1e-3, settings=settings)
    assert settings == {"weight_decay": 0.0}
    assert groups == snapshot
    assert bundle.optimizer.defaults["momentum"] == 0.9 and bundle.optimizer.defaults["nesterov"] is True
    assert [g["lr"] for g in bundle.optimizer.param_groups] == [1e-2, 1e-2]


def test_sgd_nesterov_forces_nesterov_and_needs_momentum():
    bundle = build_optimizer("SGDNesterov", _groups(_net()), lr=1e-3, settings={"nesterov": False, "momentum": 0.5})
    assert bundle.optimizer.defaults["nesterov"] is True and bundle.optimizer.defaults["momentum"] == 0.5
    assert any("nesterov is always on" in n for n in bundle.notes)
    with pytest.raises(SettingsError, match="momentum > 0"):
        build_optimizer("SGDNesterov", _groups(_net()), lr=1e-3, settings={"momentum": 0})


class _FakeAdamW8bit(torch.optim.AdamW):
    """Stands in for bnb.optim.AdamW8bit (same keyword names) so the fallback runs without bitsandbytes."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False):  # fmt: skip
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    def step(self, closure=None):
        raise RuntimeError("All input tensors need to be on the same GPU")


@pytest.fixture
def fake_bnb(monkeypatch):
    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = "0.49.2"
    fake.optim = types.SimpleNamespace(AdamW8bit=_FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    return fake


def test_bnb_probe_reports_a_failing_step(fake_bnb):
    reason = optim._probe_bnb.__wrapped__("AdamW8bit", "cpu")
    assert "0.49.2" in reason and "same GPU" in reason


def test_bnb_probe_failure_falls_back_to_adamw_with_a_note(fake_bnb, monkeypatch):
    monkeypatch.setattr(optim, "_probe_bnb", lambda cls, device: f"{cls} fails on {device}: boom")
    settings = {"min_8bit_size": 16, "weight_decay": 0.0}
    bundle = build_optimizer("AdamW8bit", _groups(_net()), lr=1e-3, settings=settings)
    assert type(bundle.optimizer) is torch.optim.AdamW
    assert bundle.optimizer.defaults["weight_decay"] == 0.0
    text = " ".join(bundle.notes)
    assert "fails on cpu: boom" in text and "AdamW" in text and "pip install -U 'bitsandbytes>=0.50'" in text
    assert "ignores min_8bit_size" in text
    assert settings == {"min_8bit_size": 16, "weight_decay": 0.0}
    with pytest.raises(SettingsError, match="does not accept 'foo'"):  # typos still caught on the fallback path
        build_optimizer("AdamW8bit", _groups(_net()), lr=1e-3, settings={"foo": 1})


def test_bnb_too_old_for_a_class_asks_for_a_newer_one(fake_bnb):
    with pytest.raises(MissingPackage) as info:
        build_optimizer("PagedLion8bit", _groups(_net()), lr=1e-4, settings={})
    assert info.value.package == "bitsandbytes>=0.50"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_real_bnb_probe_on_cpu_matches_the_built_class():
    bundle = build_optimizer("AdamW8bit", _groups(_net()), lr=1e-3, settings={})
    if bundle.notes:  # bnb < 0.50 on CPU: fell back
        assert type(bundle.optimizer) is torch.optim.AdamW
    else:
        assert type(bundle.optimizer).__name__ == "AdamW8bit"


@pytest.mark.skipif(not HAS_PO, reason="pytorch-optimizer not installed")
def test_adaptive_optimizers_note_low_and_mixed_learning_rates():
    bundle = build_optimizer("Prodigy", _groups(_net(), 1e-4, 5e-5), lr=1e-4, settings={})
    text = " ".join(bundle.notes)
    assert "set learning rate around 1.0" in text and "different learning rates" in text
    assert build_optimizer("DAdaptAdam", _groups(_net(), 1.0, 1.0), lr=1.0, settings={}).notes == []


@pytest.mark.skipif(not HAS_PO, reason="pytorch-optimizer not installed")
def test_adam_mini_needs_the_network():
    with pytest.raises(SettingsError, match="AdamMini needs the network module"):
        build_optimizer("AdamMini", _groups(_net()), lr=1e-3, settings={}, network=None)
    net = _net()
    bundle = build_optimizer("AdamMini", _groups(net, 1e-3, 5e-4), lr=1e-3, settings={}, network=net)
    assert any("per-group learning rates are not applied" in n for n in bundle.notes)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_adafactor_relative_step_defaults_and_forcing():
    groups = _groups(_net())
    bundle = build_optimizer("AdaFactor", groups, lr=1e-3, settings={})
    assert bundle.adafactor_schedule and bundle.optimizer.defaults["relative_step"] is True
    assert bundle.optimizer.defaults["lr"] is None and all(g["lr"] is None for g in bundle.optimizer.param_groups)
    assert any("used as initial lr" in n for n in bundle.notes)
    assert all("lr" in g for g in groups)  # the caller's groups keep theirs

    forced = build_optimizer(
        "AdaFactor", _groups(_net()), lr=1e-3, settings={"warmup_init": True, "relative_step": False}
    )
    assert forced.optimizer.defaults["relative_step"] is True and any("warmup_init" in n for n in forced.notes)

    fixed = build_optimizer("AdaFactor", _groups(_net()), lr=1e-3, settings={"relative_step": False})
    assert not fixed.adafactor_schedule and [g["lr"] for g in fixed.optimizer.param_groups] == [1e-2, 1e-2]


def test_train_and_eval_mode_are_noops_for_plain_optimizers():
    net = _net()
    bundle = build_optimizer("AdamW", _groups(net), lr=1e-3, settings={})
    before = [p.detach().clone() for p in net.parameters()]
    eval_mode(bundle.optimizer)
    train_mode(bundle.optimizer)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))


@pytest.mark.skipif(not HAS_PO, reason="pytorch-optimizer not installed")
def test_schedule_free_eval_moves_to_average_and_train_restores():
    net = _net()
    bundle = build_optimizer("AdamWScheduleFree", _groups(net), lr=1e-2, settings={})
    opt = bundle.optimizer
    _train(net, opt)
    y = [p.detach().clone() for p in net.parameters()]
    beta1 = opt.param_groups[0]["betas"][0]
    # the library's definition: x = y + (1 - 1/beta1) (z - y), with z the SGD iterate
    expected = [p + (1 - 1 / beta1) * (opt.state[q]["z"] - p) for p, q in zip(y, net.parameters(), strict=True)]
    eval_mode(opt)
    x = [p.detach().clone() for p in net.parameters()]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(x, expected, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(x, y, strict=True))
    eval_mode(opt)  # idempotent: a second save does not move the weights again
    assert all(torch.equal(a, p) for a, p in zip(x, net.parameters(), strict=True))
    train_mode(opt)
    assert all(torch.allclose(a, p, atol=1e-6) for a, p in zip(y, net.parameters(), strict=True))
