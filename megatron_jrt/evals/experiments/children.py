"""The child processes of an experiment run with --parallel: one run each, a lone rank, one GPU.

Tiny recall models leave a GPU mostly idle, so several runs share one, and the LM-quality
models train one per GPU; each child is the same driver restricted to one run
(runner.Sweep.run_children and lm_quality.run_children start, poll and merge them).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_jrt.distributed import LAUNCHER_VARIABLES



@dataclass
class Child:
    """One child run: its process, log and JSON (the driver's schema, one row in "runs")."""

    proc: subprocess.Popen
    log: Path
    out: Path
    gpu: str | None
    started: float

    @classmethod
    def start(cls, argv: list[str], log: Path, out: Path, gpu: str | None, *,
              append: bool = False) -> "Child":
        """`argv` in its own process, its output to `log` (`append`: after what is there)."""
        env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
        env.setdefault("OMP_NUM_THREADS", "1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        with open(log, "a" if append else "w") as handle:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        return cls(proc, log, out, gpu, time.perf_counter())

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def result(self) -> tuple[dict | None, dict]:
        """(its row, {}) or (None, {"returncode", "error"}) once it has ended."""
        code = self.proc.returncode
        runs = json.loads(self.out.read_text())["runs"] if self.out.exists() else []
        if code == 0 and len(runs) == 1:
            return runs[0], {}
        lines = [line for line in self.log.read_text(errors="replace").splitlines()
                 if line.strip()]
        return None, {"returncode": code,
                      "error": lines[-1].strip() if lines else f"{len(runs)} rows, no output"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def visible_gpus(asked: list[str] | None) -> list[str]:
    """--gpus, checked against the visible ones (CUDA_VISIBLE_DEVICES or all); [] on a CPU."""
    if not torch.cuda.is_available():
        if asked:
            raise SystemExit(f"--gpus {','.join(asked)}: no GPU is visible")
        return []
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = ([g.strip() for g in named.split(",") if g.strip()] if named is not None
               else [str(i) for i in range(torch.cuda.device_count())])
    visible = visible[:torch.cuda.device_count()]
    unknown = [g for g in asked or [] if g not in visible]
    if unknown:
        raise SystemExit(f"--gpus: {','.join(unknown)} not visible (visible: {','.join(visible)})")
    return asked or visible
