"""A fused-kernel module that may be missing, imported at first use, with fallbacks said once.

Both dispatchers (kernels/pla, kernels/baseconv) pick a Triton module on CUDA and the PyTorch
reference otherwise. Importing Triton code can fail (no triton, no GPU backend): the error is
kept and reported once, not raised, because a slower run is worth knowing about, not stopping.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType


class FallbackWarnings:
    """One warning per kind of fallback to a slower path, per process."""

    def __init__(self, what: str, fallback: str):
        self.what, self.fallback = what, fallback
        self._warned: set[str] = set()

    def warn_once(self, kind: str, reason: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{self.what}: {reason}; {self.fallback}", RuntimeWarning, stacklevel=4)


class OptionalKernels:
    """The module `name`, imported at the first `load()`; its import error kept in `error`."""

    def __init__(self, name: str, what: str, fallback_cost: str):
        self.name, self.what, self.fallback_cost = name, what, fallback_cost
        self.error: Exception | None = None
        self._module: ModuleType | None = None
        self._fallbacks = FallbackWarnings(what, f"using the PyTorch reference, {fallback_cost}")

    def load(self) -> ModuleType | None:
        if self._module is None and self.error is None:
            try:
                self._module = importlib.import_module(self.name)
            except Exception as e:  # no triton, or no GPU backend
                self.error = e
        return self._module

    def available(self) -> bool:
        return self.load() is not None

    def load_for_cuda(self) -> ModuleType | None:
        """The module for a CUDA call; None after warning once that it failed to import."""
        module = self.load()
        if module is None:
            self.warn_fallback_once("import", "Triton kernels unavailable on CUDA "
                                    f"({type(self.error).__name__}: {self.error})")
        return module

    def warn_fallback_once(self, kind: str, reason: str) -> None:
        self._fallbacks.warn_once(kind, reason)
