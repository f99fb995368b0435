"""RMSNorm, the spec as plain PyTorch.

Per row x [d] of x [..., d], with weight [d]:

    y = x / sqrt(mean(x^2) + eps) * weight

computed in fp32 (fp64 for fp64 inputs, which the tests use) and rounded once to x's dtype,
whatever the weight's dtype: torch.nn.functional.rms_norm's result up to that rounding (torch
rounds x_hat to x's dtype before the weight multiplies it when it cannot take its fused path).
"""
from __future__ import annotations

import torch
from torch import Tensor


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y [..., d] in x's dtype of x [..., d] and weight [d]; differentiable in both."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(acc)).to(x.dtype)
