"""Stand-ins for a GPU in the CPU tests of the kernel dispatchers (kernels/pla, kernels/baseconv,
the sliding-window path): the dispatchers decide on `is_cuda` and on their optional kernels."""
from __future__ import annotations

import warnings
from types import ModuleType
from typing import Callable

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


def fallback_warnings(calls: list[Callable], what: str) -> tuple[list, list[str]]:
    """Run `calls`; (their results, the messages warned by the dispatcher named `what`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [call() for call in calls]
    return results, [str(w.message) for w in caught if str(w.message).startswith(f"{what}:")]
