"""Rotary position embedding on megatron's packed qkv, the spec as plain PyTorch.

megatron-core's SelfAttention projects to mixed [s, b, groups * (q_per_group + 2) * d] (per query
group: its query heads, then one key head, then one value head), splits it into views and rotates
q and k (megatron.core.models.common.embeddings.rope_utils, the unfused "bshd" path, not
interleaved): with the angles freqs [s, 1, 1, r] (r <= d; megatron's are cat(f, f)),

    t[..., :r] -> t[..., :r] * cos(freqs) + rotate_half(t[..., :r]) * sin(freqs),
    rotate_half(x) = cat(-x[..., r/2:], x[..., :r/2])

with cos and sin rounded to t's dtype first, as megatron does. This file is that math (the tests
check it against megatron's function bit for bit) plus the split.
"""
from __future__ import annotations

import torch
from torch import Tensor


def rotate(t: Tensor, freqs: Tensor) -> Tensor:
    """megatron's rotary on t [s, b, heads, d] with freqs [s, 1, 1, r] (r <= d)."""
    r = freqs.shape[-1]
    rot, rest = t[..., :r], t[..., r:]
    cos, sin = torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)
    first, second = torch.chunk(rot, 2, dim=-1)
    rot = rot * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rot, rest), dim=-1)


def split_heads(mixed: Tensor, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """mixed [s, b, groups * (q_per_group + 2) * d] -> views q [s, b, groups * q_per_group, d],
    k and v [s, b, groups, d], as megatron's get_query_key_value_tensors splits it."""
    s, b, width = mixed.shape
    per_group = width // groups
    q, k, v = mixed.view(s, b, groups, per_group).split(
        [per_group - 2 * head_dim, head_dim, head_dim], dim=-1)
    return q.reshape(s, b, groups * (per_group // head_dim - 2), head_dim), k, v


def split_rotary_qkv_reference(mixed: Tensor, freqs: Tensor, groups: int,
                               head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(rotated q, rotated k, v) of megatron's packed qkv; differentiable in mixed."""
    q, k, v = split_heads(mixed, groups, head_dim)
    return rotate(q, freqs), rotate(k, freqs), v
