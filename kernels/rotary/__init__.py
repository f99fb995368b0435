"""Rotary position embedding fused with the split of megatron's packed qkv: one public API,
kernels selected behind it.

The Triton kernel (kernels/rotary/triton_rotary.py) on CUDA; the PyTorch reference
(kernels/rotary/reference.py, megatron's own math) on CPU, and on CUDA when Triton failed to
import or the shapes are not supported. A CUDA call that falls back warns once per reason.
"""
from __future__ import annotations

from types import ModuleType

from torch import Tensor

from kernels.optional import OptionalKernels
from kernels.rotary.reference import rotate, split_heads, split_rotary_qkv_reference

__all__ = ["rotate", "split_heads", "split_rotary_qkv", "split_rotary_qkv_reference",
           "triton_available"]

_KERNELS = OptionalKernels("kernels.rotary.triton_rotary", "rotary qkv",
                           "a split, two rotations and their copies")


def triton_available() -> bool:
    return _KERNELS.available()


def _triton_for(mixed: Tensor, freqs: Tensor, groups: int, head_dim: int) -> ModuleType | None:
    if not mixed.is_cuda:
        return None
    mod = _KERNELS.load_for_cuda()
    if mod is None:
        return None
    if not mod.supports(mixed, freqs, groups, head_dim):
        _KERNELS.warn_fallback_once("shape", f"the Triton kernel does not support qkv "
                                    f"{list(mixed.shape)} {mixed.dtype} in {groups} groups of "
                                    f"head size {head_dim}, freqs {list(freqs.shape)}")
        return None
    return mod


def split_rotary_qkv(mixed: Tensor, freqs: Tensor, groups: int,
                     head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """megatron's packed qkv [s, b, groups * (q_per_group + 2) * head_dim] and rotary angles
    freqs [s, 1, 1, r] -> q [s, b, groups * q_per_group, head_dim] and k [s, b, groups, head_dim]
    rotated, v [s, b, groups, head_dim]; differentiable in mixed."""
    if (mod := _triton_for(mixed, freqs, groups, head_dim)) is not None:
        return mod.split_rotary_qkv_triton(mixed, freqs, groups, head_dim)
    return split_rotary_qkv_reference(mixed, freqs, groups, head_dim)
