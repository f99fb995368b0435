"""Fused Triton kernels for BaseConv's gate y = silu(causal_depthwise_conv(u1, w)) * u2.

They read megatron's in_proj output u [s, b, 2c] in place (u1 = u[..., :c], u2 = u[..., c:];
any strides over s and b, unit stride over channels) and write y [s, b, c]; the backward writes
du [s, b, 2c] in one tensor (du1 | du2, the gradient of in_proj's output as it is), so neither
direction permutes, pads, concatenates or chunks. fp32 accumulation whatever the input dtype.
With in_proj's bias [2c] (in_proj skips its add), u1 + bias[:c] and u2 + bias[c:] are formed in
fp32 as u is loaded, and the bias gradient, du summed over tokens, comes from per-program
partial sums of du2 and du1 in the two backward passes.

One program per (block of BT tokens, one sequence, block of BC channels):
  _fwd_kernel      y = silu(a) * u2 with a = sum_j w[:, j] u1[t - (k-1) + j]
  _bwd_da_kernel   da = dy u2 silu'(a) (a recomputed from u1) into an fp32 scratch [s, b, c],
                   du2 = dy silu(a), and per program (TILES blocks of BT tokens) the partial
                   dw[:, j] = sum_t da[t] u1[t-(k-1)+j] and sum_t du2[t] (fp32, summed over
                   programs by torch: deterministic, no atomics)
  _bwd_du1_kernel  du1[t] = sum_d w[:, k-1-d] da[t+d], and its partial sum over tokens
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


def supports(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    return (u.dim() == 3 and u.shape[-1] % 2 == 0 and u.dtype in DTYPES
            and weight.dtype in DTYPES and 1 <= weight.shape[-1] <= MAX_KERNEL
            and weight.numel() == u.shape[-1] // 2 * weight.shape[-1]
            and (bias is None or (bias.dtype in DTYPES and bias.shape == u.shape[-1:])))


# Addresses: one int64 base per program and sequence (U + t0 * stride_s + bi * stride_b: past
# 2^31 elements at 32k x 8 x 8192), int32 offsets from it (r = token - t0 is small); this keeps
# the per-element address math 32-bit, which the register budget of these kernels needs.
@triton.jit
def _bias(B, cols, mc, HAS_BIAS: tl.constexpr, BC: tl.constexpr):
    """B[cols] as fp32 [BC]; zeros (unused) without a bias."""
    b = tl.zeros([BC], dtype=tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mc, other=0.).to(tl.float32)
    return b


@triton.jit
def _u1_at(Ub, TAILb, b1, r, t, cols, mt, mc, stride_s, KM1: tl.constexpr,
           HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """u1 (+ b1) at tokens t = t0 + r [BT] (t < 0: the tail, already biased, or zero), channels
    cols: [BT, BC] fp32. Ub points at u[t0, bi], TAILb at tail[bi]."""
    m = mc[None, :] & (mt & (t >= 0))[:, None]
    x = tl.load(Ub + r[:, None] * stride_s + cols[None, :], mask=m, other=0.).to(tl.float32)
    if HAS_BIAS:
        x += tl.where(m, b1[None, :], 0.)
    if HAS_TAIL:
        mb = mc[None, :] & (mt & (t < 0))[:, None]
        x += tl.load(TAILb + cols[None, :] * KM1 + (KM1 + t[:, None]), mask=mb,
                     other=0.).to(tl.float32)
    return x


@triton.jit
def _conv(Ub, W, TAILb, b1, r, t, cols, mt, mc, stride_s, K: tl.constexpr,
          HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """a = sum_j w[:, j] u1[t - (K-1) + j]: [BT, BC] fp32."""
    a = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(W + cols * K + j, mask=mc, other=0.).to(tl.float32)
        a += _u1_at(Ub, TAILb, b1, r - (K - 1 - j), t - (K - 1 - j), cols, mt, mc, stride_s,
                    K - 1, HAS_TAIL, HAS_BIAS) * w[None, :]
    return a


@triton.jit
def _fwd_kernel(U, W, TAIL, BIAS, Y, S, C, stride_s, stride_b, y_stride_s, y_stride_b,
                K: tl.constexpr, HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr,
                BT: tl.constexpr, BC: tl.constexpr):
    t0, bi = tl.program_id(0) * BT, tl.program_id(1)
    r = tl.arange(0, BT)
    t = t0 + r
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    mt, mc = t < S, cols < C
    Ub = U + (t0.to(tl.int64) * stride_s + bi * stride_b)
    a = _conv(Ub, W, TAIL + bi * C * (K - 1), _bias(BIAS, cols, mc, HAS_BIAS, BC), r, t, cols,
              mt, mc, stride_s, K, HAS_TAIL, HAS_BIAS, BT, BC)
    m = mt[:, None] & mc[None, :]
    u2 = tl.load(Ub + r[:, None] * stride_s + C + cols[None, :], mask=m, other=0.).to(tl.float32)
    if HAS_BIAS:
        u2 += _bias(BIAS + C, cols, mc, HAS_BIAS, BC)[None, :]
    y = a * tl.sigmoid(a) * u2
    Yb = Y + (t0.to(tl.int64) * y_stride_s + bi * y_stride_b)
    tl.store(Yb + r[:, None] * y_stride_s + cols[None, :], y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _bwd_da_kernel(U, W, TAIL, BIAS, DY, DU, DA, DWP, DB2P, S, C, stride_s, stride_b,
                   dy_stride_s, dy_stride_b, K: tl.constexpr, KP: tl.constexpr,
                   HAS_TAIL: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr,
                   NEED_DB: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                   TILES: tl.constexpr):
    """da = dy u2 silu'(a) into DA (fp32), du2 = dy silu(a) into du[..., C:], and this
    program's partial dw[:, j] = sum_t da[t] u1[t-(K-1)+j] and sum_t du2[t] over its TILES
    blocks of tokens."""
    pid_t, bi, nb = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    cols = tl.program_id(2) * BC + tl.arange(0, BC)
    mc = cols < C
    r = tl.arange(0, BT)
    TAILb = TAIL + bi * C * (K - 1)
    b1, b2 = _bias(BIAS, cols, mc, HAS_BIAS, BC), _bias(BIAS + C, cols, mc, HAS_BIAS, BC)
    taps = tl.arange(0, KP)
    dw = tl.zeros([KP, BC], dtype=tl.float32)  # dw[tap, cols] over this program's tokens
    db2 = tl.zeros([BC], dtype=tl.float32)
    for tile in range(TILES):
        t0 = (pid_t * TILES + tile) * BT
        t = t0 + r
        mt = t < S
        m = mt[:, None] & mc[None, :]
        Ub = U + (t0.to(tl.int64) * stride_s + bi * stride_b)
        a = _conv(Ub, W, TAILb, b1, r, t, cols, mt, mc, stride_s, K, HAS_TAIL, HAS_BIAS, BT, BC)
        u2 = tl.load(Ub + r[:, None] * stride_s + C + cols[None, :], mask=m,
                     other=0.).to(tl.float32)
        if HAS_BIAS:
            u2 += b2[None, :]
        dy = tl.load(DY + (t0.to(tl.int64) * dy_stride_s + bi * dy_stride_b)
                     + r[:, None] * dy_stride_s + cols[None, :], mask=m, other=0.).to(tl.float32)
        sig = tl.sigmoid(a)
        da = dy * u2 * sig * (1. + a * (1. - sig))
        du2 = dy * a * sig  # zero where masked: dy is
        if NEED_DB:
            db2 += tl.sum(du2, axis=0)
        row = t0.to(tl.int64) * nb + bi  # du and DA are contiguous [S, B, *]
        tl.store(DU + row * (2 * C) + r[:, None] * (2 * C * nb) + C + cols[None, :],
                 du2.to(DU.dtype.element_ty), mask=m)
        tl.store(DA + row * C + r[:, None] * (C * nb) + cols[None, :], da, mask=m)
        if NEED_DW:
            for j in tl.static_range(K):  # the conv's loads again: cache hits
                x = _u1_at(Ub, TAILb, b1, r - (K - 1 - j), t - (K - 1 - j), cols, mt, mc,
                           stride_s, K - 1, HAS_TAIL, HAS_BIAS)
                dw += tl.where(taps[:, None] == j, tl.sum(da * x, axis=0)[None, :], 0.)
    part = (pid_t * nb + bi).to(tl.int64) * C
    if NEED_DW:
        tl.store(DWP + (part + cols[None, :]) * K + taps[:, None], dw,
                 mask=mc[None, :] & (taps[:, None] < K))
    if NEED_DB:
        tl.store(DB2P + part + cols, db2, mask=mc)


@triton.jit
def _bwd_du1_kernel(DA, W, DU, DB1P, S, C, K: tl.constexpr, NEED_DB: tl.constexpr,
                    BT: tl.constexpr, BC: tl.constexpr):
    """du1[t] = sum_d w[:, K-1-d] da[t+d] (u1[t] feeds a[t..t+K-1]) into du[..., :C], and this
    program's sum_t du1[t]."""
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
    if NEED_DB:  # rows t >= S are zero: every da they read is masked
        part = (tl.program_id(0) * nb + bi).to(tl.int64) * C
        tl.store(DB1P + part + cols, tl.sum(du1, axis=0), mask=mc)


def _prepare(u, weight, tail, bias):
    if u.stride(-1) != 1:
        u = u.contiguous()
    c, k = u.shape[-1] // 2, weight.shape[-1]
    w = weight.reshape(c, k).contiguous()
    if tail is not None:
        tail = tail.to(u.dtype).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return u, w, tail, bias


def _forward(u, w, tail, bias):
    S, B, C2 = u.shape
    C, K = C2 // 2, w.shape[-1]
    y = torch.empty(S, B, C, device=u.device, dtype=u.dtype)
    BT, BC, warps = _CFG["fwd"]
    BT = min(BT, triton.next_power_of_2(S))  # decoding: one token
    if y.numel():
        _fwd_kernel[(triton.cdiv(S, BT), B, triton.cdiv(C, BC))](
            u, w, tail if tail is not None else u, bias if bias is not None else u, y, S, C,
            u.stride(0), u.stride(1), y.stride(0), y.stride(1), K=K, HAS_TAIL=tail is not None,
            HAS_BIAS=bias is not None, BT=BT, BC=BC, num_warps=warps)
    return y


def _backward(u, w, tail, bias, dy, need_dw, need_db):
    """(du [s, b, 2c] in u's dtype, dw [c, k] fp32 or None, d(bias) [2c] fp32 or None)."""
    S, B, C2 = u.shape
    C, K = C2 // 2, w.shape[-1]
    BT, BC, warps, tiles = _CFG["bwd"]
    tiles = max(1, min(tiles, triton.cdiv(S, BT)))
    grid = (triton.cdiv(S, BT * tiles), B, triton.cdiv(C, BC))
    BT1, BC1, warps1 = _CFG["bwd_du1"]
    grid1 = (triton.cdiv(S, BT1), B, triton.cdiv(C, BC1))
    du = torch.empty(S, B, C2, device=u.device, dtype=u.dtype)
    da = torch.empty(S, B, C, device=u.device, dtype=torch.float32)
    # per-program partial sums of dw and of du2 and du1 (the bias gradient), reduced by torch
    # below (deterministic, no atomics)
    f32 = dict(device=u.device, dtype=torch.float32)
    parts = torch.empty(grid[0] * B if need_dw else 1, C, K, **f32)
    db2 = torch.empty(grid[0] * B if need_db else 1, C, **f32)
    db1 = torch.empty(grid1[0] * B if need_db else 1, C, **f32)
    if du.numel():
        _bwd_da_kernel[grid](
            u, w, tail if tail is not None else u, bias if bias is not None else u, dy, du, da,
            parts, db2, S, C, u.stride(0), u.stride(1), dy.stride(0), dy.stride(1), K=K,
            KP=triton.next_power_of_2(K), HAS_TAIL=tail is not None, HAS_BIAS=bias is not None,
            NEED_DW=need_dw, NEED_DB=need_db, BT=BT, BC=BC, TILES=tiles, num_warps=warps)
        _bwd_du1_kernel[grid1](da, w, du, db1, S, C, K=K, NEED_DB=need_db, BT=BT1, BC=BC1,
                               num_warps=warps1)
    elif need_dw:
        parts.zero_()
    return (du, parts.sum(0) if need_dw else None,
            torch.cat([db1.sum(0), db2.sum(0)]) if need_db else None)


class GatedCausalConv(torch.autograd.Function):
    """Differentiable in u, weight and bias; the tail (decoding) is a constant."""

    @staticmethod
    def forward(ctx, u, weight, tail, bias):
        u_, w, tail, bias_ = _prepare(u, weight, tail, bias)
        ctx.save_for_backward(u_, w, tail, bias_)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _forward(u_, w, tail, bias_)

    @staticmethod
    def backward(ctx, dy):
        u, w, tail, bias = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        du, dw, db = _backward(u, w, tail, bias, dy, ctx.needs_input_grad[1],
                               ctx.needs_input_grad[3])
        if dw is not None:
            dw = dw.reshape(ctx.weight_shape).to(ctx.weight_dtype)
        if db is not None:
            db = db.to(ctx.bias_dtype)
        return du, dw, None, db


def gated_causal_conv_triton(u: torch.Tensor, weight: torch.Tensor,
                             tail: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal_depthwise_conv(u1 + bias[:c], weight)) * (u2 + bias[c:]): u [s, b, 2c],
    weight [c, 1, k], tail [b, c, k-1] (biased u1 values, no gradient) or None, bias [2c] or
    None -> [s, b, c] in u's dtype."""
    if tail is not None:
        tail = tail.detach()
    return GatedCausalConv.apply(u, weight, tail, bias)
