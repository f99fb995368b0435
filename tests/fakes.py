"""Stand-ins for a GPU in the CPU tests of the kernels: for the dispatchers (kernels/pla,
kernels/baseconv, kernels/cross_entropy, the sliding-window path), which decide on `is_cuda`
and on their optional kernels, and Triton's interpreter for the kernels themselves."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

from kernels.optional import OptionalKernels


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: only the dispatcher looks."""

    @property
    def is_cuda(self) -> bool:
        return True


def replace_kernels(monkeypatch, dispatcher: ModuleType, module, error: Exception | None) -> None:
    """Give `dispatcher` (a module with `_KERNELS`) this Triton `module` or import `error`,
    with nothing warned yet."""
    current = dispatcher._KERNELS
    kernels = OptionalKernels(current.name, current.what, current.fallback_cost)
    kernels._module, kernels.error = module, error
    monkeypatch.setattr(dispatcher, "_KERNELS", kernels)


def kernel_state_fixture(dispatcher: ModuleType):
    """A fixture `kernel_state(module, error)` that sets `dispatcher`'s Triton module and import
    error for one test (`replace_kernels`); a test module binds it to a name to use it."""
    @pytest.fixture
    def kernel_state(monkeypatch):
        def set_state(module, error):
            replace_kernels(monkeypatch, dispatcher, module, error)
        return set_state
    return kernel_state


def fallback_warnings(calls: list[Callable], what: str) -> tuple[list, list[str]]:
    """Run `calls`; (their results, the messages warned by the dispatcher named `what`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [call() for call in calls]
    return results, [str(w.message) for w in caught if str(w.message).startswith(f"{what}:")]


REPO = Path(__file__).resolve().parent.parent


def run_under_interpreter(snippet: str) -> subprocess.CompletedProcess:
    """Python `snippet` with TRITON_INTERPRET=1 in a subprocess (the flag is read when the
    kernels are defined), from the repo root: Triton kernels on CPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", snippet], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
