"""Running jrt-train from tests: configs/mock-tiny.yaml with small overrides, in process or as
a subprocess (for signals, exit codes and concurrent runs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.multiproc import free_port

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mock-tiny.yaml")


def overrides(run_dir: Path, **extra) -> list[str]:
    """4 steps, checkpoints every 2 into run_dir/ckpt, a fixed LR schedule, no TensorBoard."""
    values = {"training.train_steps": 4, "training.eval_steps": 0, "optimizer.decay_steps": 8,
              "logging.run_dir": str(run_dir), "logging.tensorboard": False,
              "checkpoint.save_dir": str(run_dir / "ckpt"), "checkpoint.save_interval": 2,
              **extra}
    return [f"{k}={v}" for k, v in values.items()]


def run_in_process(run_dir: Path, **extra):
    """train() on this process (call through tests.multiproc.launch); its TrainResult."""
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    cfg = load_config(CONFIG, overrides(run_dir, **extra))
    init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                     seed=cfg.training.seed)
    return train(cfg)


def train_cmd(run_dir: Path, **extra) -> list[str]:
    cmd = [sys.executable, "-m", "megatron_jrt.train", "--config", CONFIG]
    for item in overrides(run_dir, **extra):
        cmd += ["--set", item]
    return cmd


def env(master_port: bool = True) -> dict:
    """The environment of a training subprocess; without `master_port` it picks its own."""
    values = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    values.pop("MASTER_PORT", None)
    if master_port:
        values["MASTER_PORT"] = str(free_port())
    return values


def losses(run_dir: Path) -> dict[int, float]:
    """losses.jsonl as {step: loss}; a duplicated step would be lost here (see loss_rows)."""
    return {row["step"]: row["loss"] for row in loss_rows(run_dir)}


def loss_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def start(run_dir: Path, master_port: bool = True, **extra) -> subprocess.Popen:
    """A training subprocess with its output captured (text)."""
    return subprocess.Popen(train_cmd(run_dir, **extra), cwd=REPO, env=env(master_port),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 120) -> None:
    """Until the run has logged `steps` steps (fails if it exits first)."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "losses.jsonl").exists() or len(losses(run_dir)) < steps:
        assert proc.poll() is None, f"the run exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, "the run did not reach its steps in time"
        time.sleep(0.05)
