"""Fused Triton kernels for prefix linear attention (PLA), f = 16.

Notation (one head): q~ = q / f^(1/4), k~ = k / f^(1/4), so phi(x) = [1, x~, vec(x~ x~^T) / sqrt2]
and phi(q).phi(k) = 1 + s + s^2/2 with s = q~ . k~.  The state is kept in registers, fp32, in
three parts with the 1/sqrt2 of the quadratic part left out ("internal" layout):
    S0 = sum v        [dv]      S1 = sum k~ v^T   [f, dv]      S2 = sum (k~ (x) k~) v^T   [f*f, dv]
so phi(q) S = S0 + q~ S1 + 0.5 (q~ (x) q~) S2. The public PLAState is the unpacked phi layout
([1 + f + f*f] rows, quadratic rows = S2 / sqrt2). The 273 features are never written to HBM:
the outer products are built in registers, chunk by chunk.

Kernels (one program per (batch*head, dv block, sequence split); sequential over chunks of C tokens):
  _enc_g_kernel     reduction of a token range into a state (S, z = sum phi(k) w): the encoder prefix
                    (split over the prefix), and per-split sums for the sequence split
  _fwd_g_kernel     chunked causal Taylor linear attention over one split from its initial state
                    (S_e, z_e plus all earlier splits); stores y, the normaliser, and the final state
  _bwd_dq_kernel    forward scan again for dq (same splits and initial states)
  _bwd_dkv_kernel   reverse scan for dk, dv from the state gradient of all later splits; split 0
                    stores the total state gradient dS
  _bwd_enc_kernel   dk_enc, dv_enc from dS (parallel over the prefix)
  _decode_kernel    one-token state update + readout, fused over heads, in place
Sequence split: the number of splits P fills the GPU (config "waves"); P = 1 at B*H >= SM count,
where the scans are throughput bound and a split only adds its reduction pass. Initial states of
the splits: torch exclusive cumsum (fp32) over the per-split sums.
dq and dk sum over dv blocks: each block writes an fp32 partial and torch sums them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.pla.reference import PLAState

F_SUPPORTED = 16
SQRT2 = math.sqrt(2.0)


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.shape[-1] == F_SUPPORTED and v.shape[-1] <= 256
            and q.dtype in (torch.bfloat16, torch.float16, torch.float32))


def supports_decode(q, v, state) -> bool:
    return q.shape[-1] == F_SUPPORTED and v.shape[-1] <= 256 and state.S.is_contiguous() and state.z.is_contiguous()


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _outer(x, C: tl.constexpr, F: tl.constexpr):
    """[C, F] -> [C, F*F] rows vec(x x^T)."""
    return tl.reshape(x[:, :, None] * x[:, None, :], (C, F * F))


@triton.jit
def _quad_grad(g2, x, C: tl.constexpr, F: tl.constexpr):
    """d/dx of 0.5 x^T G x with G = reshape(g2) symmetric: G x.  g2 [C, F*F], x [C, F]."""
    return tl.sum(tl.reshape(g2, (C, F, F)) * x[:, None, :], axis=2)


@triton.jit
def _feat2(X, rows, rm, TA, TB, TW, off: tl.constexpr, R: tl.constexpr, F: tl.constexpr, TRANS: tl.constexpr):
    """Quadratic features gathered from memory (the chunk is L1-resident), no register reshape:
    feature t = x[a_t] x[b_t] w_t (x already the raw input; caller scales). [C, R] or [R, C]."""
    t = off + tl.arange(0, R)
    a = tl.load(TA + t)
    b = tl.load(TB + t)
    w = tl.load(TW + t)
    if TRANS:
        xa = tl.load(X + rows[None, :] * F + a[:, None], mask=rm[None, :], other=0.).to(tl.float32)
        xb = tl.load(X + rows[None, :] * F + b[:, None], mask=rm[None, :], other=0.).to(tl.float32)
        return xa * xb * w[:, None]
    else:
        xa = tl.load(X + rows[:, None] * F + a[None, :], mask=rm[:, None], other=0.).to(tl.float32)
        xb = tl.load(X + rows[:, None] * F + b[None, :], mask=rm[:, None], other=0.).to(tl.float32)
        return xa * xb * w[None, :]


@triton.jit
def _load_s2(S, Z, bh, TA, TB, TW, off: tl.constexpr, R: tl.constexpr, offs_v, mv, DV, F: tl.constexpr):
    """Packed quadratic state rows [off, off + R) from the public unpacked layout.
    packed row t (pair a <= b, weight w) = public row (a, b) * sqrt2 * w (scale^2 folded by caller)."""
    D: tl.constexpr = 1 + F + F * F
    t = off + tl.arange(0, R)
    a = tl.load(TA + t)
    b = tl.load(TB + t)
    w = tl.load(TW + t)
    live = w != 0
    pub = bh * D + 1 + F + a * F + b
    s2 = tl.load(S + pub[:, None] * DV + offs_v[None, :], mask=live[:, None] & mv[None, :], other=0.) * (w * 1.4142135623730951)[:, None]
    z2 = tl.load(Z + pub, mask=live, other=0.) * w * 1.4142135623730951
    return s2, z2


@triton.jit
def _store_s2(S, Z, bh, s2, z2, TA, TB, TW, off: tl.constexpr, R: tl.constexpr, offs_v, mv, DV, F: tl.constexpr, STORE_Z):
    """Inverse of _load_s2, writing both symmetric public rows (a, b) and (b, a)."""
    D: tl.constexpr = 1 + F + F * F
    t = off + tl.arange(0, R)
    a = tl.load(TA + t)
    b = tl.load(TB + t)
    w = tl.load(TW + t)
    live = w != 0
    inv = tl.where(live, 1.0 / (w * 1.4142135623730951), 0.0)
    for sw in tl.static_range(2):
        if sw == 0:
            pub = bh * D + 1 + F + a * F + b
        else:
            pub = bh * D + 1 + F + b * F + a
        tl.store(S + pub[:, None] * DV + offs_v[None, :], s2 * inv[:, None], mask=live[:, None] & mv[None, :])
        if STORE_Z:
            tl.store(Z + pub, z2 * inv, mask=live)


@triton.jit
def _load_state(S, Z, bh, offs_v, mv, DV, F: tl.constexpr):
    D: tl.constexpr = 1 + F + F * F
    offs_f = tl.arange(0, F)
    offs_ff = tl.arange(0, F * F)
    base = bh * D
    s0 = tl.load(S + base * DV + offs_v, mask=mv, other=0.)
    s1 = tl.load(S + (base + 1 + offs_f[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.)
    s2 = tl.load(S + (base + 1 + F + offs_ff[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.) * 1.4142135623730951
    z0 = tl.sum(tl.load(Z + base + tl.arange(0, 1)), axis=0)
    z1 = tl.load(Z + base + 1 + offs_f)
    z2 = tl.load(Z + base + 1 + F + offs_ff) * 1.4142135623730951
    return s0, s1, s2, z0, z1, z2


# ----------------------------------------------------------------------------- forward, gathered features
@triton.jit
def _enc_g_kernel(KE, VE, W, PS, PZ, TA, TB, TW, M, DV, TOK_PER_SPLIT, SP0, scale,
                  F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                  R1: tl.constexpr, R2: tl.constexpr, HAS_W: tl.constexpr):
    """Reduction of tokens [(sp + SP0) * TOK, ...) of (KE, VE) into a state, public layout, written to
    split slot sp: S = sum phi(k) v^T, z = sum phi(k) w (w = 1 without W). Quadratic features gathered
    (R1 + R2 rows; packed when R1 = 128)."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    D: tl.constexpr = 1 + F + F * F
    DT = KE.dtype.element_ty
    sc2 = scale * scale
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, F)
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    s0 = tl.zeros([BV], tl.float32)
    s1 = tl.zeros([F, BV], tl.float32)
    s2a = tl.zeros([R1, BV], tl.float32)
    s2b = tl.zeros([16, BV], tl.float32)  # used only when R2 = 16
    z0 = tl.zeros([C], tl.float32)
    z1 = tl.zeros([F], tl.float32)
    z2a = tl.zeros([R1], tl.float32)
    z2b = tl.zeros([16], tl.float32)
    start = (sp + SP0) * TOK_PER_SPLIT
    end = tl.minimum(start + TOK_PER_SPLIT, M)
    X = KE + bh * M * F
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        k = tl.load(X + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        v = tl.load(VE + bh * M * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.)
        if HAS_W:
            w = tl.load(W + bh * M + rows, mask=rm, other=0.)
        else:
            w = rm.to(tl.float32)
        k2t = _feat2(X, rows, rm, TA, TB, TW, 0, R1, F, True) * sc2
        s2a += tl.dot(k2t.to(DT), v, input_precision=PREC)
        z2a += tl.sum(k2t * w[None, :], axis=1)
        if R2 > 0:
            k2t_b = _feat2(X, rows, rm, TA, TB, TW, R1, R2, F, True) * sc2
            s2b += tl.dot(k2t_b.to(DT), v, input_precision=PREC)
            z2b += tl.sum(k2t_b * w[None, :], axis=1)
        s1 += tl.dot(tl.trans(k.to(DT)), v, input_precision=PREC)
        s0 += tl.sum(v.to(tl.float32), axis=0)
        z1 += tl.sum(k * w[:, None], axis=0)
        z0 += w
    so = sp * BH + bh
    base = so * D
    tl.store(PS + base * DV + offs_v, s0, mask=mv)
    tl.store(PS + (base + 1 + offs_f[:, None]) * DV + offs_v[None, :], s1, mask=mv[None, :])
    _store_s2(PS, PZ, so, s2a, z2a, TA, TB, TW, 0, R1, offs_v, mv, DV, F, pv == 0)
    if R2 > 0:
        _store_s2(PS, PZ, so, s2b, z2b, TA, TB, TW, R1, R2, offs_v, mv, DV, F, pv == 0)
    if pv == 0:
        tl.store(PZ + base + tl.arange(0, 1), tl.sum(z0, axis=0) + tl.zeros([1], tl.float32))
        tl.store(PZ + base + 1 + offs_f, z1)


@triton.jit
def _fwd_g_kernel(Q, K, V, S_INIT, Z_INIT, Y, DEN, S_OUT, Z_OUT, TA, TB, TW, N, DV, TOK, scale, eps,
                  F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                  STORE_DEN: tl.constexpr, STORE_STATE: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr):
    """Chunked causal forward over split sp = tokens [sp * TOK, (sp + 1) * TOK) from that split's initial
    state (S_INIT slot sp * BH + bh, public layout). Quadratic features gathered (R1 + R2 rows; packed
    when R1 = 128). The last split stores the final state (prefill)."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    last = sp == tl.num_programs(2) - 1
    start = sp * TOK
    end = tl.minimum(start + TOK, N)
    D: tl.constexpr = 1 + F + F * F
    DT = Q.dtype.element_ty
    sc2 = scale * scale
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, F)
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    so = sp * BH + bh
    base = so * D
    s0 = tl.load(S_INIT + base * DV + offs_v, mask=mv, other=0.)
    s1 = tl.load(S_INIT + (base + 1 + offs_f[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.)
    z0 = tl.sum(tl.load(Z_INIT + base + tl.arange(0, 1)), axis=0)
    z1 = tl.load(Z_INIT + base + 1 + offs_f)
    s2a, z2a = _load_s2(S_INIT, Z_INIT, so, TA, TB, TW, 0, R1, offs_v, mv, DV, F)
    if R2 > 0:
        s2b, z2b = _load_s2(S_INIT, Z_INIT, so, TA, TB, TW, R1, R2, offs_v, mv, DV, F)
    else:
        s2b = tl.zeros([16, BV], tl.float32)
        z2b = tl.zeros([16], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    XQ = Q + bh * N * F
    XK = K + bh * N * F
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        q = tl.load(XQ + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        k = tl.load(XK + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        v = tl.load(V + bh * N * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.)
        qd = q.to(DT)
        kd = k.to(DT)
        q2 = _feat2(XQ, rows, rm, TA, TB, TW, 0, R1, F, False) * sc2
        num = s0[None, :] + tl.dot(qd, s1.to(DT), input_precision=PREC) \
            + 0.5 * tl.dot(q2.to(DT), s2a.to(DT), input_precision=PREC)
        den = z0 + tl.sum(q * z1[None, :], axis=1) + 0.5 * tl.sum(q2 * z2a[None, :], axis=1)
        if R2 > 0:
            q2b = _feat2(XQ, rows, rm, TA, TB, TW, R1, R2, F, False) * sc2
            num += 0.5 * tl.dot(q2b.to(DT), s2b.to(DT), input_precision=PREC)
            den += 0.5 * tl.sum(q2b * z2b[None, :], axis=1)
        s = tl.dot(qd, tl.trans(kd), input_precision=PREC)
        a = tl.where(causal & rm[None, :], 1.0 + s + 0.5 * s * s, 0.0)
        num += tl.dot(a.to(DT), v, input_precision=PREC)
        den += tl.sum(a, axis=1)
        den = den + eps
        y = num / den[:, None]
        tl.store(Y + bh * N * DV + rows[:, None] * DV + offs_v[None, :], y.to(Y.dtype.element_ty), mask=rm[:, None] & mv[None, :])
        if STORE_DEN:
            if pv == 0:
                tl.store(DEN + bh * N + rows, den, mask=rm)
        k2t = _feat2(XK, rows, rm, TA, TB, TW, 0, R1, F, True) * sc2
        s2a += tl.dot(k2t.to(DT), v, input_precision=PREC)
        z2a += tl.sum(k2t, axis=1)
        if R2 > 0:
            k2t_b = _feat2(XK, rows, rm, TA, TB, TW, R1, R2, F, True) * sc2
            s2b += tl.dot(k2t_b.to(DT), v, input_precision=PREC)
            z2b += tl.sum(k2t_b, axis=1)
        s1 += tl.dot(tl.trans(kd), v, input_precision=PREC)
        s0 += tl.sum(v.to(tl.float32), axis=0)
        z1 += tl.sum(k, axis=0)
        z0 += tl.sum(rm.to(tl.float32), axis=0)
    if STORE_STATE:
        if last:
            base = bh * D
            tl.store(S_OUT + base * DV + offs_v, s0, mask=mv)
            tl.store(S_OUT + (base + 1 + offs_f[:, None]) * DV + offs_v[None, :], s1, mask=mv[None, :])
            _store_s2(S_OUT, Z_OUT, bh, s2a, z2a, TA, TB, TW, 0, R1, offs_v, mv, DV, F, pv == 0)
            if R2 > 0:
                _store_s2(S_OUT, Z_OUT, bh, s2b, z2b, TA, TB, TW, R1, R2, offs_v, mv, DV, F, pv == 0)
            if pv == 0:
                tl.store(Z_OUT + base + tl.arange(0, 1), z0 + tl.zeros([1], tl.float32))
                tl.store(Z_OUT + base + 1 + offs_f, z1)


_TABLES: dict = {}


def _tables(mode, device):
    """Index tables (a, b, w) for the quadratic features. mode "unpacked": 256 rows (a, b) = (t//16, t%16);
    mode "packed": 120 pairs a < b with weight sqrt2, then the 16 diagonal rows, padded to 128 + 16."""
    key = (mode, str(device))
    if key not in _TABLES:
        F = F_SUPPORTED
        if mode == "unpacked":
            ab = [(a, b, 1.0) for a in range(F) for b in range(F)]
        else:
            ab = [(a, b, SQRT2) for a in range(F) for b in range(a + 1, F)] + [(a, a, 1.0) for a in range(F)]
            ab += [(0, 0, 0.0)] * (144 - len(ab))
        _TABLES[key] = (torch.tensor([x[0] for x in ab], dtype=torch.int32, device=device),
                        torch.tensor([x[1] for x in ab], dtype=torch.int32, device=device),
                        torch.tensor([x[2] for x in ab], dtype=torch.float32, device=device))
    return _TABLES[key]


def _rows(mode):
    return (256, 0) if mode == "unpacked" else (128, 16)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DEN, DDEN, S_INIT, Z_INIT, DQ, N, DV, TOK, scale,
                   F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Forward scan over split sp (tokens [sp * TOK, (sp + 1) * TOK)) from its initial state (S_INIT slot
    sp * BH + bh, public layout) for dq."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    start = sp * TOK
    end = tl.minimum(start + TOK, N)
    DT = Q.dtype.element_ty
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, F)
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    first = (pv == 0).to(tl.float32)  # the normaliser's terms are added by one dv block only
    s0, s1, s2, z0, z1, z2 = _load_state(S_INIT, Z_INIT, sp * BH + bh, offs_v, mv, DV, F)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        q = tl.load(Q + bh * N * F + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        k = tl.load(K + bh * N * F + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        v = tl.load(V + bh * N * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.)
        do = tl.load(DO + bh * N * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.).to(tl.float32)
        den = tl.load(DEN + bh * N + rows, mask=rm, other=1.)
        dden = tl.load(DDEN + bh * N + rows, mask=rm, other=0.) * first
        dnum = (do / den[:, None]).to(DT)
        qd = q.to(DT)
        kd = k.to(DT)
        # inter: d/dq~ [phi(q) (S dnum + z dden)]
        dq = tl.dot(dnum, tl.trans(s1.to(DT)), input_precision=PREC) + dden[:, None] * z1[None, :]
        g2 = tl.dot(dnum, tl.trans(s2.to(DT)), input_precision=PREC) + dden[:, None] * z2[None, :]
        dq += _quad_grad(g2, q, C, F)
        # intra: dA_ij = dnum_i . v_j + dden_i ; ds = dA (1 + s)
        s = tl.dot(qd, tl.trans(kd), input_precision=PREC)
        da = tl.dot(dnum, tl.trans(v), input_precision=PREC) + dden[:, None]
        ds = tl.where(causal & rm[None, :], da * (1.0 + s), 0.0)
        dq += tl.dot(ds.to(DT), kd, input_precision=PREC)
        tl.store(DQ + ((pv * BH + bh) * N + rows[:, None]) * F + offs_f[None, :], dq * scale, mask=rm[:, None])
        k2 = _outer(k, C, F)
        s2 += tl.dot(tl.trans(k2.to(DT)), v, input_precision=PREC)
        s1 += tl.dot(tl.trans(kd), v, input_precision=PREC)
        z2 += tl.sum(k2, axis=0)
        z1 += tl.sum(k, axis=0)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, DEN, DDEN, DK, DVO, DS, DZ, DS_INIT, DZ_INIT, N, DV, TOK, scale,
                    F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, HAS_INIT: tl.constexpr):
    """Reverse scan over split sp (tokens [sp * TOK, (sp + 1) * TOK)) starting from the state gradient of
    all later splits (DS_INIT / DZ_INIT slot sp * BH + bh, internal layout; zero without HAS_INIT).
    Split 0 stores the total state gradient (DS, DZ) for the encoder backward."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    start = sp * TOK
    end = tl.minimum(start + TOK, N)
    D: tl.constexpr = 1 + F + F * F
    DT = Q.dtype.element_ty
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, F)
    offs_ff = tl.arange(0, F * F)
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    first = (pv == 0).to(tl.float32)
    e0 = tl.zeros([C], tl.float32)  # dz, summed at the end
    if HAS_INIT:
        bi = (sp * BH + bh) * D
        d0 = tl.load(DS_INIT + bi * DV + offs_v, mask=mv, other=0.)
        d1 = tl.load(DS_INIT + (bi + 1 + offs_f[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.)
        d2 = tl.load(DS_INIT + (bi + 1 + F + offs_ff[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.)
        e0 += tl.where(offs_c == 0, tl.sum(tl.load(DZ_INIT + bi + tl.arange(0, 1)), axis=0), 0.0)
        e1 = tl.load(DZ_INIT + bi + 1 + offs_f)
        e2 = tl.load(DZ_INIT + bi + 1 + F + offs_ff)
    else:
        d0 = tl.zeros([BV], tl.float32)
        d1 = tl.zeros([F, BV], tl.float32)
        d2 = tl.zeros([F * F, BV], tl.float32)
        e1 = tl.zeros([F], tl.float32)
        e2 = tl.zeros([F * F], tl.float32)
    causal = offs_c[:, None] >= offs_c[None, :]
    n_chunks = tl.cdiv(end - start, C)
    for ci in range(0, n_chunks):
        c0 = start + (n_chunks - 1 - ci) * C
        rows = c0 + offs_c
        rm = rows < end
        q = tl.load(Q + bh * N * F + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        k = tl.load(K + bh * N * F + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
        v = tl.load(V + bh * N * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.)
        do = tl.load(DO + bh * N * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.).to(tl.float32)
        den = tl.load(DEN + bh * N + rows, mask=rm, other=1.)
        dden_all = tl.load(DDEN + bh * N + rows, mask=rm, other=0.)
        dden = dden_all * first
        dnum = (do / den[:, None]).to(DT)
        qd = q.to(DT)
        kd = k.to(DT)
        k2 = _outer(k, C, F)
        s = tl.dot(qd, tl.trans(kd), input_precision=PREC)  # [i, j]
        valid = causal & rm[None, :] & rm[:, None]
        a = tl.where(valid, 1.0 + s + 0.5 * s * s, 0.0)
        # dv_j = phi(k_j) . dS(later chunks) + sum_{i >= j in chunk} A_ij dnum_i
        dv = d0[None, :] + tl.dot(kd, d1.to(DT), input_precision=PREC) \
            + 0.5 * tl.dot(k2.to(DT), d2.to(DT), input_precision=PREC) \
            + tl.dot(tl.trans(a.to(DT)), dnum, input_precision=PREC)
        tl.store(DVO + bh * N * DV + rows[:, None] * DV + offs_v[None, :], dv.to(DVO.dtype.element_ty), mask=rm[:, None] & mv[None, :])
        # dk~_j = d/dk~ [phi(k_j) . (dS v_j + dz)] + sum_i dA_ij (1 + s_ij) q~_i
        vd = v.to(DT)
        dk = tl.dot(vd, tl.trans(d1.to(DT)), input_precision=PREC) + first * e1[None, :]
        g2 = tl.dot(vd, tl.trans(d2.to(DT)), input_precision=PREC) + first * e2[None, :]
        dk += _quad_grad(g2, k, C, F)
        da = tl.dot(dnum, tl.trans(vd), input_precision=PREC) + dden[:, None]
        ds = tl.where(valid, da * (1.0 + s), 0.0)
        dk += tl.dot(tl.trans(ds.to(DT)), qd, input_precision=PREC)
        tl.store(DK + ((pv * BH + bh) * N + rows[:, None]) * F + offs_f[None, :], dk * scale, mask=rm[:, None])
        # dS += phi(q_i) dnum_i^T over this chunk's queries
        q2 = _outer(q, C, F)
        d2 += tl.dot(tl.trans(q2.to(DT)), dnum, input_precision=PREC)
        d1 += tl.dot(tl.trans(qd), dnum, input_precision=PREC)
        d0 += tl.sum(dnum.to(tl.float32), axis=0)
        e2 += tl.sum(q2 * dden_all[:, None], axis=0)
        e1 += tl.sum(q * dden_all[:, None], axis=0)
        e0 += dden_all
    base = bh * D
    if sp == 0:
        tl.store(DS + base * DV + offs_v, d0, mask=mv)
        tl.store(DS + (base + 1 + offs_f[:, None]) * DV + offs_v[None, :], d1, mask=mv[None, :])
        tl.store(DS + (base + 1 + F + offs_ff[:, None]) * DV + offs_v[None, :], d2, mask=mv[None, :])
    if (pv == 0) & (sp == 0):
        tl.store(DZ + base + tl.arange(0, 1), tl.sum(e0, axis=0) + tl.zeros([1], tl.float32))
        tl.store(DZ + base + 1 + offs_f, e1)
        tl.store(DZ + base + 1 + F + offs_ff, e2)


@triton.jit
def _bwd_enc_kernel(KE, VE, DS, DZ, DKE, DVE, M, DV, scale,
                    F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Internal-layout dS (no 1/sqrt2): dv_e = d0 + k~ d1 + 0.5 (k~(x)k~) d2; dk~_e likewise."""
    bh = tl.program_id(0)
    ci = tl.program_id(1)
    pv = tl.program_id(2)
    BH = tl.num_programs(0)
    D: tl.constexpr = 1 + F + F * F
    DT = KE.dtype.element_ty
    offs_c = tl.arange(0, C)
    offs_f = tl.arange(0, F)
    offs_ff = tl.arange(0, F * F)
    offs_v = pv * BV + tl.arange(0, BV)
    mv = offs_v < DV
    first = (pv == 0).to(tl.float32)
    base = bh * D
    d0 = tl.load(DS + base * DV + offs_v, mask=mv, other=0.)
    d1 = tl.load(DS + (base + 1 + offs_f[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.)
    d2 = tl.load(DS + (base + 1 + F + offs_ff[:, None]) * DV + offs_v[None, :], mask=mv[None, :], other=0.)
    e1 = tl.load(DZ + base + 1 + offs_f) * first
    e2 = tl.load(DZ + base + 1 + F + offs_ff) * first
    rows = ci * C + offs_c
    rm = rows < M
    k = tl.load(KE + bh * M * F + rows[:, None] * F + offs_f[None, :], mask=rm[:, None], other=0.).to(tl.float32) * scale
    v = tl.load(VE + bh * M * DV + rows[:, None] * DV + offs_v[None, :], mask=rm[:, None] & mv[None, :], other=0.)
    kd = k.to(DT)
    k2 = _outer(k, C, F)
    dv = d0[None, :] + tl.dot(kd, d1.to(DT), input_precision=PREC) + 0.5 * tl.dot(k2.to(DT), d2.to(DT), input_precision=PREC)
    tl.store(DVE + bh * M * DV + rows[:, None] * DV + offs_v[None, :], dv.to(DVE.dtype.element_ty), mask=rm[:, None] & mv[None, :])
    dk = tl.dot(v, tl.trans(d1.to(DT)), input_precision=PREC) + e1[None, :]
    g2 = tl.dot(v, tl.trans(d2.to(DT)), input_precision=PREC) + e2[None, :]
    dk += _quad_grad(g2, k, C, F)
    tl.store(DKE + ((pv * BH + bh) * M + rows[:, None]) * F + offs_f[None, :], dk * scale, mask=rm[:, None])


# ----------------------------------------------------------------------------- decode
@triton.jit
def _feat_rows(X, t, scale, F: tl.constexpr):
    """phi(x) at feature rows t (unpacked layout), x read from memory (L1-resident)."""
    D: tl.constexpr = 1 + F + F * F
    lin = (t >= 1) & (t < 1 + F)
    quad = (t >= 1 + F) & (t < D)
    a = tl.where(quad, (t - 1 - F) // F, 0)
    b = tl.where(quad, (t - 1 - F) % F, tl.where(lin, t - 1, 0))
    xb = tl.load(X + b).to(tl.float32) * scale
    xa = tl.load(X + a).to(tl.float32) * scale
    return tl.where(t == 0, 1.0, tl.where(lin, xb, tl.where(quad, xa * xb * 0.7071067811865476, 0.0)))


@triton.jit
def _decode_kernel(Q, K, V, S, Z, Y, DV, scale, eps,
                   F: tl.constexpr, BV: tl.constexpr, R: tl.constexpr):
    bh = tl.program_id(0)
    D: tl.constexpr = 1 + F + F * F
    offs_v = tl.arange(0, BV)
    mv = offs_v < DV
    v = tl.load(V + bh * DV + offs_v, mask=mv, other=0.).to(tl.float32)
    num = tl.zeros([BV], tl.float32)
    den = tl.zeros([R], tl.float32)
    for r0 in range(0, D, R):
        t = r0 + tl.arange(0, R)
        mt = t < D
        pk = _feat_rows(K + bh * F, t, scale, F)
        pq = _feat_rows(Q + bh * F, t, scale, F)
        ptr = S + (bh * D + t[:, None]) * DV + offs_v[None, :]
        st = tl.load(ptr, mask=mt[:, None] & mv[None, :], other=0.) + pk[:, None] * v[None, :]
        tl.store(ptr, st, mask=mt[:, None] & mv[None, :])
        zt = tl.load(Z + bh * D + t, mask=mt, other=0.) + pk
        tl.store(Z + bh * D + t, zt, mask=mt)
        num += tl.sum(pq[:, None] * st, axis=0)
        den += pq * zt
    y = num / (tl.sum(den, axis=0) + eps)
    tl.store(Y + bh * DV + offs_v, y.to(Y.dtype.element_ty), mask=mv)


# ----------------------------------------------------------------------------- launchers
def _prec(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _cfg(dv, kind):
    """Launch config for kind in ("fwd", "bwd", "red"): chunk C, dv block BV, warps, stages, and for the
    scans the sequence split ("waves": aim for waves x SM-count programs; 0 = one split).
    Tuned on an H100 with `python benchmarks/pla.py --tune`; see docs/PERFORMANCE.md."""
    return _CFG.get((kind, dv), _CFG_DEFAULT[kind])


_CFG_DEFAULT = {"fwd": dict(C=32, BV=64, num_warps=4, num_stages=1, feat="packed", waves=1),
                "bwd": dict(C=64, BV=32, num_warps=4, num_stages=1, waves=1),
                "red": dict(C=32, BV=64, num_warps=4, num_stages=1, feat="packed")}
# H100, triton 3.6 (docs/PERFORMANCE.md). Backward: only num_warps=4 with BV=32 is offered; num_warps=8
# or BV=16 backward launches hit an illegal memory access there (not yet understood).
# waves = 1: split the sequence only until the grid has one program per SM. At B=16, H=16 that is one
# split (measured at N=8192: fwd 2.66 ms unsplit vs 3.02 / 3.32 / 3.83 ms at 2 / 8 / 32 waves; bwd 18.8
# vs 21.5 ms at 8 waves): the scans are throughput bound there, and splits add a reduction pass.
# Small batches (B * H << SM count) gain from the splits.
_CFG: dict = {
    ("fwd", 64): dict(C=32, BV=64, num_warps=4, num_stages=1, feat="packed", waves=1),
    ("fwd", 112): dict(C=32, BV=64, num_warps=4, num_stages=1, feat="packed", waves=1),
    ("bwd", 64): dict(C=64, BV=32, num_warps=4, num_stages=1, waves=1),
    ("bwd", 112): dict(C=64, BV=32, num_warps=4, num_stages=1, waves=1),
    ("red", 64): dict(C=64, BV=64, num_warps=4, num_stages=1, feat="packed"),
    ("red", 112): dict(C=64, BV=64, num_warps=4, num_stages=1, feat="packed"),
}
_INTERPRET_C = 16  # chunk under TRITON_INTERPRET (CPU tests)
_FORCE_SPLIT_TOK = None  # tests: force this many tokens per sequence split (rounded up to the chunk)
_MIN_SPLIT_CHUNKS = 4  # a split holds at least this many chunks (unless forced)


def _interpret():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def _chunk(cfg):
    return _INTERPRET_C if _interpret() else cfg["C"]


def _n_sm(device):
    if not torch.device(device).type == "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(N, C, programs, waves, device):
    """Tokens per sequence split (a multiple of C) and the number of splits."""
    if N <= 0:
        return max(N, 1), 1
    if _FORCE_SPLIT_TOK is not None:
        tok = triton.cdiv(_FORCE_SPLIT_TOK, C) * C
    else:
        P = max(1, min(triton.cdiv(int(waves * _n_sm(device)), programs), N // (_MIN_SPLIT_CHUNKS * C)))
        tok = triton.cdiv(triton.cdiv(N, P), C) * C
    return tok, triton.cdiv(N, tok)


def _reduce(k, v, w, tok, nsplit, sp0, dv):
    """Per-split state sums, public layout: slot j holds tokens of split j + sp0:
    S [nsplit, BH, D, DV] = sum phi(k) v^T, z [nsplit, BH, D] = sum phi(k) w (w = 1 when None)."""
    B, H, M, F = k.shape
    DV = v.shape[-1]
    BH = B * H
    D = 1 + F + F * F
    cfg = _cfg(dv, "red")
    BV = cfg["BV"]
    nv = triton.cdiv(DV, BV)
    PS = torch.empty(nsplit, BH, D, DV, device=k.device, dtype=torch.float32)
    PZ = torch.empty(nsplit, BH, D, device=k.device, dtype=torch.float32)
    mode = cfg.get("feat", "packed")
    R1, R2 = _rows(mode)
    _enc_g_kernel[(BH, nv, nsplit)](k, v, k if w is None else w, PS, PZ, *_tables(mode, k.device), M, DV, tok, sp0,
                                    F ** -0.25, F=F, C=_chunk(cfg), BV=BV, PREC=_prec(k.dtype), R1=R1, R2=R2,
                                    HAS_W=w is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return PS, PZ


def _encoder(k_enc, v_enc, cfg=None, min_programs=None):
    B, H, M, F = k_enc.shape
    DV = v_enc.shape[-1]
    BH = B * H
    D = 1 + F + F * F
    rcfg = _cfg(DV, "red")
    nv = triton.cdiv(DV, rcfg["BV"])
    C = _chunk(rcfg)
    if M == 0:
        return (torch.zeros(BH, D, DV, device=k_enc.device, dtype=torch.float32),
                torch.zeros(BH, D, device=k_enc.device, dtype=torch.float32))
    if min_programs is None:
        min_programs = 4 * _n_sm(k_enc.device) if k_enc.is_cuda else 1
    split = max(1, min(triton.cdiv(M, 4 * C), triton.cdiv(min_programs, BH * nv)))
    tok = triton.cdiv(triton.cdiv(M, split), C) * C
    split = triton.cdiv(M, tok)
    PS, PZ = _reduce(k_enc, v_enc, None, tok, split, 0, DV)
    if split == 1:
        return PS[0], PZ[0]
    return PS.sum(0), PZ.sum(0)


def _prefix_states(k, v, Se, Ze, tok, P):
    """Initial state of each split (public layout): Se + sums over all earlier splits. [P, BH, D, DV], [P, BH, D]."""
    if P == 1:
        return Se[None], Ze[None]
    PS, PZ = _reduce(k, v, None, tok, P - 1, 0, v.shape[-1])
    S = torch.empty((P,) + tuple(Se.shape), device=Se.device, dtype=torch.float32)
    Z = torch.empty((P,) + tuple(Ze.shape), device=Se.device, dtype=torch.float32)
    S[0] = Se
    Z[0] = Ze
    torch.cumsum(PS, 0, out=S[1:])
    torch.cumsum(PZ, 0, out=Z[1:])
    S[1:] += Se
    Z[1:] += Ze
    return S, Z


def _forward(q, k, v, k_enc, v_enc, eps, store_den, store_state):
    q, k, v, k_enc, v_enc = (t.contiguous() for t in (q, k, v, k_enc, v_enc))
    B, H, N, F = q.shape
    DV = v.shape[-1]
    cfg = _cfg(DV, "fwd")
    BV = cfg["BV"]
    C = _chunk(cfg)
    nv = triton.cdiv(DV, BV)
    D = 1 + F + F * F
    Se, Ze = _encoder(k_enc, v_enc)
    y = torch.empty_like(v)
    den = torch.empty(B, H, N, device=q.device, dtype=torch.float32) if store_den else y
    S_out = torch.empty(B, H, D, DV, device=q.device, dtype=torch.float32) if store_state else y
    Z_out = torch.empty(B, H, D, device=q.device, dtype=torch.float32) if store_state else y
    mode = cfg.get("feat", "packed")
    if N > 0:
        tok, P = _split(N, C, B * H * nv, cfg.get("waves", 0), q.device)
        S_init, Z_init = _prefix_states(k, v, Se, Ze, tok, P)
        R1, R2 = _rows(mode)
        _fwd_g_kernel[(B * H, nv, P)](q, k, v, S_init, Z_init, y, den, S_out, Z_out, *_tables(mode, q.device), N, DV, tok,
                                      F ** -0.25, eps, F=F, C=C, BV=BV, PREC=_prec(q.dtype), STORE_DEN=store_den,
                                      STORE_STATE=store_state, R1=R1, R2=R2,
                                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif store_state:
        S_out.copy_(Se.view(B, H, D, DV)), Z_out.copy_(Ze.view(B, H, D))
    return y, den, Se, Ze, S_out, Z_out


class PLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_enc, v_enc, eps):
        need = any(ctx.needs_input_grad[:5])
        y, den, Se, Ze, _, _ = _forward(q, k, v, k_enc, v_enc, eps, store_den=need, store_state=False)
        if need:
            ctx.save_for_backward(q, k, v, k_enc, v_enc, y, den, Se, Ze)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, k_enc, v_enc, y, den, Se, Ze = ctx.saved_tensors
        q, k, v, k_enc, v_enc = (t.contiguous() for t in (q, k, v, k_enc, v_enc))
        dy = dy.contiguous()
        B, H, N, F = q.shape
        M = k_enc.shape[2]
        DV = v.shape[-1]
        cfg = _cfg(DV, "bwd")
        BV, C = cfg["BV"], _chunk(cfg)
        nv = triton.cdiv(DV, BV)
        D = 1 + F + F * F
        BH = B * H
        kw = dict(F=F, C=C, BV=BV, PREC=_prec(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        # d loss / d den_i = -(dy_i . y_i) / den_i  (den already includes eps)
        dden = -(dy.float() * y.float()).sum(-1) / den
        dq = torch.empty(nv, B, H, N, F, device=q.device, dtype=torch.float32)
        dk = torch.empty(nv, B, H, N, F, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(v)
        dS = torch.empty(BH, D, DV, device=q.device, dtype=torch.float32)
        dZ = torch.empty(BH, D, device=q.device, dtype=torch.float32)
        scale = F ** -0.25
        if N > 0:
            tok, P = _split(N, C, BH * nv, cfg.get("waves", 0), q.device)
            S_init, Z_init = _prefix_states(k, v, Se, Ze, tok, P)
            _bwd_dq_kernel[(BH, nv, P)](q, k, v, dy, den, dden, S_init, Z_init, dq, N, DV, tok, scale, **kw)
            del S_init, Z_init
            if P > 1:
                # state gradient from all later splits: reverse exclusive sum of per-split sums of
                # phi(q) dnum^T and phi(q) dden, converted to the internal layout (quadratic rows * sqrt2)
                dnum = (dy.float() / den[..., None]).to(q.dtype)
                PS, PZ = _reduce(q, dnum, dden, tok, P - 1, 1, DV)
                dS_init = torch.zeros(P, BH, D, DV, device=q.device, dtype=torch.float32)
                dZ_init = torch.zeros(P, BH, D, device=q.device, dtype=torch.float32)
                dS_init[:-1] = PS.flip(0).cumsum(0).flip(0)
                dZ_init[:-1] = PZ.flip(0).cumsum(0).flip(0)
                del PS, PZ, dnum
                dS_init[:, :, 1 + F:] *= SQRT2
                dZ_init[:, :, 1 + F:] *= SQRT2
            else:
                dS_init, dZ_init = dS, dZ
            _bwd_dkv_kernel[(BH, nv, P)](q, k, v, dy, den, dden, dk, dv, dS, dZ, dS_init, dZ_init, N, DV, tok, scale,
                                         HAS_INIT=P > 1, **kw)
        else:
            dS.zero_(), dZ.zero_()
        dke = torch.empty(nv, B, H, M, F, device=q.device, dtype=torch.float32)
        dve = torch.empty_like(v_enc)
        if M > 0:
            _bwd_enc_kernel[(BH, triton.cdiv(M, C), nv)](k_enc, v_enc, dS, dZ, dke, dve, M, DV, scale, **kw)
        return (dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv, dke.sum(0).to(k_enc.dtype), dve, None)


def pla_triton(q, k, v, k_enc, v_enc, eps: float = 1e-12):
    return PLATriton.apply(q, k, v, k_enc, v_enc, eps)


@torch.no_grad()
def pla_prefill_triton(q, k, v, k_enc, v_enc, eps: float = 1e-12):
    y, _, _, _, S, Z = _forward(q, k, v, k_enc, v_enc, eps, store_den=False, store_state=True)
    return y, PLAState(S=S, z=Z)


def pla_decode_step_triton(q, k, v, state: PLAState, eps: float = 1e-12, out=None):
    """In place on state (fp32, contiguous); no host sync, no allocation when out is given."""
    B, H, F = q.shape
    DV = v.shape[-1]
    y = torch.empty_like(v) if out is None else out
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _decode_kernel[(B * H,)](q, k, v, state.S, state.z, y, DV, F ** -0.25, eps,
                             F=F, BV=triton.next_power_of_2(DV), R=_DECODE_R, num_warps=4)
    return y


_DECODE_R = 32
