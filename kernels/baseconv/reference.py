"""BaseConv's gated causal depthwise convolution, the spec as plain PyTorch.

BaseConv (megatron_jrt/mixers/baseconv.py) projects x to u = in_proj(x) [s, b, 2c] (per TP
rank: u1 = u[..., :c], u2 = u[..., c:]) and computes, per channel ch and token t,

    y[t, :, ch] = silu(sum_j w[ch, 0, j] * u1[t - (k-1) + j, :, ch]) * u2[t, :, ch]

with w the conv1d weight [c, 1, k] (w[..., k-1] multiplies the current token). Tokens before
the first one are the `tail` [b, c, k-1] (the u1 values of the previous k-1 tokens, oldest
first, for decoding) or zeros. Given in_proj's `bias` [2c] (in_proj then skips its own add: one
pass over u fewer), u1 + bias[:c] and u2 + bias[c:] replace u1 and u2; the tail holds biased u1
values. Accumulation is fp32 (fp64 for fp64 inputs, which the tests use); y is in u's dtype.

`gated_causal_conv_conv1d` is the same function the way BaseConv computed it before the fused
kernel (chunk, permute to [b, c, s], cat of the tail, F.conv1d, silu, permute, multiply, all in
u's dtype): the baseline that the tests and benchmarks/mixers.py compare with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _before(u1: Tensor, tail: Tensor | None, keep: int) -> Tensor:
    """The u1 values of the `keep` tokens before u1 as [keep, b, c]: the tail, or zeros."""
    if tail is None:
        return u1.new_zeros(keep, *u1.shape[1:])
    return tail.permute(2, 0, 1).to(u1.dtype)


def gated_causal_conv_reference(u: Tensor, weight: Tensor, tail: Tensor | None = None,
                                bias: Tensor | None = None) -> Tensor:
    """y = silu(causal_depthwise_conv(u1, weight)) * u2: u [s, b, 2c], weight [c, 1, k] (or
    [c, k]), tail [b, c, k-1] or None, bias [2c] or None -> y [s, b, c] in u's dtype.
    Differentiable."""
    c = u.shape[-1] // 2
    k = weight.shape[-1]
    w = weight.reshape(c, k).to(_acc_dtype(u))
    u1, u2 = u[..., :c].to(w.dtype), u[..., c:].to(w.dtype)
    if bias is not None:
        u1, u2 = u1 + bias[:c].to(w.dtype), u2 + bias[c:].to(w.dtype)
    x = torch.cat([_before(u[..., :c], tail, k - 1).to(w.dtype), u1], dim=0)  # [k-1+s, b, c]
    s = u.shape[0]
    conv = sum(x[j:j + s] * w[:, j] for j in range(k))
    return (F.silu(conv) * u2).to(u.dtype)


def gated_causal_conv_conv1d(u: Tensor, weight: Tensor, tail: Tensor | None = None) -> Tensor:
    """gated_causal_conv_reference through a depthwise F.conv1d on [b, c, s] (weight [c, 1, k])."""
    u1, u2 = u.chunk(2, dim=-1)
    x = u1.permute(1, 2, 0)
    x = torch.cat([_before(u1, tail, weight.shape[-1] - 1).permute(1, 2, 0), x], dim=-1)
    conv = F.conv1d(x, weight, groups=weight.shape[0])
    return F.silu(conv).permute(2, 0, 1) * u2


def conv_tail(u: Tensor, kernel_size: int, tail: Tensor | None = None,
              bias: Tensor | None = None) -> Tensor:
    """The tail after u: the u1 values (+ bias[:c] when given) of the last k-1 tokens (earlier
    ones from `tail`, or zeros, when u is shorter), [b, c, k-1] in u's dtype, a fresh tensor
    (not a view of u)."""
    c, keep = u.shape[-1] // 2, kernel_size - 1
    u1 = u[..., :c]
    recent = u1[u1.shape[0] - min(keep, u1.shape[0]):]
    if bias is not None:
        recent = (recent + bias[:c]).to(u.dtype)
    if recent.shape[0] < keep:
        recent = torch.cat([_before(u1, tail, keep), recent], dim=0)[recent.shape[0]:]
    return recent.permute(1, 2, 0).clone(memory_format=torch.contiguous_format)
