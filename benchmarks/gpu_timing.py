"""Timing and memory of one CUDA call, shared by the kernel benchmarks (siblings import it:
benchmarks/ is on sys.path when they run as scripts)."""
from __future__ import annotations

from typing import Callable

import torch
from triton.testing import do_bench


def ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median milliseconds of `fn` (triton's do_bench: warm-up, L2 flushed between calls)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory of one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
