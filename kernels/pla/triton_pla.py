"""Fused Triton kernels for prefix linear attention (PLA), f = 16.

Notation (one head): x~ = x / f^(1/4) (= x / 2, exact), so phi(x) = [1, x~, vec(x~ x~^T) / sqrt2] and
phi(q).phi(k) = 1 + s + s^2/2 with s = q~ . k~.  Inside the kernels the state is *packed*: the 2nd-order
part keeps one row per pair a <= b (136 of the 256 rows, padded to 144 = 128 + 16), with feature
    phi2_t(x) = W_t x_a x_b,   W_t = f^(-1/2) (a < b) or f^(-1/2) / sqrt2 (a = b), 0 on padding,
so sum_t phi2_t(q) phi2_t(k) = s^2 / 2. Packed state rows: [0] sum v, [1, 17) sum k~ v^T, [17, 161)
sum phi2(k) v^T (and z likewise). The public PLAState is the unpacked phi layout ([1 + f + f^2] rows);
`_to_public` converts (prefill output only).

Quadratic features are built with the tensor cores, never written to HBM: x @ E_A and x @ E_B with
one-hot selection matrices E [f, 144] give x_a and x_b exactly (one term per output), so
phi2(x) = (x E_A) * (x E_B) * W, and its gradient g -> (g W (x E_B)) E_A^T + (g W (x E_A)) E_B^T.
No gathers, no register reshapes; every per-chunk product is an MMA with K >= 16.

The quadratic rows are handled in three parts (64 + 64 + 16 rows: one [C, 64] feature tile live at a
time, to limit register pressure); see docs/PERFORMANCE.md for what bounds these kernels.

Kernels (one program per (batch*head, dv block, sequence split); sequential over chunks of C tokens):
  _reduce_kernel   sum of phi(k) v^T and phi(k) w over a token range: the encoder prefix (split over
                   the prefix), per-split sums for the sequence split, and the backward's per-split
                   state gradients (k -> q, v -> dnum, w -> dden)
  _fwd_kernel      chunked causal Taylor linear attention over one split from its initial state;
                   stores y, the normaliser, and (prefill) the final state
  _dden_kernel     d loss / d normaliser = -(dy . y) / den (memory-bound pass before the two scans)
  _bwd_dq_kernel   forward scan again for dq
  _bwd_dkv_kernel  reverse scan for dk, dv from the state gradient of all later splits; split 0 stores
                   the total state gradient dS for the encoder
  _bwd_enc_kernel  dk_enc, dv_enc from dS (parallel over the prefix)
  _decode_kernel   one-token state update + readout in the public layout, fused over heads, in place
On an H100 with bf16 and dv = 64, _fwd_kernel and the (unweighted) _reduce_kernel are replaced by the Gluon
kernels of gluon_pla.py (same packed state in and out); the backward scans stay these.
Sequence split: P splits per sequence (config "waves": aim for waves x SM-count programs; P = 1 once
B*H fills the GPU). Initial states of the splits: fp32 exclusive cumsum over per-split sums.
dq and dk sum over dv blocks: with several blocks each writes an fp32 partial and torch sums them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.pla.reference import PLAState

F_SUPPORTED = 16
SQRT2 = math.sqrt(2.0)
R_MAIN, R_TAIL = 128, 16  # packed quadratic rows: 120 pairs a < b + 16 diagonal + 8 padding
D_PACKED = 1 + F_SUPPORTED + R_MAIN + R_TAIL  # 161


def supports(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (q.shape[-1] == F_SUPPORTED and v.shape[-1] <= 256
            and q.dtype in (torch.bfloat16, torch.float16, torch.float32))


def supports_decode(q, v, state) -> bool:
    return q.shape[-1] == F_SUPPORTED and v.shape[-1] <= 256 and state.S.is_contiguous() and state.z.is_contiguous()


# ----------------------------------------------------------------------------- packed features
def _pairs(F=F_SUPPORTED):
    """(a, b) per packed row: the pairs a < b, then the diagonal, then padding (weight 0)."""
    ab = [(a, b) for a in range(F) for b in range(a + 1, F)] + [(a, a) for a in range(F)]
    return ab + [(0, 0)] * (R_MAIN + R_TAIL - len(ab))


def _pair_weight(a, b, t, F=F_SUPPORTED):
    if t >= F * (F + 1) // 2:
        return 0.0
    return (1.0 if a < b else 1.0 / SQRT2) / math.sqrt(F)


_SEL: dict = {}


def _selection(dtype, device):
    """E_A, E_B [F, 144] one-hot (input dtype: exact in any MMA precision) and W [144] fp32."""
    key = (dtype, str(device))
    if key not in _SEL:
        ab = _pairs()
        ea = torch.zeros(F_SUPPORTED, len(ab))
        eb = torch.zeros(F_SUPPORTED, len(ab))
        for t, (a, b) in enumerate(ab):
            ea[a, t] = 1.0
            eb[b, t] = 1.0
        w = torch.tensor([_pair_weight(a, b, t) for t, (a, b) in enumerate(ab)], dtype=torch.float32)
        _SEL[key] = (ea.to(device=device, dtype=dtype), eb.to(device=device, dtype=dtype), w.to(device))
    return _SEL[key]


_PUBLIC: dict = {}


def _to_public(S: torch.Tensor, z: torch.Tensor) -> PLAState:
    """Packed [.., 161, dv] / [.., 161] -> the public unpacked layout [.., 273, dv] / [.., 273]."""
    key = str(S.device)
    if key not in _PUBLIC:
        F = F_SUPPORTED
        index = {pair: t for t, pair in enumerate(_pairs()) if _pair_weight(*pair, t) != 0}
        rows, scale = list(range(1 + F)), [1.0] * (1 + F)
        for a in range(F):
            for b in range(F):
                t = index[(min(a, b), max(a, b))]
                rows.append(1 + F + t)
                scale.append(1.0 / (SQRT2 * _pair_weight(min(a, b), max(a, b), t) * math.sqrt(F)))
        _PUBLIC[key] = (torch.tensor(rows, device=S.device), torch.tensor(scale, device=S.device))
    rows, scale = _PUBLIC[key]
    return PLAState(S=S.index_select(-2, rows) * scale[:, None], z=z.index_select(-1, rows) * scale)


# Packed state rows: [0] constant, [1, 17) linear, then the quadratic rows in three parts (register
# pressure: one [C, 64] feature tile at a time): [17, 81), [81, 145), [145, 161). Kernels load the
# selection matrices of the three quadratic parts once (A, C, B below) and call the part helpers once per
# part; the linear part passes LIN=True (its selection arguments are then unused).
@triton.jit
def _selection_part(EA, EB, W, ROW: tl.constexpr, R: tl.constexpr, F: tl.constexpr):
    """E_A, E_B [F, R] and W [R] of the quadratic state rows [ROW, ROW + R)."""
    offs_r = ROW - 1 - F + tl.arange(0, R)
    ptr = tl.arange(0, F)[:, None] * 144 + offs_r[None, :]
    return tl.load(EA + ptr), tl.load(EB + ptr), tl.load(W + offs_r)


@triton.jit
def _feat(x, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """Features of one part of the state rows for the rows of x [C, F]: [C, R] fp32 (LIN: the linear rows,
    scale x; else quadratic, from the part's selection matrices ea, eb [F, R] and weights w [R])."""
    if LIN:
        f = x.to(tl.float32) * scale
    else:
        f = tl.dot(x, ea, input_precision=PREC) * tl.dot(x, eb, input_precision=PREC) * w[None, :]
    return f


@triton.jit
def _feat_t(xt, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """_feat transposed: x^T [F, C] -> [R, C]."""
    if LIN:
        f = xt.to(tl.float32) * scale
    else:
        f = (tl.dot(tl.trans(ea), xt, input_precision=PREC) * tl.dot(tl.trans(eb), xt, input_precision=PREC)
             * w[:, None])
    return f


@triton.jit
def _feat_grad(g, x, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """d/dx of sum(g * _feat(x)): g [C, R] fp32 -> [C, F] fp32."""
    if LIN:
        dx = g * scale
    else:
        gw = g * w[None, :]
        xa = tl.dot(x, ea, input_precision=PREC)
        xb = tl.dot(x, eb, input_precision=PREC)
        dx = (tl.dot((gw * xb).to(x.dtype), tl.trans(ea), input_precision=PREC)
              + tl.dot((gw * xa).to(x.dtype), tl.trans(eb), input_precision=PREC))
    return dx


@triton.jit
def _feat_grad_t(gt, xt, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """_feat_grad transposed: g^T [R, C], x^T [F, C] -> dx^T [F, C]."""
    if LIN:
        dxt = gt * scale
    else:
        gw = gt * w[:, None]
        xa = tl.dot(tl.trans(ea), xt, input_precision=PREC)
        xb = tl.dot(tl.trans(eb), xt, input_precision=PREC)
        dxt = (tl.dot(ea, (gw * xb).to(xt.dtype), input_precision=PREC)
               + tl.dot(eb, (gw * xa).to(xt.dtype), input_precision=PREC))
    return dxt


# ----------------------------------------------------------------------------- state parts
@triton.jit
def _load_part(S, Z, slot, ROW: tl.constexpr, R: tl.constexpr, offs_v, mv, DV):
    """Rows [ROW, ROW + R) of a packed state slot: S [R, BV], z [R]."""
    rows = slot * 161 + ROW + tl.arange(0, R)
    return tl.load(S + rows[:, None] * DV + offs_v[None, :], mask=mv[None, :], other=0.), tl.load(Z + rows)


@triton.jit
def _store_part(S, Z, slot, ROW: tl.constexpr, R: tl.constexpr, s, z, offs_v, mv, DV, STORE_Z):
    rows = slot * 161 + ROW + tl.arange(0, R)
    tl.store(S + rows[:, None] * DV + offs_v[None, :], s, mask=mv[None, :])
    if STORE_Z:
        tl.store(Z + rows, z)


@triton.jit
def _update_part(xt, y, s, z, wts, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """s += phi(x)^T y and z += phi(x)^T wts over a chunk (x^T [F, C], y [C, BV], wts [C]), rows of the part."""
    f = _feat_t(xt, ea, eb, w, scale, LIN, PREC)
    return s + tl.dot(f.to(y.dtype), y, input_precision=PREC), z + tl.sum(f * wts[None, :], axis=1)


@triton.jit
def _readout_part(x, s, z, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """phi(x) s [C, BV] and phi(x) . z [C] for the rows of x [C, F], rows of the part."""
    f = _feat(x, ea, eb, w, scale, LIN, PREC)
    return tl.dot(f.to(x.dtype), s.to(x.dtype), input_precision=PREC), tl.sum(f * z[None, :], axis=1)


@triton.jit
def _scan_part(q, kt, v, wts, num, den, s, z, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """One chunk of the forward scan for the rows of the part: (num, den) += readout of phi(q) from the state
    before the chunk; then the state update."""
    n_, d_ = _readout_part(q, s, z, ea, eb, w, scale, LIN, PREC)
    s, z = _update_part(kt, v, s, z, wts, ea, eb, w, scale, LIN, PREC)
    return num + n_, den + d_, s, z


@triton.jit
def _readout_grad_part(x, dnum, dden, s, z, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """d/dx of sum(dnum * phi(x) s) + sum(dden * phi(x) . z): [C, F]."""
    g = tl.dot(dnum, tl.trans(s.to(dnum.dtype)), input_precision=PREC) + dden[:, None] * z[None, :]
    return _feat_grad(g, x, ea, eb, w, scale, LIN, PREC)


@triton.jit
def _state_grad_part(k, kt, vt, d, e, first, ea, eb, w, scale, LIN: tl.constexpr, PREC: tl.constexpr):
    """From the gradient of the state rows of the part (d [R, BV], e [R]) to the chunk's keys and values:
    dv = phi(k) d [C, BV] and dk^T = (d/dk [phi(k) . (d v + e)])^T [F, C] (e counted by the first dv block)."""
    f = _feat(k, ea, eb, w, scale, LIN, PREC)
    dv = tl.dot(f.to(k.dtype), d.to(k.dtype), input_precision=PREC)
    gt = tl.dot(d.to(k.dtype), vt, input_precision=PREC) + first * e[:, None]
    return dv, _feat_grad_t(gt, kt, ea, eb, w, scale, LIN, PREC)


@triton.jit
def _selections(EA, EB, W, F: tl.constexpr):
    """Selection matrices and weights of the quadratic parts A, C, B (loaded once per program)."""
    eaA, ebA, wA = _selection_part(EA, EB, W, 17, 64, F)
    eaC, ebC, wC = _selection_part(EA, EB, W, 81, 64, F)
    eaB, ebB, wB = _selection_part(EA, EB, W, 145, 16, F)
    return eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB


@triton.jit
def _zero_state(BV: tl.constexpr, F: tl.constexpr):
    """An empty packed state as (s, z) per part: constant, linear, A, C, B."""
    return (tl.zeros([1, BV], tl.float32), tl.zeros([1], tl.float32), tl.zeros([F, BV], tl.float32),
            tl.zeros([F], tl.float32), tl.zeros([64, BV], tl.float32), tl.zeros([64], tl.float32),
            tl.zeros([64, BV], tl.float32), tl.zeros([64], tl.float32), tl.zeros([16, BV], tl.float32),
            tl.zeros([16], tl.float32))


@triton.jit
def _load_state(S, Z, slot, offs_v, mv, DV, F: tl.constexpr):
    """A packed state slot as (s, z) per part: constant, linear, A, C, B."""
    s0, z0 = _load_part(S, Z, slot, 0, 1, offs_v, mv, DV)
    sl, zl = _load_part(S, Z, slot, 1, F, offs_v, mv, DV)
    sa, za = _load_part(S, Z, slot, 17, 64, offs_v, mv, DV)
    sc, zc = _load_part(S, Z, slot, 81, 64, offs_v, mv, DV)
    sb, zb = _load_part(S, Z, slot, 145, 16, offs_v, mv, DV)
    return s0, z0, sl, zl, sa, za, sc, zc, sb, zb


@triton.jit
def _store_state(S, Z, slot, s0, z0, sl, zl, sa, za, sc, zc, sb, zb, offs_v, mv, DV, F: tl.constexpr, STORE_Z):
    """Inverse of _load_state (z only when STORE_Z: one dv block writes it)."""
    _store_part(S, Z, slot, 0, 1, s0, z0, offs_v, mv, DV, STORE_Z)
    _store_part(S, Z, slot, 1, F, sl, zl, offs_v, mv, DV, STORE_Z)
    _store_part(S, Z, slot, 17, 64, sa, za, offs_v, mv, DV, STORE_Z)
    _store_part(S, Z, slot, 81, 64, sc, zc, offs_v, mv, DV, STORE_Z)
    _store_part(S, Z, slot, 145, 16, sb, zb, offs_v, mv, DV, STORE_Z)


@triton.jit
def _update_state(xt, y, wts, sl, zl, sa, za, sc, zc, sb, zb, eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB, scale,
                  PREC: tl.constexpr):
    """_update_part over the linear and quadratic parts (the constant row is the caller's)."""
    sl, zl = _update_part(xt, y, sl, zl, wts, eaB, ebB, wB, scale, True, PREC)
    sa, za = _update_part(xt, y, sa, za, wts, eaA, ebA, wA, scale, False, PREC)
    sc, zc = _update_part(xt, y, sc, zc, wts, eaC, ebC, wC, scale, False, PREC)
    sb, zb = _update_part(xt, y, sb, zb, wts, eaB, ebB, wB, scale, False, PREC)
    return sl, zl, sa, za, sc, zc, sb, zb


@triton.jit
def _state_grad(dv, k, kt, vt, dl, el, da, ea, dc, ec, db, eb, first, eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB,
                scale, PREC: tl.constexpr):
    """_state_grad_part over the linear and quadratic parts: dv (added to the given one) and dk^T of a chunk."""
    dv_, dkt = _state_grad_part(k, kt, vt, dl, el, first, eaB, ebB, wB, scale, True, PREC)
    dv += dv_
    dv_, dkt_ = _state_grad_part(k, kt, vt, da, ea, first, eaA, ebA, wA, scale, False, PREC)
    dv += dv_
    dkt += dkt_
    dv_, dkt_ = _state_grad_part(k, kt, vt, dc, ec, first, eaC, ebC, wC, scale, False, PREC)
    dv += dv_
    dkt += dkt_
    dv_, dkt_ = _state_grad_part(k, kt, vt, db, eb, first, eaB, ebB, wB, scale, False, PREC)
    return dv + dv_, dkt + dkt_


@triton.jit
def _tile_offsets(pv, DV, C: tl.constexpr, F: tl.constexpr, BV: tl.constexpr):
    """Offsets of a chunk program: chunk rows [C], feature columns [F] (+ all-true mask), the columns of
    dv block pv [BV] and their mask."""
    offs_f = tl.arange(0, F)
    offs_v = pv * BV + tl.arange(0, BV)
    return tl.arange(0, C), offs_f, offs_f < F, offs_v, offs_v < DV


@triton.jit
def _load_rows(X, bh, rows, rm, N, WIDTH, offs, mo, TRANS: tl.constexpr):
    """Tile of X [BH, N, WIDTH] at token rows (masked rows and columns read 0): [C, W] or, TRANS, [W, C]."""
    base = X + bh * N * WIDTH
    if TRANS:
        tile = tl.load(base + rows[None, :] * WIDTH + offs[:, None], mask=rm[None, :] & mo[:, None], other=0.)
    else:
        tile = tl.load(base + rows[:, None] * WIDTH + offs[None, :], mask=rm[:, None] & mo[None, :], other=0.)
    return tile


# ----------------------------------------------------------------------------- reduction
@triton.jit
def _reduce_kernel(K, V, WGT, PS, PZ, EA, EB, W, M, DV, TOK_PER_SPLIT, SP0, scale,
                   F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, HAS_W: tl.constexpr):
    """Packed state of tokens [(sp + SP0) * TOK, ...) of (K, V) into slot sp * BH + bh:
    S = sum phi(k) v^T, z = sum phi(k) w (w = 1 without WGT)."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    offs_c, offs_f, all_f, offs_v, mv = _tile_offsets(pv, DV, C, F, BV)
    eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB = _selections(EA, EB, W, F)
    s0, z0, sl, zl, sa, za, sc, zc, sb, zb = _zero_state(BV, F)
    start = (sp + SP0) * TOK_PER_SPLIT
    end = tl.minimum(start + TOK_PER_SPLIT, M)
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        kt = _load_rows(K, bh, rows, rm, M, F, offs_f, all_f, True)
        v = _load_rows(V, bh, rows, rm, M, DV, offs_v, mv, False)
        if HAS_W:
            w = tl.load(WGT + bh * M + rows, mask=rm, other=0.)
        else:
            w = rm.to(tl.float32)
        s0 += tl.sum(v.to(tl.float32), axis=0)[None, :]
        z0 += tl.sum(w, axis=0)
        sl, zl, sa, za, sc, zc, sb, zb = _update_state(kt, v, w, sl, zl, sa, za, sc, zc, sb, zb,
                                                       eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB, scale, PREC)
    _store_state(PS, PZ, sp * BH + bh, s0, z0, sl, zl, sa, za, sc, zc, sb, zb, offs_v, mv, DV, F, pv == 0)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_kernel(Q, K, V, S_INIT, Z_INIT, Y, DEN, S_OUT, Z_OUT, EA, EB, W, N, DV, TOK, scale, eps,
                F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
                STORE_DEN: tl.constexpr, STORE_STATE: tl.constexpr):
    """Chunked causal forward over split sp = tokens [sp * TOK, (sp + 1) * TOK) from that split's initial
    state (slot sp * BH + bh). The last split stores the final state (prefill)."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    start = sp * TOK
    end = tl.minimum(start + TOK, N)
    DT = Q.dtype.element_ty
    sc2 = scale * scale
    offs_c, offs_f, all_f, offs_v, mv = _tile_offsets(pv, DV, C, F, BV)
    eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB = _selections(EA, EB, W, F)
    s0, z0, sl, zl, sa, za, sc, zc, sb, zb = _load_state(S_INIT, Z_INIT, sp * BH + bh, offs_v, mv, DV, F)
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        q = _load_rows(Q, bh, rows, rm, N, F, offs_f, all_f, False)
        kt = _load_rows(K, bh, rows, rm, N, F, offs_f, all_f, True)
        v = _load_rows(V, bh, rows, rm, N, DV, offs_v, mv, False)
        # within the chunk: phi(q).phi(k) = 1 + s + s^2/2, causal
        s = tl.dot(q, kt, input_precision=PREC) * sc2
        a = tl.where((offs_c[:, None] >= offs_c[None, :]) & rm[None, :], 1.0 + s + 0.5 * s * s, 0.0)
        num = tl.dot(a.to(DT), v, input_precision=PREC) + s0
        den = tl.sum(a, axis=1) + z0 + eps
        # from the state before the chunk, then add the chunk to it; part by part
        w = rm.to(tl.float32)
        s0 += tl.sum(v.to(tl.float32), axis=0)[None, :]
        z0 += tl.sum(w, axis=0)
        num, den, sl, zl = _scan_part(q, kt, v, w, num, den, sl, zl, eaB, ebB, wB, scale, True, PREC)
        num, den, sa, za = _scan_part(q, kt, v, w, num, den, sa, za, eaA, ebA, wA, scale, False, PREC)
        num, den, sc, zc = _scan_part(q, kt, v, w, num, den, sc, zc, eaC, ebC, wC, scale, False, PREC)
        num, den, sb, zb = _scan_part(q, kt, v, w, num, den, sb, zb, eaB, ebB, wB, scale, False, PREC)
        y = num / den[:, None]
        tl.store(Y + bh * N * DV + rows[:, None] * DV + offs_v[None, :], y.to(Y.dtype.element_ty), mask=rm[:, None] & mv[None, :])
        if STORE_DEN:  # every dv block computes the same den: no pv == 0 branch (it costs ~20% of the loop)
            tl.store(DEN + bh * N + rows, den, mask=rm)
    if STORE_STATE:
        if sp == tl.num_programs(2) - 1:
            _store_state(S_OUT, Z_OUT, bh, s0, z0, sl, zl, sa, za, sc, zc, sb, zb, offs_v, mv, DV, F, pv == 0)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _dden_kernel(DY, Y, DEN, DDEN, ROWS, DV, BR: tl.constexpr, BV: tl.constexpr):
    """d loss / d den_i = -(dy_i . y_i) / den_i for BR rows (den includes eps)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BV)
    rm = rows < ROWS
    m = rm[:, None] & (cols < DV)[None, :]
    dy = tl.load(DY + rows[:, None] * DV + cols[None, :], mask=m, other=0.).to(tl.float32)
    y = tl.load(Y + rows[:, None] * DV + cols[None, :], mask=m, other=0.).to(tl.float32)
    den = tl.load(DEN + rows, mask=rm, other=1.)
    tl.store(DDEN + rows, -tl.sum(dy * y, axis=1) / den, mask=rm)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DEN, DDEN, S_INIT, Z_INIT, DQ, EA, EB, W, N, DV, TOK, scale,
                   F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Forward scan over split sp from its initial state for dq."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    start = sp * TOK
    end = tl.minimum(start + TOK, N)
    DT = Q.dtype.element_ty
    sc2 = scale * scale
    offs_c, offs_f, all_f, offs_v, mv = _tile_offsets(pv, DV, C, F, BV)
    eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB = _selections(EA, EB, W, F)
    first = (pv == 0).to(tl.float32)  # the normaliser's terms are added by one dv block only
    _, _, sl, zl, sa, za, sc, zc, sb, zb = _load_state(S_INIT, Z_INIT, sp * BH + bh, offs_v, mv, DV, F)
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        q = _load_rows(Q, bh, rows, rm, N, F, offs_f, all_f, False)
        k = _load_rows(K, bh, rows, rm, N, F, offs_f, all_f, False)
        kt = _load_rows(K, bh, rows, rm, N, F, offs_f, all_f, True)
        v = _load_rows(V, bh, rows, rm, N, DV, offs_v, mv, False)
        do = _load_rows(DO, bh, rows, rm, N, DV, offs_v, mv, False).to(tl.float32)
        den = tl.load(DEN + bh * N + rows, mask=rm, other=1.)
        dden = tl.load(DDEN + bh * N + rows, mask=rm, other=0.) * first
        dnum = (do / den[:, None]).to(DT)
        # within the chunk: dA_ij = dnum_i . v_j + dden_i ; ds = dA (1 + s)
        s = tl.dot(q, kt, input_precision=PREC) * sc2
        da = tl.dot(dnum, tl.trans(v), input_precision=PREC) + dden[:, None]
        ds = tl.where((offs_c[:, None] >= offs_c[None, :]) & rm[None, :], da * (1.0 + s), 0.0)
        dq = tl.dot(ds.to(DT), k, input_precision=PREC) * sc2
        # from the state before the chunk: d/dq [phi(q) (S dnum + z dden)]
        dq += _readout_grad_part(q, dnum, dden, sl, zl, eaB, ebB, wB, scale, True, PREC)
        dq += _readout_grad_part(q, dnum, dden, sa, za, eaA, ebA, wA, scale, False, PREC)
        dq += _readout_grad_part(q, dnum, dden, sc, zc, eaC, ebC, wC, scale, False, PREC)
        dq += _readout_grad_part(q, dnum, dden, sb, zb, eaB, ebB, wB, scale, False, PREC)
        tl.store(DQ + ((pv * BH + bh) * N + rows[:, None]) * F + offs_f[None, :], dq.to(DQ.dtype.element_ty), mask=rm[:, None])
        w = rm.to(tl.float32)
        sl, zl, sa, za, sc, zc, sb, zb = _update_state(kt, v, w, sl, zl, sa, za, sc, zc, sb, zb,
                                                       eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB, scale, PREC)


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, DEN, DDEN, DK, DVO, DS, DZ, DS_INIT, DZ_INIT, EA, EB, W, N, DV, TOK, scale,
                    F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, HAS_INIT: tl.constexpr):
    """Reverse scan over split sp starting from the state gradient of all later splits (DS_INIT / DZ_INIT
    slot sp * BH + bh, packed; zero without HAS_INIT). Split 0 stores the total state gradient (DS, DZ)
    for the encoder backward."""
    bh = tl.program_id(0)
    pv = tl.program_id(1)
    sp = tl.program_id(2)
    BH = tl.num_programs(0)
    start = sp * TOK
    end = tl.minimum(start + TOK, N)
    DT = Q.dtype.element_ty
    sc2 = scale * scale
    offs_c, offs_f, all_f, offs_v, mv = _tile_offsets(pv, DV, C, F, BV)
    eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB = _selections(EA, EB, W, F)
    first = (pv == 0).to(tl.float32)
    if HAS_INIT:
        d0, e0, dl, el, da_, ea_, dc, ec, db, eb_ = _load_state(DS_INIT, DZ_INIT, sp * BH + bh, offs_v, mv, DV, F)
    else:
        d0, e0, dl, el, da_, ea_, dc, ec, db, eb_ = _zero_state(BV, F)
    n_chunks = tl.cdiv(end - start, C)
    for ci in range(0, n_chunks):
        c0 = start + (n_chunks - 1 - ci) * C
        rows = c0 + offs_c
        rm = rows < end
        q = _load_rows(Q, bh, rows, rm, N, F, offs_f, all_f, False)
        qt = _load_rows(Q, bh, rows, rm, N, F, offs_f, all_f, True)
        k = _load_rows(K, bh, rows, rm, N, F, offs_f, all_f, False)
        kt = _load_rows(K, bh, rows, rm, N, F, offs_f, all_f, True)
        v = _load_rows(V, bh, rows, rm, N, DV, offs_v, mv, False)
        vt = _load_rows(V, bh, rows, rm, N, DV, offs_v, mv, True)
        den = tl.load(DEN + bh * N + rows, mask=rm, other=1.)
        dden_all = tl.load(DDEN + bh * N + rows, mask=rm, other=0.)
        dden = dden_all * first
        dnum = (_load_rows(DO, bh, rows, rm, N, DV, offs_v, mv, False).to(tl.float32) / den[:, None]).to(DT)
        # within the chunk ([j, i]: key j, query i >= j)
        valid = (offs_c[:, None] <= offs_c[None, :]) & rm[:, None] & rm[None, :]
        st = tl.dot(k, qt, input_precision=PREC) * sc2
        at = tl.where(valid, 1.0 + st + 0.5 * st * st, 0.0)
        dv = tl.dot(at.to(DT), dnum, input_precision=PREC) + d0
        dat = tl.dot(v, tl.trans(dnum), input_precision=PREC) + dden[None, :]
        dst = tl.where(valid, dat * (1.0 + st), 0.0)
        dk = tl.dot(dst.to(DT), q, input_precision=PREC) * sc2
        # from the gradient of the state after the chunk (all later queries), part by part
        dv, dkt = _state_grad(dv, k, kt, vt, dl, el, da_, ea_, dc, ec, db, eb_, first,
                              eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB, scale, PREC)
        tl.store(DVO + bh * N * DV + rows[:, None] * DV + offs_v[None, :], dv.to(DVO.dtype.element_ty), mask=rm[:, None] & mv[None, :])
        dk += tl.trans(dkt)
        tl.store(DK + ((pv * BH + bh) * N + rows[:, None]) * F + offs_f[None, :], dk.to(DK.dtype.element_ty), mask=rm[:, None])
        # state gradient += phi(q_i) dnum_i^T, phi(q_i) dden_i over this chunk's queries
        d0 += tl.sum(dnum.to(tl.float32), axis=0)[None, :]
        e0 += tl.sum(dden_all, axis=0)
        dl, el, da_, ea_, dc, ec, db, eb_ = _update_state(qt, dnum, dden_all, dl, el, da_, ea_, dc, ec, db, eb_,
                                                          eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB, scale, PREC)
    if sp == 0:
        _store_state(DS, DZ, bh, d0, e0, dl, el, da_, ea_, dc, ec, db, eb_, offs_v, mv, DV, F, pv == 0)


@triton.jit
def _bwd_enc_kernel(KE, VE, DS, DZ, DKE, DVE, EA, EB, W, M, DV, TOK, scale,
                    F: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dv_e = phi(k_e) . dS;  dk_e = d/dk_e [phi(k_e) . (dS v_e + dz)]  over the prefix tokens
    [sp * TOK, (sp + 1) * TOK) (the state gradient is read once per program)."""
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    pv = tl.program_id(2)
    BH = tl.num_programs(0)
    offs_c, offs_f, all_f, offs_v, mv = _tile_offsets(pv, DV, C, F, BV)
    eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB = _selections(EA, EB, W, F)
    first = (pv == 0).to(tl.float32)
    d0, _, dl, el, da_, ea_, dc, ec, db, eb_ = _load_state(DS, DZ, bh, offs_v, mv, DV, F)
    start = sp * TOK
    end = tl.minimum(start + TOK, M)
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rm = rows < end
        k = _load_rows(KE, bh, rows, rm, M, F, offs_f, all_f, False)
        kt = _load_rows(KE, bh, rows, rm, M, F, offs_f, all_f, True)
        vt = _load_rows(VE, bh, rows, rm, M, DV, offs_v, mv, True)
        dv, dkt = _state_grad(d0, k, kt, vt, dl, el, da_, ea_, dc, ec, db, eb_, first,
                              eaA, ebA, wA, eaC, ebC, wC, eaB, ebB, wB, scale, PREC)
        tl.store(DVE + bh * M * DV + rows[:, None] * DV + offs_v[None, :], dv.to(DVE.dtype.element_ty), mask=rm[:, None] & mv[None, :])
        tl.store(DKE + ((pv * BH + bh) * M + rows[None, :]) * F + offs_f[:, None], dkt.to(DKE.dtype.element_ty), mask=rm[None, :])


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
    """Launch config for kind in ("fwd", "dq", "dkv", "enc", "red"): chunk C, dv block BV, warps, stages,
    optional maxnreg, and for the scans the sequence split ("waves": aim for waves x SM-count programs;
    0 = one split; the backward's split follows "dkv").
    Tuned on an H100 with `python benchmarks/pla.py --tune`; see docs/PERFORMANCE.md."""
    return _CFG.get((kind, dv), _CFG_DEFAULT[kind])


_CFG_DEFAULT = {"fwd": dict(C=64, BV=64, num_warps=4, num_stages=1, waves=1),
                "dq": dict(C=32, BV=64, num_warps=4, num_stages=2),
                "dkv": dict(C=32, BV=64, num_warps=4, num_stages=3, waves=1),
                "enc": dict(C=64, BV=64, num_warps=4, num_stages=1),
                "red": dict(C=128, BV=64, num_warps=4, num_stages=1)}
# Chosen on an H100 (triton 3.6) at B=16, H=16, N=8192 (docs/PERFORMANCE.md): 4 warps everywhere (8 warps:
# 1.5-2x slower, and an 8-warp backward of an earlier design read shared memory out of bounds inside
# Triton-generated code); maxnreg=128 (for occupancy) 2-3x slower from spills; dk/dv 3 stages: fwd+bwd 5.46 vs
# 5.65 ms with 2.
_CFG: dict = {}
_INTERPRET_C = 16  # chunk under TRITON_INTERPRET (CPU tests)
_FORCE_SPLIT_TOK = None  # tests: force this many tokens per sequence split (rounded up to the chunk)
_MIN_SPLIT_CHUNKS = 4  # a split holds at least this many chunks (unless forced)


def _kernel_opts(cfg, F, dtype):
    """Compile-time arguments of a scan / encoder-gradient launch."""
    return dict(F=F, C=_chunk(cfg), BV=cfg["BV"], PREC=_prec(dtype), **_launch_opts(cfg))


def _launch_opts(cfg):
    """Triton launch options of a config (maxnreg caps registers per thread, for occupancy)."""
    opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg.get("maxnreg"):
        opts["maxnreg"] = cfg["maxnreg"]
    return opts


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


def _prefix_split(M, C, programs, device):
    """Tokens per program and programs per sequence for the (order-free) encoder passes: enough programs
    for ~4 per SM, at least 4 chunks each."""
    min_programs = 4 * _n_sm(device) if torch.device(device).type == "cuda" else 1
    split = max(1, min(triton.cdiv(M, 4 * C), triton.cdiv(min_programs, programs)))
    tok = triton.cdiv(triton.cdiv(M, split), C) * C
    return tok, triton.cdiv(M, tok)


_GLUON = True  # use the Hopper kernels of gluon_pla where they apply (tests switch them off to compare)


def _gluon(q, v):
    """The Gluon module (kernels/pla/gluon_pla.py) when its kernels apply to these inputs, else None."""
    if not (_GLUON and q.is_cuda):
        return None
    try:
        from kernels.pla import gluon_pla
    except ImportError:  # a Triton without Gluon
        return None
    return gluon_pla if gluon_pla.supported(q, v) else None


def _reduce(k, v, w, tok, nsplit, sp0):
    """Per-split packed state sums: slot j holds tokens of split j + sp0:
    S [nsplit, BH, 161, DV] = sum phi(k) v^T, z [nsplit, BH, 161] = sum phi(k) w (w = 1 when None)."""
    G = _gluon(k, v)
    if G is not None and w is None and sp0 == 0:
        return G.reduce_states(k, v, tok, nsplit)
    B, H, M, F = k.shape
    DV = v.shape[-1]
    BH = B * H
    cfg = _cfg(DV, "red")
    BV = cfg["BV"]
    PS = torch.empty(nsplit, BH, D_PACKED, DV, device=k.device, dtype=torch.float32)
    PZ = torch.empty(nsplit, BH, D_PACKED, device=k.device, dtype=torch.float32)
    _reduce_kernel[(BH, triton.cdiv(DV, BV), nsplit)](
        k, v, k if w is None else w, PS, PZ, *_selection(k.dtype, k.device), M, DV, tok, sp0, F ** -0.25,
        F=F, C=_chunk(cfg), BV=BV, PREC=_prec(k.dtype), HAS_W=w is not None,
        **_launch_opts(cfg))
    return PS, PZ


def _encoder(k_enc, v_enc):
    """Packed encoder state (S_e [BH, 161, DV], z_e [BH, 161]), the prefix split to fill the GPU."""
    B, H, M, F = k_enc.shape
    DV = v_enc.shape[-1]
    BH = B * H
    if M == 0:
        return (torch.zeros(BH, D_PACKED, DV, device=k_enc.device, dtype=torch.float32),
                torch.zeros(BH, D_PACKED, device=k_enc.device, dtype=torch.float32))
    cfg = _cfg(DV, "red")
    tok, P = _prefix_split(M, _chunk(cfg), BH * triton.cdiv(DV, cfg["BV"]), k_enc.device)
    PS, PZ = _reduce(k_enc, v_enc, None, tok, P, 0)
    return (PS[0], PZ[0]) if PS.shape[0] == 1 else (PS.sum(0), PZ.sum(0))


def _prefix_states(k, v, Se, Ze, tok, P):
    """Initial state of each split (packed): Se + sums over all earlier splits. [P, BH, 161, DV], [P, BH, 161]."""
    if P == 1:
        return Se[None], Ze[None]
    PS, PZ = _reduce(k, v, None, tok, P - 1, 0)
    S = torch.empty((P,) + tuple(Se.shape), device=Se.device, dtype=torch.float32)
    Z = torch.empty((P,) + tuple(Ze.shape), device=Se.device, dtype=torch.float32)
    S[0], Z[0] = Se, Ze
    torch.cumsum(PS, 0, out=S[1:])
    torch.cumsum(PZ, 0, out=Z[1:])
    S[1:] += Se
    Z[1:] += Ze
    return S, Z


def _forward(q, k, v, k_enc, v_enc, eps, store_den, store_state):
    """y (and the normaliser for the backward, the packed encoder state, and for prefill the final
    packed state)."""
    q, k, v, k_enc, v_enc = (t.contiguous() for t in (q, k, v, k_enc, v_enc))
    B, H, N, F = q.shape
    DV = v.shape[-1]
    cfg = _cfg(DV, "fwd")
    G = _gluon(q, v)
    BV, C = (DV, G.CHUNK) if G is not None else (cfg["BV"], _chunk(cfg))
    nv = triton.cdiv(DV, BV)
    Se, Ze = _encoder(k_enc, v_enc)
    y = torch.empty_like(v)
    den = torch.empty(B, H, N, device=q.device, dtype=torch.float32) if store_den else y
    S_out = torch.empty(B * H, D_PACKED, DV, device=q.device, dtype=torch.float32) if store_state else y
    Z_out = torch.empty(B * H, D_PACKED, device=q.device, dtype=torch.float32) if store_state else y
    if N > 0:
        tok, P = _split(N, C, B * H * nv, cfg.get("waves", 0), q.device)
        S_init, Z_init = _prefix_states(k, v, Se, Ze, tok, P)
        if G is not None:
            G.forward_scan(q, k, v, S_init, Z_init, y, den, S_out, Z_out, tok, P, eps, store_den, store_state)
        else:
            _fwd_kernel[(B * H, nv, P)](q, k, v, S_init, Z_init, y, den, S_out, Z_out,
                                        *_selection(q.dtype, q.device), N, DV, tok, F ** -0.25, eps, F=F, C=C,
                                        BV=BV, PREC=_prec(q.dtype), STORE_DEN=store_den,
                                        STORE_STATE=store_state, **_launch_opts(cfg))
    elif store_state:
        S_out.copy_(Se), Z_out.copy_(Ze)
    return y, den, Se, Ze, S_out, Z_out


class PLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k_enc, v_enc, eps):
        need = any(ctx.needs_input_grad[:5])
        # the contiguous copies are the ones saved: the backward reads them as they are (saving
        # the mixer's strided views would copy them again there)
        q, k, v, k_enc, v_enc = (t.contiguous() for t in (q, k, v, k_enc, v_enc))
        y, den, Se, Ze, _, _ = _forward(q, k, v, k_enc, v_enc, eps, store_den=need, store_state=False)
        if need:
            ctx.save_for_backward(q, k, v, k_enc, v_enc, y, den, Se, Ze)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, k, v, k_enc, v_enc, y, den, Se, Ze = ctx.saved_tensors
        dy = dy.contiguous()
        B, H, N, F = q.shape
        M = k_enc.shape[2]
        DV = v.shape[-1]
        BH = B * H
        cq, ck, ce = _cfg(DV, "dq"), _cfg(DV, "dkv"), _cfg(DV, "enc")
        nq, nk, ne = (triton.cdiv(DV, c["BV"]) for c in (cq, ck, ce))
        sel = _selection(q.dtype, q.device)
        scale = F ** -0.25
        dden = torch.empty_like(den)
        if N > 0:  # separate pass: computing it in the dq scan made that scan 0.4 ms slower at 8k (H100)
            _dden_kernel[(triton.cdiv(BH * N, 64),)](dy, y, den, dden, BH * N, DV, BR=64, BV=triton.next_power_of_2(DV))
        dq = _partials(nq, (B, H, N, F), q)
        dk = _partials(nk, (B, H, N, F), k)
        dv = torch.empty_like(v)
        dS = torch.empty(BH, D_PACKED, DV, device=q.device, dtype=torch.float32)
        dZ = torch.empty(BH, D_PACKED, device=q.device, dtype=torch.float32)
        if N > 0:
            tok, P = _split(N, max(_chunk(cq), _chunk(ck)), BH * nk, ck.get("waves", 0), q.device)
            S_init, Z_init = _prefix_states(k, v, Se, Ze, tok, P)
            _bwd_dq_kernel[(BH, nq, P)](q, k, v, dy, den, dden, S_init, Z_init, dq, *sel, N, DV, tok, scale,
                                        **_kernel_opts(cq, F, q.dtype))
            del S_init, Z_init
            if P > 1:
                # state gradient from all later splits: reverse exclusive sum of per-split sums of
                # phi(q) dnum^T and phi(q) dden
                dnum = (dy.float() / den[..., None]).to(q.dtype)
                PS, PZ = _reduce(q, dnum, dden, tok, P - 1, 1)
                dS_init = torch.zeros(P, BH, D_PACKED, DV, device=q.device, dtype=torch.float32)
                dZ_init = torch.zeros(P, BH, D_PACKED, device=q.device, dtype=torch.float32)
                dS_init[:-1] = PS.flip(0).cumsum(0).flip(0)
                dZ_init[:-1] = PZ.flip(0).cumsum(0).flip(0)
                del PS, PZ, dnum
            else:
                dS_init, dZ_init = dS, dZ
            _bwd_dkv_kernel[(BH, nk, P)](q, k, v, dy, den, dden, dk, dv, dS, dZ, dS_init, dZ_init, *sel, N, DV, tok,
                                         scale, HAS_INIT=P > 1, **_kernel_opts(ck, F, q.dtype))
        else:
            dS.zero_(), dZ.zero_()
        dke = _partials(ne, (B, H, M, F), k_enc)
        dve = torch.empty_like(v_enc)
        if M > 0:
            tok, P = _prefix_split(M, _chunk(ce), BH * ne, q.device)
            _bwd_enc_kernel[(BH, P, ne)](k_enc, v_enc, dS, dZ, dke, dve, *sel, M, DV, tok, scale,
                                         **_kernel_opts(ce, F, q.dtype))
        return (_sum_blocks(dq, q.dtype), _sum_blocks(dk, k.dtype), dv, _sum_blocks(dke, k_enc.dtype), dve, None)


def _partials(nv, shape, like):
    """Output of a gradient summed over nv dv blocks: fp32 partials [nv, *shape], or with one block the
    gradient itself in the input's dtype (the kernels cast on store)."""
    return torch.empty((nv,) + shape, device=like.device, dtype=torch.float32 if nv > 1 else like.dtype)


def _sum_blocks(partials, dtype):
    """The gradient from _partials, in the input dtype."""
    return partials[0] if partials.shape[0] == 1 else partials.sum(0).to(dtype)


def pla_triton(q, k, v, k_enc, v_enc, eps: float = 1e-12):
    return PLATriton.apply(q, k, v, k_enc, v_enc, eps)


@torch.no_grad()
def pla_prefill_triton(q, k, v, k_enc, v_enc, eps: float = 1e-12):
    """Output and the fp32 state after all N tokens in the public (unpacked) layout."""
    B, H = q.shape[:2]
    y, _, _, _, S, Z = _forward(q, k, v, k_enc, v_enc, eps, store_den=False, store_state=True)
    st = _to_public(S, Z)
    return y, PLAState(S=st.S.view(B, H, *st.S.shape[1:]), z=st.z.view(B, H, -1))


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
