"""RMSNorm over the last dimension: one public API, kernels selected behind it.

The fused Triton kernels (kernels/rms_norm/triton_rms_norm.py) on CUDA; the PyTorch reference
(kernels/rms_norm/reference.py) on CPU, and on CUDA when Triton failed to import or the shape or
dtypes are not supported. A CUDA call that falls back warns once per reason.

x [..., d] (the model's [s, b, hidden] activations), weight [d]; y in x's dtype, fp32 math.
"""
from __future__ import annotations

from types import ModuleType

from torch import Tensor

from kernels.optional import OptionalKernels
from kernels.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference", "triton_available"]

_KERNELS = OptionalKernels("kernels.rms_norm.triton_rms_norm", "RMSNorm",
                           "unfused, slower and more memory")


def triton_available() -> bool:
    return _KERNELS.available()


def _triton_for(x: Tensor, weight: Tensor) -> ModuleType | None:
    if not x.is_cuda:
        return None
    mod = _KERNELS.load_for_cuda()
    if mod is None:
        return None
    if not mod.supports(x, weight):
        _KERNELS.warn_fallback_once("shape", f"the Triton kernel does not support x "
                                    f"{list(x.shape)} {x.dtype}, weight {list(weight.shape)} "
                                    f"{weight.dtype}")
        return None
    return mod


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2, -1) + eps) * weight -> [..., d] in x's dtype; differentiable in x and
    weight."""
    if (mod := _triton_for(x, weight)) is not None:
        return mod.rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
