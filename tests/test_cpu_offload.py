"""megatron-core's optimizer CPU offload (`optimizer.cpu_offload`, `optimizer.offload_fraction`).

CPU: the keys and what they need are checked at start-up with errors naming the key (a
DeepSpeed run is pointed to training.offload, the distributed optimizer and bf16 are required,
the fraction is in (0, 1] and not set alone); megatron's HybridDeviceOptimizer needs CUDA, so a CPU
run stops before step 0 with an error that says so.
GPU: 20 bf16 steps of jrt-tiny with the whole state offloaded, and with half of it, take the
losses of the run without offload at lower peak GPU memory; an offloaded run resumed from a
checkpoint follows the straight run's losses (passed on an H200 once each host-side parameter
got its own Adam step after a load: `megatron_workarounds._own_offloaded_steps`).
"""
import math
from pathlib import Path

import pytest
import torch

from megatron_jrt.config import ConfigError
from tests.multiproc import launch

STEPS = 20
MOCK = ["model.preset=jrt-tiny", "data.mock_data=true", "data.mock_vocab_size=255",
        "data.seq_length=64", "data.micro_batch_size=2", "data.global_batch_size=4",
        "data.num_workers=0", f"training.train_steps={STEPS}", "training.eval_steps=0",
        f"training.log_interval={STEPS}", "training.bf16=true", "optimizer.warmup_steps=2",
        "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "logging.tensorboard=false",
        "logging.progress_bar=false"]


def _config(*overrides: str):
    from megatron_jrt.train_config import load_config

    return load_config(None, [*MOCK, *overrides])


def test_offload_is_off_by_default_and_its_keys_load():
    cfg = _config()
    assert cfg.optimizer.cpu_offload is False and cfg.optimizer.offload_fraction == 1.0
    cfg = _config("optimizer.cpu_offload=true", "optimizer.offload_fraction=0.5")
    assert cfg.optimizer.cpu_offload is True and cfg.optimizer.offload_fraction == 0.5


@pytest.mark.parametrize("overrides, error", [
    (["optimizer.cpu_offload=true", "training.engine=deepspeed"],
     r"^optimizer\.cpu_offload: .*training\.engine=deepspeed set training\.offload=optimizer"),
    (["optimizer.cpu_offload=true", "parallel.use_distributed_optimizer=false"],
     r"^optimizer\.cpu_offload: .*set parallel\.use_distributed_optimizer=true"),
    (["optimizer.cpu_offload=true", "training.bf16=false"],
     r"^optimizer\.cpu_offload: .*set training\.bf16=true"),
    (["optimizer.cpu_offload=true", "optimizer.offload_fraction=0"],
     r"^optimizer\.offload_fraction: must be in \(0, 1\]"),
    (["optimizer.cpu_offload=true", "optimizer.offload_fraction=1.5"],
     r"^optimizer\.offload_fraction: must be in \(0, 1\]"),
    (["optimizer.offload_fraction=0.5"],
     r"^optimizer\.offload_fraction: 0\.5 has no effect without optimizer\.cpu_offload=true"),
    (["training.offload=optimizer"],
     r"^training\.offload: 'optimizer' is DeepSpeed ZeRO's offload .*optimizer\.cpu_offload"),
])
def test_offload_settings_are_named_errors(overrides, error):
    with pytest.raises(ConfigError, match=error):
        _config(*overrides)


def _train(overrides: list[str]):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train

    cfg = _config(*overrides)
    init_distributed(seed=cfg.training.seed)
    return train(cfg)


def _fails_at_start_up(run_dir: str) -> str:
    try:
        _train(["optimizer.cpu_offload=true", f"logging.run_dir={run_dir}"])
    except ConfigError as error:
        return str(error)
    return "no error"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour")
def test_cpu_run_with_offload_stops_before_step_0(tmp_path):
    message = launch(_fails_at_start_up, 1, str(tmp_path), in_process=True)[0]
    assert message.startswith("optimizer.cpu_offload: megatron-core's optimizer CPU offload "
                              "(HybridDeviceOptimizer) needs CUDA"), message
    assert not (tmp_path / "losses.jsonl").exists() or not (tmp_path / "losses.jsonl").read_text()


def _with_and_without_offload(run_dir: str) -> dict:
    """jrt-tiny, bf16, 20 steps: no offload, all of the state offloaded, half of it ->
    {name: (losses, peak GPU memory in bytes)}, in this one process."""
    runs = {}
    for name, extra in (("plain", []), ("offload", ["optimizer.cpu_offload=true"]),
                        ("half", ["optimizer.cpu_offload=true", "optimizer.offload_fraction=0.5"])):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result = _train([*extra, f"logging.run_dir={run_dir}/{name}"])
        runs[name] = (result.losses, torch.cuda.max_memory_allocated())
    return runs


@pytest.mark.gpu
def test_offload_keeps_the_losses_at_lower_gpu_memory(tmp_path):
    runs = launch(_with_and_without_offload, 1, str(tmp_path), in_process=True)[0]
    plain, plain_peak = runs["plain"]
    assert len(plain) == STEPS and all(map(math.isfinite, plain))
    for name in ("offload", "half"):
        losses, peak = runs[name]
        # the same AdamW update on the fp32 main weights, torch's fused kernel on the CPU
        # instead of the GPU: equal up to rounding (fp32 updates, then the bf16 model copy)
        assert losses == pytest.approx(plain, rel=1e-2), (name, losses, plain)
        assert peak < plain_peak, (name, peak, plain_peak)
    assert runs["offload"][1] < runs["half"][1]


def _offload_resume(run_dir: str):
    """mock-tiny (bf16) with offload: 2 steps and a checkpoint, a resume to step 4, and a
    straight 4-step run -> (the resumed run's start step, its losses, the straight losses)."""
    from tests import runs

    offload = {"optimizer.cpu_offload": True, "training.bf16": True}
    runs.run_in_process(Path(run_dir) / "resumed", **offload, **{"training.train_steps": 2})
    resumed = runs.run_in_process(Path(run_dir) / "resumed", **offload,
                                  **{"checkpoint.resume": "auto"})
    straight = runs.run_in_process(Path(run_dir) / "straight", **offload,
                                   **{"checkpoint.save_dir": ""})
    return resumed.start_step, resumed.losses, straight.losses


@pytest.mark.gpu
def test_offload_resumes_on_the_straight_losses(tmp_path):
    start, resumed, straight = launch(_offload_resume, 1, str(tmp_path), in_process=True)[0]
    assert start == 2 and len(straight) == 4
    assert resumed == pytest.approx(straight[2:], rel=1e-6)
