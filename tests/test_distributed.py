"""Data-parallel training: gradient averaging, the torchrun path, and equivalence with a one-process reference.

The reference for a 2-rank run is computed in ONE process: two ``run_job`` calls (rank 0 and rank 1,
each with its own host and U-Net) run in lockstep threads, one at a time, and at every step the second
rank to arrive averages both ranks' gradients ((g0 + g1) / 2) before either takes its optimizer step.
That is exactly what the all-reduce must compute — the gradient of the union of the two ranks'
micro-batches — so the torchrun result must match it, and must differ from a plain one-process run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.distributed import DataParallel, average_gradients, env_world_size, from_env, params_checksum
from trainer.hosts.standalone import StandaloneHost
from trainer.progress import Events
from trainer.runner import run_job
from trainer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


# -- pieces -----------------------------------------------------------------------------------------


def _params(values: list[list[float]], dtype=torch.float32) -> list[torch.nn.Parameter]:
    params = []
    for v in values:
        p = torch.nn.Parameter(torch.zeros(len(v), dtype=dtype))
        p.grad = torch.tensor(v, dtype=dtype)
        params.append(p)
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_gradients_is_the_mean_over_ranks(dtype):
    mine = _params([[1.0, 2.0], [4.0]], dtype) + [torch.nn.Parameter(torch.zeros(3))]  # the last has no grad
    other = torch.tensor([3.0, 6.0, 0.0])  # the other rank's flat gradient buffer

    def fake_all_reduce(flat: torch.Tensor) -> None:  # sums in place over the ranks, as dist.all_reduce
        assert flat.dtype == torch.float32 and flat.shape == other.shape
        flat.add_(other)

    assert average_gradients(mine, fake_all_reduce, 2) == 3
    assert mine[0].grad.tolist() == [2.0, 4.0] and mine[1].grad.tolist() == [2.0]
    assert mine[0].grad.dtype == dtype and mine[2].grad is None


def test_average_gradients_with_a_world_of_one_changes_nothing():
    params = _params([[0.5, -1.5]])
    assert average_gradients(params, lambda flat: None, 1) == 2
    assert params[0].grad.tolist() == [0.5, -1.5]


def test_env_world_size_and_single_process_context():
    assert env_world_size({}) == 1
    assert env_world_size({"WORLD_SIZE": "4"}) == 4
    assert env_world_size({"WORLD_SIZE": "x"}) == 1
    dp = from_env("cpu", environ={})
    assert isinstance(dp, DataParallel) and not dp.active and dp.is_main and dp.device == "cpu"
    assert dp.grad_sync is None

    def stop():
        return "save"

    assert dp.wrap_stop(stop) is stop
    settings = Settings.from_layers({"train_seed": -1})
    assert dp.agree_seed(settings) is settings
    assert dp.check_sync() == {"world_size": 1, "rank": 0, "backend": ""}
    dp.close()


def test_params_checksum_sees_a_swap_and_a_change():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0])
    base = params_checksum([a, b])
    assert torch.equal(base, params_checksum([a.clone(), b.clone()]))
    assert not torch.equal(base, params_checksum([b, a]))
    assert not torch.equal(base, params_checksum([a, b + 1e-6]))


# -- the one-process reference --------------------------------------------------------------------------


class LockstepWorld:
    """Ranks as threads that run one at a time, handing over at each gradient sync."""

    def __init__(self, world_size: int) -> None:
        self.n = world_size
        self.cv = threading.Condition()
        self.turn = 0
        self.done: set[int] = set()
        self.pending: dict[int, list[torch.Tensor]] = {}

    def _pass_turn(self, rank: int) -> None:
        alive = [r for r in range(self.n) if r not in self.done]
        if alive:
            later = [r for r in alive if r > rank]
            self.turn = later[0] if later else alive[0]
        self.cv.notify_all()

    def wait_turn(self, rank: int) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.turn == rank)

    def grad_sync(self, rank: int, params: list[torch.Tensor]) -> None:
        with self.cv:
            self.pending[rank] = [p.grad for p in params if p.grad is not None]
            if len(self.pending) == self.n:  # the last rank to arrive averages for everyone, in rank order
                grads = [self.pending[r] for r in range(self.n)]
                for i in range(len(grads[0])):
                    flat = [g[i].to(torch.float32) for g in grads]
                    mean = flat[0]
                    for other in flat[1:]:
                        mean = mean + other
                    mean = mean / self.n
                    for g in grads:
                        g[i].copy_(mean)
                self.pending.clear()
            self._pass_turn(rank)
            self.cv.wait_for(lambda: self.turn == rank)

    def finish(self, rank: int) -> None:
        with self.cv:
            self.done.add(rank)
            self._pass_turn(rank)


def lockstep_run(settings: Settings, lora_dirs: list[Path], world_size: int = 2) -> dict:
    """Run ``settings`` as ``world_size`` lockstep ranks in this process; returns rank 0's result."""
    world = LockstepWorld(world_size)
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        world.wait_turn(rank)
        try:
            host = StandaloneHost(lora_dir=lora_dirs[rank], device="cpu")
            results[rank] = run_job(settings, host, events=Events([]), rank=rank, world_size=world_size,
                                    grad_sync=lambda params: world.grad_sync(rank, params))
        except BaseException as err:  # surfaced below
            results[rank] = err
        finally:
            world.finish(rank)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for r in range(world_size):
        if isinstance(results.get(r), BaseException):
            raise results[r]
    return results[0]


# -- torchrun -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sets(data: Path, mode: str) -> dict[str, str]:
    sets = {
        "lora_data_directory": str(data), "image_size(height, width)": "64", "image_buckets_step": "32",
        "image_min_length": "32", "train_batch_size": "1", "train_iterations": "4", "train_seed": "3",
        "train_learning_rate": "0.002", "train_model_precision": "fp32", "save_precision": "fp32",
        "save_overwrite": "true", "train_lr_scheduler": "constant", "network_rank": "4", "network_alpha": "4",
        "logging_save_csv": "false", "effect_check": "false", "save_lora_name": "dp", "train_optimizer": "AdamW",
    }
    if mode == "Multi-ADDifT":
        sets["diff_target_name"] = "_after"
    return sets


def _dataset(folder: Path, pairs: bool) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    for i in range(4):
        pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture {i}", encoding="utf-8")
        if pairs:
            Image.fromarray(pixels).rotate(90).save(folder / f"img{i}_after.png")
    return folder


def _launch(tmp_path: Path, mode: str, sets: dict[str, str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "trainer", "train", "--mode", mode, "--model", "tiny-sd1",
           "--device", "cpu", "--lora-dir", str(tmp_path / "tr_lora"), "--logs-dir", str(tmp_path / "logs"),
           "--json-dir", str(tmp_path / "json"), "--result-json", str(tmp_path / "tr_result.json"), "--quiet"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)


def _torchrun(tmp_path: Path, mode: str, data: Path, nproc: int = 2) -> tuple[dict, Path]:
    proc = _launch(tmp_path, mode, _sets(data, mode), nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "tr_result.json").read_text(encoding="utf-8")), tmp_path / "tr_lora" / "dp.safetensors"


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["LoRA", "Multi-ADDifT"])  # ~15 s each (quiet machine), ~100 s under load
def test_torchrun_two_ranks_match_the_lockstep_reference(tmp_path, mode):
    data = _dataset(tmp_path / "data", pairs=mode == "Multi-ADDifT")
    result, path = _torchrun(tmp_path, mode, data)
    dp = result["data_parallel"]
    assert dp["world_size"] == 2 and dp["backend"] == "gloo"
    assert dp["in_sync"] is True and dp["max_checksum_diff"] == 0.0 and dp["trained_params"] > 0
    assert result["steps"] == 4 and path.is_file()
    trained = load_file(str(path))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks (OMP_NUM_THREADS=1): same kernels, same sums
    try:
        settings = Settings.from_layers({"mode": mode, "model": "tiny-sd1"}, _sets(data, mode))
        lockstep_run(settings, [tmp_path / "ref0", tmp_path / "ref1"])
        single = run_job(settings, StandaloneHost(lora_dir=tmp_path / "one", device="cpu"), events=Events([]))
    finally:
        torch.set_num_threads(threads)
    reference = load_file(str(tmp_path / "ref0" / "dp.safetensors"))
    assert not (tmp_path / "ref1" / "dp.safetensors").exists()  # only rank 0 writes
    one = load_file(single["lora_path"])
    diff_ref, diff_one = _close(trained, reference), _close(trained, one)
    assert diff_ref < 1e-5, f"2-rank torchrun differs from the averaged-gradient reference by {diff_ref}"
    assert diff_one > 100 * max(diff_ref, 1e-7), "rank 1's batches had no effect: no better than one process"


def test_torchrun_with_a_bad_setting_fails_fast_on_every_rank_and_writes_nothing(tmp_path):
    # both ranks reject the settings before training: no rank may wait for the other in a collective
    proc = _launch(tmp_path, "LoRA", _sets(tmp_path / "missing", "LoRA"))
    assert proc.returncode != 0
    assert "lora_data_directory" in proc.stderr
    assert not (tmp_path / "tr_result.json").exists() and not (tmp_path / "tr_lora" / "dp.safetensors").exists()
