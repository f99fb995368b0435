"""Fused Triton kernels for BaseConv's gate y = silu(causal_depthwise_conv(u1, w)) * u2.

They read megatron's in_proj output u [s, b, 2c] in place (u1 = u[..., :c], u2 = u[..., c:];
any strides over s and b, unit stride over channels) and write y [s, b, c]; the backward writes
du [s, b, 2c] in one tensor (du1 | du2, the gradient of in_proj's output as it is), so neither
direction permutes, pads, concatenates or chunks. fp32 accumulation whatever the input dtype.

One program per (block of BT tokens, one sequence, block of BC channels):
  _fwd_kernel      y = silu(a) * u2 with a = sum_j w[:, j] u1[t - (k-1) + j]
  _bwd_da_kernel   da = dy u2 silu'(a) (a recomputed from u1) into an fp32 scratch [s, b, c],
                   du2 = dy silu(a), and per program (TILES blocks of BT tokens) the partial
                   dw[:, j] = sum_t da[t] u1[t-(k-1)+j] (fp32, summed over programs by torch:
                   deterministic, no atomics)
  _bwd_du1_kernel  du1[t] = sum_d w[:, k-1-d] da[t+d]
The backward is two passes because du1[t] needs da at t .. t+k-1: one kernel would recompute
da (and its k-tap conv) k times per token, which kept the former single kernel latency bound
at ~16% of the copy bandwidth; the scratch costs 4 bytes per element written and read back.
Token t < 0 reads the tail [b, c, k-1] when one is given (decoding), else zero. No gradient
flows to the tail (the dispatcher sends a tail that requires grad to the reference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Per program: forward (tokens, channels, warps), backward's da pass (tokens per tile, channels,
# warps, tiles per program), its du1 pass (tokens, channels, warps); benchmarks/mixers.py
# --tune sweeps these (the backward's were chosen on an H200 at 2048 x 16 x 2048 in bf16).
_CFG = {"fwd": (32, 128, 4), "bwd": (16, 64, 2, 8), "bwd_du1": (32, 128, 4)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_KERNEL = 8


def supports(u: torch.Tensor, weight: torch.Tensor) -> bool:
    return (u.dim() == 3 and u.shape[-1] % 2 == 0 and u.dtype in DTYPES
            and weight.dtype in DTYPES and 1 <= weight.shape[-1] <= MAX_KERNEL
            and weight.numel() == u.shape[-1] // 2 * weight.shape[-1])


# Addresses: one int64 base per program and sequence (U + t0 * stride_s + bi * stride_b: past
# 2^31 elements at 32k x 8 x 8192), int32 offsets from it (r = token - t0 is small); this keeps
# the per-element address math 32-bit, which the register budget of these kernels needs.
@triton.jit
def _u1_at(Ub, TAILb, r, t, cols, mt, mc, stride_s, KM1: tl.constexpr, HAS_TAIL: tl.constexpr):
    """u1 at tokens t = t0 + r [BT] (t < 0: the tail or zero), channels cols: [BT, BC] fp32.
    Ub points at u[t0, bi], TAILb at tail[bi]."""
    m = mc[None, :] & (mt & (t >= 0))[:, None]
    x = tl.load(Ub + r[:, None] * stride_s + cols[None, :], mask=m, other=0.).to(tl.float32)
    if HAS_TAIL:
        mb = mc[None, :] & (mt & (t < 0))[:, None]
        x += tl.load(TAILb + cols[None, :] * KM1 + (KM1 + t[:, None]), mask=mb,
                     other=0.).to(tl.float32)
    return x


@triton.jit
def _conv(Ub, W, TAILb, r, t, cols, mt, mc, stride_s, K: tl.constexpr, HAS_TAIL: tl.constexpr,
          BT: tl.constexpr, BC: tl.constexpr):
    """a = sum_j w[:, j] u1[t - (K-1) + j]: [BT, BC] fp32."""
    a = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + cols * K + j, mask=mc, other=0.).to(tl.float32)
        a += _u1_at(Ub, TAILb, r - (K - 1 - j), t - (K - 1 - j), cols, mt, mc, stride_s, K - 1,
                    HAS_TAIL) * w[None, :]
    return a


@triton.jit
def _fwd_kernel(U, W, TAIL, Y, S, C, stride_s, stride_b, y_stride_s, y_stride_b,
                K: tl.constexpr, HAS_TAIL: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    t0, bi = tl.program_id(0) * BT, tl.program_id(1)
    r = tl.arange(0, BT)
    t = t0 + r
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    mt, mc = t < S, cols < C
    Ub = U + (t0.to(tl.int64) * stride_s + bi * stride_b)
    a = _conv(Ub, W, TAIL + bi * C * (K - 1), r, t, cols, mt, mc, stride_s, K, HAS_TAIL, BT, BC)
    m = mt[:, None] & mc[None, :]
    u2 = tl.load(Ub + r[:, None] * stride_s + C + cols[None, :], mask=m, other=0.)
    y = a * tl.sigmoid(a) * u2.to(tl.float32)
    Yb = Y + (t0.to(tl.int64) * y_stride_s + bi * y_stride_b)
    tl.store(Yb + r[:, None] * y_stride_s + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_da_kernel(U, W, TAIL, DY, DU, DA, DWP, S, C, stride_s, stride_b, dy_stride_s,
                   dy_stride_b, K: tl.constexpr, KP: tl.constexpr, HAS_TAIL: tl.constexpr,
                   NEED_DW: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                   TILES: tl.constexpr):
    """da = dy u2 silu'(a) into DA (fp32), du2 = dy silu(a) into du[..., C:], and this
    program's partial dw[:, j] = sum_t da[t] u1[t-(K-1)+j] over its TILES blocks of tokens."""
    pid_t, bi, nb = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = cols < C
    r = tl.arange(0, BT)
    TAILb = TAIL + bi * C * (K - 1)
    taps = tl.arange(0, KP)
    dw = tl.zeros([KP, BC], dtype=tl.float32)  # dw[tap, cols] over this program's tokens
    for tile in range(TILES):
        t0 = (pid_t * TILES + tile) * BT
        t = t0 + r
        mt = t < S
        m = mt[:, None] & mc[None, :]
        Ub = U + (t0.to(tl.int64) * stride_s + bi * stride_b)
        a = _conv(Ub, W, TAILb, r, t, cols, mt, mc, stride_s, K, HAS_TAIL, BT, BC)
        u2 = tl.load(Ub + r[:, None] * stride_s + C + cols[None, :], mask=m, other=0.)
        dy = tl.load(DY + (t0.to(tl.int64) * dy_stride_s + bi * dy_stride_b)
                     + r[:, None] * dy_stride_s + cols[None, :], mask=m, other=0.).to(tl.float32)
        sig = tl.sigmoid(a)
        da = dy * u2.to(tl.float32) * sig * (1. + a * (1. - sig))
        row = t0.to(tl.int64) * nb + bi  # du and DA are contiguous [S, B, *]
        tl.store(DU + row * (2 * C) + r[:, None] * (2 * C * nb) + C + cols[None, :],
                 (dy * a * sig).to(DU.dtype.element_ty), mask=m)
        tl.store(DA + row * C + r[:, None] * (C * nb) + cols[None, :], da, mask=m)
        if NEED_DW:
            for j in tl.static_range(K):  # the conv's loads again: cache hits
                x = _u1_at(Ub, TAILb, r - (K - 1 - j), t - (K - 1 - j), cols, mt, mc, stride_s,
                           K - 1, HAS_TAIL)
                dw += tl.where(taps[:, None] == j, tl.sum(da * x, axis=0)[None, :], 0.)
    if NEED_DW:
        part = (pid_t * nb + bi).to(tl.int64) * C
        tl.store(DWP + (part + cols[None, :]) * K + taps[:, None], dw,
                 mask=mc[None, :] & (taps[:, None] < K))


@triton.jit
def _bwd_du1_kernel(DA, W, DU, S, C, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """du1[t] = sum_d w[:, K-1-d] da[t+d] (u1[t] feeds a[t..t+K-1]) into du[..., :C]."""
    t0, bi, nb = tl.program_id(0) * BT, tl.program_id(1), tl.num_programs(1)
    r = tl.arange(0, BT)
    t = t0 + r
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = cols < C
    row = t0.to(tl.int64) * nb + bi
    du1 = tl.zeros([BT, BC], dtype=tl.float32)
    for d in tl.static_range(K):
        w = tl.load(W + cols * K + (K - 1 - d), mask=mc, other=0.).to(tl.float32)
        m = (t + d < S)[:, None] & mc[None, :]
        da = tl.load(DA + row * C + (r + d)[:, None] * (C * nb) + cols[None, :], mask=m, other=0.)
        du1 += da * w[None, :]
    tl.store(DU + row * (2 * C) + r[:, None] * (2 * C * nb) + cols[None, :],
             du1.to(DU.dtype.element_ty), mask=(t < S)[:, None] & mc[None, :])


def _prepare(u, weight, tail):
    if u.stride(-1) != 1:
        u = u.contiguous()
    c, k = u.shape[-1] // 2, weight.shape[-1]
    w = weight.reshape(c, k).contiguous()
    if tail is not None:
        tail = tail.to(u.dtype).contiguous()
    return u, w, tail


def _forward(u, w, tail):
    S, B, C2 = u.shape
    C, K = C2 // 2, w.shape[-1]
    y = torch.empty(S, B, C, device=u.device, dtype=u.dtype)
    BT, BC, warps = _CFG["fwd"]
    BT = min(BT, triton.next_power_of_2(S))  # decoding: one token
    if y.numel():
        _fwd_kernel[(triton.cdiv(S, BT), B, triton.cdiv(C, BC))](
            u, w, tail if tail is not None else u, y, S, C, u.stride(0), u.stride(1),
            y.stride(0), y.stride(1), K=K, HAS_TAIL=tail is not None, BT=BT, BC=BC,
            num_warps=warps)
    return y


def _backward(u, w, tail, dy, need_dw):
    """(du [s, b, 2c] in u's dtype, dw [c, k] fp32 or None)."""
    S, B, C2 = u.shape
    C, K = C2 // 2, w.shape[-1]
    BT, BC, warps, tiles = _CFG["bwd"]
    tiles = max(1, min(tiles, triton.cdiv(S, BT)))
    grid = (triton.cdiv(S, BT * tiles), B, triton.cdiv(C, BC))
    du = torch.empty(S, B, C2, device=u.device, dtype=u.dtype)
    da = torch.empty(S, B, C, device=u.device, dtype=torch.float32)
    # per-program partial sums of dw, reduced by torch below (deterministic, no atomics)
    parts = torch.empty(grid[0] * B if need_dw else 1, C, K, device=u.device, dtype=torch.float32)
    if du.numel():
        _bwd_da_kernel[grid](
            u, w, tail if tail is not None else u, dy, du, da, parts, S, C, u.stride(0),
            u.stride(1), dy.stride(0), dy.stride(1), K=K, KP=triton.next_power_of_2(K),
            HAS_TAIL=tail is not None, NEED_DW=need_dw, BT=BT, BC=BC, TILES=tiles,
            num_warps=warps)
        BT, BC, warps = _CFG["bwd_du1"]
        _bwd_du1_kernel[(triton.cdiv(S, BT), B, triton.cdiv(C, BC))](
            da, w, du, S, C, K=K, BT=BT, BC=BC, num_warps=warps)
    elif need_dw:
        parts.zero_()
    return du, parts.sum(0) if need_dw else None


class GatedCausalConv(torch.autograd.Function):
    """Differentiable in u and weight; the tail (decoding) is a constant."""

    @staticmethod
    def forward(ctx, u, weight, tail):
        u_, w, tail = _prepare(u, weight, tail)
        ctx.save_for_backward(u_, w, tail)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return _forward(u_, w, tail)

    @staticmethod
    def backward(ctx, dy):
        u, w, tail = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        du, dw = _backward(u, w, tail, dy, ctx.needs_input_grad[1])
        if dw is not None:
            dw = dw.reshape(ctx.weight_shape).to(ctx.weight_dtype)
        return du, dw, None


def gated_causal_conv_triton(u: torch.Tensor, weight: torch.Tensor,
                             tail: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal_depthwise_conv(u1, weight)) * u2: u [s, b, 2c], weight [c, 1, k], tail
    [b, c, k-1] (no gradient) or None -> [s, b, c] in u's dtype."""
    if tail is not None:
        tail = tail.detach()
    return GatedCausalConv.apply(u, weight, tail)
