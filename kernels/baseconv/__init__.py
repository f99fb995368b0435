"""BaseConv's gated causal depthwise convolution: one public API, kernels selected behind it.

The fused Triton kernel (kernels/baseconv/triton_baseconv.py) on CUDA; the PyTorch reference
(kernels/baseconv/reference.py) on CPU, and on CUDA when Triton failed to import, the dtypes
or kernel size are not supported, or the tail requires a gradient. A CUDA call that falls back
warns once per reason.

u is megatron's in_proj output [s, b, 2c] (u1 = u[..., :c], u2 = u[..., c:]); weight the
conv1d weight [c, 1, k]; tail [b, c, k-1] the u1 values of the k-1 tokens before u (decoding);
bias [2c] in_proj's bias when in_proj skipped adding it (skip_bias_add): added to u as it is read.
"""
from __future__ import annotations

from types import ModuleType

from torch import Tensor

from kernels.optional import OptionalKernels
from kernels.baseconv.reference import conv_tail, gated_causal_conv_reference

__all__ = ["conv_tail", "gated_causal_conv", "gated_causal_conv_reference", "triton_available"]

_KERNELS = OptionalKernels("kernels.baseconv.triton_baseconv", "BaseConv",
                           "unfused, slower and more memory")


def triton_available() -> bool:
    return _KERNELS.available()


def _triton_for(u: Tensor, weight: Tensor, tail: Tensor | None,
                bias: Tensor | None) -> ModuleType | None:
    if not u.is_cuda:
        return None
    mod = _KERNELS.load_for_cuda()
    if mod is None:
        return None
    if not mod.supports(u, weight, bias):
        _KERNELS.warn_fallback_once("shape", f"the Triton kernel does not support u {list(u.shape)} "
                            f"{u.dtype}, weight {list(weight.shape)} {weight.dtype}"
                            + ("" if bias is None else f", bias {list(bias.shape)} {bias.dtype}"))
    elif tail is not None and tail.requires_grad:
        _KERNELS.warn_fallback_once("tail", "the Triton kernel gives no gradient to the tail")
    else:
        return mod
    return None


def gated_causal_conv(u: Tensor, weight: Tensor, tail: Tensor | None = None,
                      bias: Tensor | None = None) -> Tensor:
    """y = silu(causal_depthwise_conv(u1 + bias[:c], weight)) * (u2 + bias[c:]) -> [s, b, c] in
    u's dtype (no bias: none added); differentiable in u, weight and bias."""
    if (mod := _triton_for(u, weight, tail, bias)) is not None:
        return mod.gated_causal_conv_triton(u, weight, tail, bias)
    return gated_causal_conv_reference(u, weight, tail, bias)
