"""A Triton kernel for rotary embedding fused with the split of megatron's packed qkv
(kernels/rotary/reference.py), forward and backward.

Unfused, megatron splits mixed [s, b, groups * (q_per_group + 2) * d] into views, rotates q and
k with five elementwise kernels each (two products, a negation, a cat and a sum; cos and sin
too) and its backward does the same again and then concatenates dq, dk and dv into the
gradient of mixed. Here each direction is one pass over the bytes of qkv:

  forward   mixed -> q, k (rotated) and v, each contiguous [s, b, heads, d]
  backward  dq, dk (rotated back), dv -> d(mixed) [s, b, groups * (q_per_group + 2) * d]

One program per (block of BR rows of the flattened s x b, one head slot of mixed: a query, the
key or the value head of a group); a row's two halves are loaded separately, so rotate_half is
an index, not a copy. fp32 math; cos and sin of the fp32 angles in fp32 (megatron rounds them
to the activations' dtype first: the results differ by about one rounding). The angles are
freqs [s, 1, 1, d] (rotary over the whole head; megatron's rotary_percent < 1 takes the
reference). Backward of y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves 1 and 2 of a head):
dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# (rows per program, warps), from `benchmarks/rotary.py --tune` on an H200 at 2048 x 16 x 16
# heads x 64 in bf16, forward + backward: (16, 4) 0.435 ms and (32, 8) 0.434, about 4 elements
# of a half-row per thread; (64, 4) 1.263 ms, (16, 1) 1.252.
CONFIG = (16, 4)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def supports(mixed: torch.Tensor, freqs: torch.Tensor, groups: int, head_dim: int) -> bool:
    if mixed.dim() != 3 or mixed.dtype not in DTYPES or freqs.dtype != torch.float32:
        return False
    s, _, width = mixed.shape
    per_group = width // groups if groups > 0 else 0
    return (head_dim % 2 == 0 and 0 < head_dim <= MAX_HEAD_DIM and per_group * groups == width
            and per_group % head_dim == 0 and per_group >= 3 * head_dim
            and freqs.dim() == 4 and freqs.shape[0] == s and freqs.shape[-1] == head_dim
            and freqs[0].numel() == head_dim)


@triton.jit
def _rotate(SRC, DST, ANGLES, mask, HALF: tl.constexpr, BACKWARD: tl.constexpr):
    """Rotate (or rotate back) the [BR, 2 HALF] rows at SRC into DST; each pointer block points
    at the first half of its rows."""
    x1 = tl.load(SRC, mask=mask, other=0.).to(tl.float32)
    x2 = tl.load(SRC + HALF, mask=mask, other=0.).to(tl.float32)
    f1 = tl.load(ANGLES, mask=mask, other=0.)
    f2 = tl.load(ANGLES + HALF, mask=mask, other=0.)
    c1, s1, c2, s2 = tl.cos(f1), tl.sin(f1), tl.cos(f2), tl.sin(f2)
    if BACKWARD:
        y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    tl.store(DST, y1.to(DST.dtype.element_ty), mask=mask)
    tl.store(DST + HALF, y2.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _copy(SRC, DST, mask, HALF: tl.constexpr):
    tl.store(DST, tl.load(SRC, mask=mask), mask=mask)
    tl.store(DST + HALF, tl.load(SRC + HALF, mask=mask), mask=mask)


@triton.jit
def _kernel(M, Q, K, V, FREQS, rows, B, G, stride_s, stride_b,
            QPG: tl.constexpr, D: tl.constexpr, HALF_P: tl.constexpr, BACKWARD: tl.constexpr,
            BR: tl.constexpr):
    """Forward: M (mixed) -> Q, K, V. Backward: Q, K, V (the gradients) -> M."""
    slot = tl.program_id(1)  # head slot in mixed: g * (QPG + 2) + j
    g = slot // (QPG + 2)
    j = slot - g * (QPG + 2)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    s = r // B
    half = tl.arange(0, HALF_P)
    mask = (r < rows)[:, None] & (half < D // 2)[None, :]
    at_m = M + (s * stride_s + (r - s * B) * stride_b + slot * D)[:, None] + half[None, :]
    angles = FREQS + (s * D)[:, None] + half[None, :]
    if j < QPG:
        at_q = Q + ((r * G + g) * QPG + j)[:, None] * D + half[None, :]
        if BACKWARD:
            _rotate(at_q, at_m, angles, mask, D // 2, True)
        else:
            _rotate(at_m, at_q, angles, mask, D // 2, False)
    elif j == QPG:
        at_k = K + (r * G + g)[:, None] * D + half[None, :]
        if BACKWARD:
            _rotate(at_k, at_m, angles, mask, D // 2, True)
        else:
            _rotate(at_m, at_k, angles, mask, D // 2, False)
    else:
        at_v = V + (r * G + g)[:, None] * D + half[None, :]
        if BACKWARD:
            _copy(at_v, at_m, mask, D // 2)
        else:
            _copy(at_m, at_v, mask, D // 2)


def _launch(mixed, q, k, v, angles, groups, head_dim, backward):
    s, b, width = mixed.shape
    rows, qpg = s * b, width // groups // head_dim - 2
    br, warps = CONFIG
    if rows:
        _kernel[(triton.cdiv(rows, br), groups * (qpg + 2))](
            mixed, q, k, v, angles, rows, b, groups, mixed.stride(0), mixed.stride(1),
            QPG=qpg, D=head_dim, HALF_P=triton.next_power_of_2(head_dim // 2),
            BACKWARD=backward, BR=br, num_warps=warps)


class SplitRotaryQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed, freqs, groups, head_dim):
        if mixed.stride(-1) != 1:
            mixed = mixed.contiguous()
        s, b, width = mixed.shape
        angles = freqs.reshape(s, head_dim).contiguous()
        qpg = width // groups // head_dim - 2
        q = mixed.new_empty(s, b, groups * qpg, head_dim)
        k, v = mixed.new_empty(s, b, groups, head_dim), mixed.new_empty(s, b, groups, head_dim)
        _launch(mixed, q, k, v, angles, groups, head_dim, backward=False)
        ctx.save_for_backward(angles)
        ctx.shape, ctx.groups, ctx.head_dim = mixed.shape, groups, head_dim
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (angles,) = ctx.saved_tensors
        dmixed = dq.new_empty(ctx.shape)
        dq, dk, dv = (t.contiguous() for t in (dq, dk, dv))
        _launch(dmixed, dq, dk, dv, angles, ctx.groups, ctx.head_dim, backward=True)
        return dmixed, None, None, None


def split_rotary_qkv_triton(mixed: torch.Tensor, freqs: torch.Tensor, groups: int,
                            head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels.rotary.split_rotary_qkv on the GPU (see there); freqs fp32 [s, 1, 1, head_dim]."""
    return SplitRotaryQKV.apply(mixed, freqs, groups, head_dim)
