"""LR schedules by name: diffusers parity, torch schedulers over the full run, plateau, self-scheduling optimizers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from trainer.errors import SettingsError
from trainer.schedules import (
    SCHEDULER_CHOICES,
    AdafactorSchedule,
    ScheduleFreeSchedule,
    build_scheduler,
    parse_step_rules,
)

DIFFUSERS_NAMES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "piecewise_constant")  # fmt: skip
TORCH_NAMES = tuple(n for n in SCHEDULER_CHOICES if n not in DIFFUSERS_NAMES)
RULES = "1:10,0.5:20,0.1"


def _optimizer(cls=torch.optim.AdamW, lrs=(1e-3, 5e-4), **kwargs) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in lrs]
    return cls([{"params": [p], "lr": lr} for p, lr in zip(params, lrs, strict=True)], lr=lrs[0], **kwargs)


def _lrs(schedule, steps: int) -> list[list[float]]:
    out = [schedule.lrs()]
    for _ in range(steps):
        schedule.optimizer.step()
        schedule.step(1.0)
        out.append(schedule.lrs())
    return out


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


@pytest.mark.parametrize("name", DIFFUSERS_NAMES)
def test_matches_diffusers_get_scheduler(name):
    optimization = pytest.importorskip("diffusers.optimization")
    ours = build_scheduler(
        name, _optimizer(), total_steps=50, warmup_steps=5, num_cycles=2, power=2.0, step_rules=RULES
    )
    ref_opt = _optimizer()
    ref = optimization.get_scheduler(name, ref_opt, step_rules=RULES, num_warmup_steps=5, num_training_steps=50,
                                     num_cycles=2, power=2.0)  # fmt: skip
    expected = [[g["lr"] for g in ref_opt.param_groups]]
    for _ in range(50):
        ref_opt.step()
        ref.step()
        expected.append([g["lr"] for g in ref_opt.param_groups])
    got = _lrs(ours, 50)
    assert _flat(got) == pytest.approx(_flat(expected), rel=1e-12, abs=1e-15)
    assert len({tuple(r) for r in got}) > 1 or name == "constant"  # the schedule actually moves


def test_argument_clamping():
    def run(**kw):
        return _lrs(build_scheduler("cosine_with_restarts", _optimizer(), total_steps=20, **kw), 20)

    assert run(warmup_steps=-5, num_cycles=0) == run(warmup_steps=0, num_cycles=1)
    neg = _lrs(build_scheduler("polynomial", _optimizer(), total_steps=20, power=-1.0), 20)
    assert neg == _lrs(build_scheduler("polynomial", _optimizer(), total_steps=20, power=1.0), 20)


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_torch_schedulers_run_the_whole_pass(name):
    total = 37
    schedule = build_scheduler(name, _optimizer(), total_steps=total)
    lrs = _lrs(schedule, total)
    assert len(lrs) == total + 1 and min(_flat(lrs)) >= 0
    if name != "reduce_on_plateau":  # a loss of 1.0 every step is a plateau only after patience
        assert len({tuple(r) for r in lrs}) > 1


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_torch_schedulers_warm_up_linearly_then_run_over_the_remaining_steps(name):
    warmup, total = 4, 30
    got = _lrs(build_scheduler(name, _optimizer(), total_steps=total, warmup_steps=warmup), total)
    plain = _lrs(build_scheduler(name, _optimizer(), total_steps=total - warmup), total - warmup)
    start = plain[0]  # the scheduler's own starting lr (one_cycle and cyclic start below the base lr)
    for step in range(warmup + 1):  # lr at step s = s / warmup of the start: 0 at step 0
        assert got[step] == pytest.approx([lr * step / warmup for lr in start], rel=1e-12, abs=1e-15), step
    assert _flat(got[warmup:]) == pytest.approx(_flat(plain), rel=1e-9, abs=1e-15)


def test_cosine_annealing_with_warmup_ends_at_zero_and_warmup_survives_resume():
    total, warmup = 20, 5
    lrs = _lrs(build_scheduler("cosine_annealing", _optimizer(), total_steps=total, warmup_steps=warmup), total)
    assert lrs[warmup][0] == pytest.approx(1e-3) and lrs[-1][0] == pytest.approx(0.0, abs=1e-12)
    first = build_scheduler("cosine_annealing", _optimizer(), total_steps=total, warmup_steps=warmup)
    _lrs(first, 2)
    state = first.state_dict()
    again = build_scheduler("cosine_annealing", _optimizer(), total_steps=total, warmup_steps=warmup)
    again.load_state_dict(state)
    assert again.lrs() == pytest.approx([1e-3 * 2 / warmup, 5e-4 * 2 / warmup])


@pytest.mark.parametrize("name", ["constant", "piecewise_constant"])
def test_schedules_without_warmup_say_so(name):
    schedule = build_scheduler(name, _optimizer(), total_steps=10, warmup_steps=3, step_rules=RULES)
    assert any("train_lr_warmup_steps 3 is not used" in n for n in schedule.notes)
    assert not build_scheduler(name, _optimizer(), total_steps=10, step_rules=RULES).notes


def test_one_cycle_takes_exactly_total_steps_and_never_raises():
    schedule = build_scheduler("one_cycle", _optimizer(), total_steps=20)
    lrs = _lrs(schedule, 20)
    assert schedule.scheduler.last_epoch == 20 and max(lrs)[0] == pytest.approx(1e-3)
    # the lr of the last step taken (lrs[-1] would only serve a step N+1) is the annealed minimum
    assert lrs[-2][0] == pytest.approx(1e-3 / 25 / 1e4)
    _lrs(schedule, 2)  # a trainer overshooting by one must not crash the final save (§17 #3)
    assert schedule.lrs() == lrs[-1]
    for steps in (1, 2):
        _lrs(build_scheduler("one_cycle", _optimizer(), total_steps=steps), steps)


def test_torch_defaults_and_settings():
    s = build_scheduler("cosine_annealing", _optimizer(), total_steps=40, settings={"eta_min": 1e-5})
    assert s.scheduler.T_max == 40 and s.scheduler.eta_min == 1e-5
    assert build_scheduler("cosine_annealing_with_restarts", _optimizer(), total_steps=5).scheduler.T_0 == 10
    assert build_scheduler("exponential", _optimizer(), total_steps=5).scheduler.gamma == 0.9
    assert build_scheduler("step", _optimizer(), total_steps=5).scheduler.step_size == 10
    ms = build_scheduler("multi_step", _optimizer(), total_steps=5, settings={"milestones": [2, 4]})
    assert sorted(ms.scheduler.milestones) == [2, 4]
    assert sorted(build_scheduler("multi_step", _optimizer(), total_steps=5).scheduler.milestones) == [30, 60, 90]


def test_cyclic_cycles_momentum_only_when_the_optimizer_has_it():
    plain = build_scheduler("cyclic", _optimizer(torch.optim.SGD), total_steps=10)
    assert plain.scheduler.cycle_momentum is False
    assert plain.lrs() == pytest.approx([1e-5, 1e-5])
    sgd = build_scheduler("cyclic", _optimizer(torch.optim.SGD, momentum=0.9), total_steps=10)
    assert sgd.scheduler.cycle_momentum is True
    from trainer.schedules import _cyclic_cycles_betas

    adam = build_scheduler("cyclic", _optimizer(), total_steps=10)  # torch >= 2.2 cycles Adam's betas
    assert adam.scheduler.cycle_momentum is _cyclic_cycles_betas()
    adam.step(1.0)  # and it runs either way (torch 2.1, A1111's, cannot cycle betas)


def test_reduce_on_plateau_lowers_lr_when_the_loss_stalls():
    schedule = build_scheduler("reduce_on_plateau", _optimizer(), total_steps=100, settings={"patience": 3})
    for step in range(10):  # falling loss: no reduction
        schedule.step(1.0 / (step + 1))
    assert schedule.lrs() == pytest.approx([1e-3, 5e-4])
    for _ in range(40):
        schedule.step(1.0)  # the EMA climbs towards 1.0, then stalls
    assert schedule.lrs()[0] < 1e-3 and schedule.lrs()[1] < 5e-4
    schedule.step(None)  # no loss: counted, nothing compared
    assert schedule.num_steps == 51


def test_unknown_names_and_settings_raise():
    with pytest.raises(SettingsError, match="unknown 'cosinus'; choose one of cosine_annealing") as info:
        build_scheduler("cosinus", _optimizer(), total_steps=10)
    assert info.value.key == "train_lr_scheduler"
    with pytest.raises(SettingsError, match="does not accept 'eta_min'; accepted: nothing") as info:
        build_scheduler("cosine", _optimizer(), total_steps=10, settings={"eta_min": 0.1})
    assert info.value.key == "train_lr_scheduler_settings"
    with pytest.raises(SettingsError, match=r"does not accept 'foo'; accepted: .*gamma"):
        build_scheduler("exponential", _optimizer(), total_steps=10, settings={"foo": 1})
    with pytest.raises(SettingsError, match="does not accept 'total_steps'"):
        build_scheduler("one_cycle", _optimizer(), total_steps=10, settings={"total_steps": 5})
    settings = {"gamma": 0.5}
    build_scheduler("exponential", _optimizer(), total_steps=10, settings=settings)
    assert settings == {"gamma": 0.5}


@pytest.mark.parametrize("rules", ["", "1:a,0.1", "abc", "1:10,0.5:10,0.1", "1:10,", "-1:10,0.1", "1:0,0.1"])
def test_bad_step_rules_raise(rules):
    with pytest.raises(SettingsError) as info:
        build_scheduler("piecewise_constant", _optimizer(), total_steps=10, step_rules=rules)
    assert info.value.key == "train_lr_step_rules"


def test_step_rules_parse():
    assert parse_step_rules(" 0.1:200, 1:100 ,0.01") == ([(100, 1.0), (200, 0.1)], 0.01)
    assert parse_step_rules("0.5") == ([], 0.5)


@pytest.mark.skipif(importlib.util.find_spec("pytorch_optimizer") is None, reason="pytorch-optimizer not installed")
def test_schedule_free_reports_its_own_lr():
    from trainer.optim import build_optimizer

    param = torch.nn.Parameter(torch.ones(4))
    bundle = build_optimizer("AdamWScheduleFree", [{"params": [param]}], lr=1e-2, settings={"warmup_steps": 4})
    schedule = build_scheduler("cosine", bundle, total_steps=10)  # the bundle is accepted too
    assert isinstance(schedule, ScheduleFreeSchedule) and "is not used" in schedule.notes[0]
    param.grad = torch.ones(4)
    bundle.optimizer.step()
    schedule.step(0.5)
    assert schedule.lrs() == pytest.approx([1e-2 * 1 / 4])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_adafactor_relative_step_reports_its_own_lr():
    from trainer.optim import build_optimizer

    param = torch.nn.Parameter(torch.ones(4, 4))
    bundle = build_optimizer("AdaFactor", [{"params": [param], "lr": 1e-3}], lr=1e-3, settings={})
    schedule = build_scheduler("linear", bundle.optimizer, total_steps=10)
    assert isinstance(schedule, AdafactorSchedule) and schedule.lrs() == [1e-3]
    param.grad = torch.ones(4, 4)
    bundle.optimizer.step()
    schedule.step(0.5)
    assert schedule.lrs() == pytest.approx([1e-2])  # min(1e-2, 1/sqrt(1)) × RMS(param)=1
