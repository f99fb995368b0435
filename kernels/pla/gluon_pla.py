"""Hopper (sm_90) PLA kernels in Gluon: the state reduction and the forward scan, dv = 64, bf16.

Why a second implementation: the Triton scans are latency bound (255 registers with spills, every wgmma
waited for at once; docs/PERFORMANCE.md). Gluon (triton.experimental.gluon) gives explicit shared memory,
layouts and asynchronous wgmma: the chunk's inputs arrive by cp.async one chunk ahead and no tile spills.
z and the normaliser are fp32 sums in registers over the feature tiles that the S and y MMAs use (MMAs for
them cost more time than the sums). A chunk is a pipeline of feature stages (below); the wgmmas are
asynchronous (not serialised by ptxas), and at some stages the next stage's feature MMAs are issued before
this stage's elementwise work. docs/PERFORMANCE.md has the numbers.

Features (one head, f = 16) are built as in triton_pla, with one-hot selection MMAs, in three row parts of
64: part 0 / 1 = quadratic pairs 0..63 / 64..127, part 2 = pairs 128..143 (rows 0..15; 136..143 are the
packed layout's zero padding), the linear rows (16..31) and the constant row, which takes the place of the
padding row 15, so that part 2's rows 32..63 have no features and the readout skips them:
    g_r(x) = (x E_A + c_A)_r (x E_B + c_B)_r,
with c_A = 1 on the linear and constant rows and c_B = 1 on the constant row, added by one more MMA with a
tile of ones (E_A is zero on those rows, so the linear feature is x_b). The kernels keep the state as
    S_r = W_r^2 sum g_r(k) v^T   (= W_r x triton_pla's packed row r),
so the readout is g(q) S with no weights. W_r^2 (1/16, 1/32, 1/4, 1) is a power of two, so it is folded
exactly into the key-side E_A and c_A. The state is converted to and from the packed layout (161 rows, rows
weighted by W_r) only when it is loaded or stored (ROWMAP: packed row of a part row, -1 = unused).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma, warpgroup_mma_init,
                                                               warpgroup_mma_wait)

from kernels.pla import triton_pla as T

DV_GLUON = 64
CHUNK = 64
_R = 64  # state rows per part
_PARTS = 3
_F, _DV = gl.constexpr(T.F_SUPPORTED), gl.constexpr(DV_GLUON)  # the kernels' feature and value dims
_CONST_ROW = gl.constexpr(15)  # row of part 2 that holds the constant feature (a padding pair in triton_pla)
_SPARE_ROW = 32  # row of part 2 (no features) that carries the displaced padding row of the packed layout
# Selection matrices (as E^T [64, f]) in shared memory: query-side E_A, E_B of parts 0..2 at 2p, 2p + 1
# (E_B is shared by both sides), key-side E_A x W^2 at 6 + p; c_A, c_B, W^2 c_A in column 0 at 9, 10, 11.
_SEL_Q_A, _SEL_B, _SEL_K_A = gl.constexpr(0), gl.constexpr(1), gl.constexpr(6)
_SEL_CA, _SEL_CB, _SEL_K_CA, _N_SEL = gl.constexpr(9), gl.constexpr(10), gl.constexpr(11), 12


# Layouts (one warpgroup of 4 warps): wgmma accumulators of [64, 64] / [64, 32] tiles, register A operands
# (AOP), row and column vectors of both (z sums the rows of key-side feature tiles, the readout's normaliser
# weights the columns of query-side ones), and blocked layouts of the [C, 16] and [C, 64] input tiles.
MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
MMA32 = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 32, 16]))
AOP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=2))
ROW = gl.constexpr(gl.SliceLayout(1, MMA.value))
COL = gl.constexpr(gl.SliceLayout(0, MMA.value))
FROW = gl.constexpr(gl.SliceLayout(1, MMA32.value))
FCOL = gl.constexpr(gl.SliceLayout(0, MMA32.value))
BLK_F = gl.constexpr(gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0]))
BLK_V = gl.constexpr(gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0]))


def supported(q: torch.Tensor, v: torch.Tensor) -> bool:
    """The Gluon kernels run: a Hopper GPU, bf16 inputs, f = 16 and dv = 64 (else the Triton kernels). Not fp16:
    the readout reads the state and z in the input dtype, and z counts tokens (fp16 overflows at 65504)."""
    return (q.is_cuda and not T._interpret() and torch.cuda.get_device_capability(q.device) == (9, 0)
            and q.dtype == torch.bfloat16 and q.shape[-1] == T.F_SUPPORTED and v.shape[-1] == DV_GLUON)


# ----------------------------------------------------------------------------- tables
def part_tables(F: int = T.F_SUPPORTED):
    """Selection matrices SEL [12, 64, F] (see _SEL_*), row weights W [3, 64] and ROWMAP [3, 64] (packed row
    or -1), fp32 on the CPU."""
    ab = T._pairs()
    ea = torch.zeros(_PARTS, _R, F)
    eb = torch.zeros(_PARTS, _R, F)
    ca = torch.zeros(_R)
    cb = torch.zeros(_R)
    W = torch.ones(_PARTS, _R, dtype=torch.float64)  # W^2 rounds to the exact power of two in fp32
    ROWMAP = torch.full((_PARTS, _R), -1, dtype=torch.int32)
    for p in range(_PARTS):
        for r in range(_R):
            t = _R * p + r
            if p == 2 and r == _CONST_ROW.value:
                ca[r] = cb[r] = 1.
                ROWMAP[p, r] = 0
            elif p < 2 or r < 16:  # quadratic rows (or the packed layout's padding rows: zero features, W = 1)
                a, b = ab[t]
                if T._pair_weight(a, b, t):
                    ea[p, r, a] = eb[p, r, b] = 1.
                    W[p, r] = T._pair_weight(a, b, t)
                ROWMAP[p, r] = 1 + F + t
            elif r < 32:
                eb[p, r, r - 16] = 1.
                ca[r] = 1.
                W[p, r] = F ** -0.25
                ROWMAP[p, r] = 1 + (r - 16)
            elif r == _SPARE_ROW:
                ROWMAP[p, r] = 1 + F + _R * 2 + _CONST_ROW.value
    W2 = (W * W).float()
    SEL = torch.zeros(_N_SEL, _R, F)
    SEL[0:6:2] = ea
    SEL[1:6:2] = eb
    SEL[6:9] = ea * W2[:, :, None]
    SEL[9, :, 0] = ca
    SEL[10, :, 0] = cb
    SEL[11, :, 0] = ca * W2[2]
    return SEL, W.float(), ROWMAP


_TABLES: dict = {}


def _tables(dtype, device):
    key = (dtype, str(device))
    if key not in _TABLES:
        SEL, W, ROWMAP = part_tables()
        _TABLES[key] = (SEL.to(device=device, dtype=dtype).contiguous(), W.to(device).contiguous(),
                        ROWMAP.to(device).contiguous())
    return _TABLES[key]


# ----------------------------------------------------------------------------- shared memory, loads, state
@gluon.jit
def _smem(DT: gl.constexpr, shape: gl.constexpr):
    """Shared memory for wgmma operands; the leading dim of a 3-d shape counts stages or parts."""
    tile: gl.constexpr = [shape[len(shape) - 2], shape[len(shape) - 1]]
    return gl.allocate_shared_memory(DT, shape, gl.NVMMASharedLayout.get_default_for(tile, DT))


@gluon.jit
def _constant_smem(SEL, DT: gl.constexpr, BLK: gl.constexpr):
    """In shared memory: the selection matrices and a [64, 16] tile of ones (the constant input of c_A, c_B)."""
    sel = _smem(DT, [12, 64, 16])
    r = gl.arange(0, 64, layout=gl.SliceLayout(1, BLK))
    f = gl.arange(0, 16, layout=gl.SliceLayout(0, BLK))
    for i in gl.static_range(12):
        sel.index(i).store(gl.load(SEL + (i * 64 + r[:, None]) * 16 + f[None, :]))
    ones = _smem(DT, [64, 16])
    ones.store(gl.full([64, 16], 1.0, DT, BLK))
    return sel, ones


@gluon.jit
def _copy_rows(dst, X, row0, end, WIDTH: gl.constexpr, C: gl.constexpr, LAYOUT: gl.constexpr):
    """cp.async rows [row0, row0 + C) of a [*, WIDTH] matrix into dst (rows >= end: zeros)."""
    rows = row0 + gl.arange(0, C, layout=gl.SliceLayout(1, LAYOUT))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, LAYOUT))
    async_copy.async_copy_global_to_shared(dst, X + rows[:, None] * WIDTH + cols[None, :],
                                           mask=(rows < end)[:, None])


@gluon.jit
def _rows(slot, ROWMAP, W, p: gl.constexpr, L: gl.constexpr):
    """Part p's rows in packed state slot `slot` (layout L): offsets into z, the row mask, the row weights."""
    offs = p * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, L))
    row = gl.load(ROWMAP + offs)
    return slot * 161 + row, row >= 0, gl.load(W + offs)


@gluon.jit
def _load_state(S, Z, slot, ROWMAP, W, p: gl.constexpr):
    """Part p of a packed state slot in the kernels' scaling (x W_r): S [64, 64] as an MMA accumulator and z
    [64] as a row vector of feature operands."""
    off, ok, w = _rows(slot, ROWMAP, W, p, MMA)
    s = gl.load(S + off[:, None] * 64 + gl.arange(0, 64, layout=COL)[None, :], mask=ok[:, None], other=0.)
    off, ok, wz = _rows(slot, ROWMAP, W, p, MMA32)
    return warpgroup_mma_init(s * w[:, None]), gl.load(Z + off, mask=ok, other=0.) * wz


@gluon.jit
def _store_state(S, Z, slot, s, z, ROWMAP, W, p: gl.constexpr):
    """Inverse of _load_state."""
    off, ok, w = _rows(slot, ROWMAP, W, p, MMA)
    gl.store(S + off[:, None] * 64 + gl.arange(0, 64, layout=COL)[None, :], s / w[:, None], mask=ok[:, None])
    off, ok, w = _rows(slot, ROWMAP, W, p, MMA32)
    gl.store(Z + off, z / w, mask=ok)


@gluon.jit
def _store_parts(S, Z, slot, s0, s1, s2, z0, z1, z2, n_pad, ROWMAP, W):
    """A whole state (waited accumulators) into a packed slot, without the constant feature of the n_pad
    zero-padded tokens of the last chunk (the ones tile gives them 1; it only reaches z of part 2)."""
    z2 = z2 - gl.where(gl.arange(0, 64, layout=FROW) == _CONST_ROW, n_pad.to(gl.float32), 0.)
    _store_state(S, Z, slot, s0, z0, ROWMAP, W, 0)
    _store_state(S, Z, slot, s1, z1, ROWMAP, W, 1)
    _store_state(S, Z, slot, s2, z2, ROWMAP, W, 2)


# ----------------------------------------------------------------------------- feature stages
# A chunk is a pipeline of stages, each a [64, 32] feature tile: key stages 0..5 build W^2 g(k)^T of (part,
# token half) = divmod(j, 2) and add it to the state; query stages 6..10 build g(q) of (part, row half) =
# divmod(j - 6, 2) and read the state out (part 2's rows 32..63 have no features: no stage). At the stages in
# _LOOKAHEAD the forward issues the next stage's feature MMAs before it waits for its own, so the tensor cores
# build the next tile while the warps multiply this one. Only there (each point compiled and timed, triton 3.6
# on an H100; docs/PERFORMANCE.md): lookahead at key stages 0..3 or in the reduction makes ptxas serialise all
# wgmmas (C7512, "insufficient register resources"), and at the other stages it spilled more and was slower.
# Feature MMAs start from a zero tile with use_acc=False, which compiles
# to a wgmma without input registers. (Passing the registers of a dead feature tile instead gave wrong z and
# normaliser sums: ptxas let the fp32 sums read registers that the next feature wgmma was already writing.)
_KEY_STAGES = gl.constexpr(6)
_STAGES = gl.constexpr(11)
_LOOKAHEAD = (5, 7)


@gluon.constexpr_function
def _part(j):
    """Feature part of stage j."""
    return (j if j < _KEY_STAGES.value else j - _KEY_STAGES.value) // 2


@gluon.constexpr_function
def _feature_groups(j):
    """wgmma groups that build stage j's factors: two, and two more for c_A and c_B in part 2."""
    return 4 if _part(j) == 2 else 2


@gluon.constexpr_function
def _looks_ahead(j, last):
    """Whether stage j of a pipeline of `last` stages issues stage j + 1's factors before waiting for its own."""
    return last == _STAGES.value and j in _LOOKAHEAD


@gluon.jit
def _half(smem, h: gl.constexpr):
    """Rows [32 h, 32 h + 32) of a [64, *] shared tile."""
    return smem.slice(h * 32, 32)


@gluon.jit
def _issue_features(q, k, sel, ones, j: gl.constexpr):
    """Issue stage j's feature factors x E_A (+ c_A) and x E_B (+ c_B) (asynchronous, not waited for); the key
    side works on k^T (E^T k^T), so that the tile is an A operand with the feature rows as M."""
    zero = gl.zeros([64, 32], gl.float32, MMA32)
    p: gl.constexpr = _part(j)
    WITH_C: gl.constexpr = p == 2
    if j < _KEY_STAGES:
        x = _half(k, j % 2).permute((1, 0))
        c_in = _half(ones, j % 2).permute((1, 0))
        xa = warpgroup_mma(sel.index(_SEL_K_A + p), x, zero, use_acc=False, is_async=True)
        if WITH_C:
            xa = warpgroup_mma(sel.index(_SEL_K_CA), c_in, xa, is_async=True)
        xb = warpgroup_mma(sel.index(_SEL_B + 2 * p), x, zero, use_acc=False, is_async=True)
        if WITH_C:
            xb = warpgroup_mma(sel.index(_SEL_CB), c_in, xb, is_async=True)
    else:
        h: gl.constexpr = (j - _KEY_STAGES) % 2
        xa = warpgroup_mma(q, _half(sel.index(_SEL_Q_A + 2 * p), h).permute((1, 0)), zero, use_acc=False,
                           is_async=True)
        if WITH_C:
            xa = warpgroup_mma(ones, _half(sel.index(_SEL_CA), h).permute((1, 0)), xa, is_async=True)
        xb = warpgroup_mma(q, _half(sel.index(_SEL_B + 2 * p), h).permute((1, 0)), zero, use_acc=False,
                           is_async=True)
        if WITH_C:
            xb = warpgroup_mma(ones, _half(sel.index(_SEL_CB), h).permute((1, 0)), xb, is_async=True)
    return xa, xb


@gluon.jit
def _stage_output(xa, xb, j: gl.constexpr, v, s_smem, z_smem, zc, t0, t1, t2, z0, z1, z2, y, den,
                  AOP: gl.constexpr):
    """Stage j on its waited factors: g = x_A x_B; key side: issue S_p += W^2 g(k)^T v and add the row sums to
    z_p; query side: issue y += g(q) S_p and add g(q) z_p to den (S and z from before the chunk, in shared
    memory: S in bf16, z in fp32 at zc + p)."""
    g = xa * xb
    fa = gl.convert_layout(g.to(v.dtype), AOP)
    p: gl.constexpr = _part(j)
    if j < _KEY_STAGES:
        vh = _half(v, j % 2)
        if p == 0:
            t0 = warpgroup_mma(fa, vh, t0, is_async=True)
            z0 += gl.sum(g, axis=1)
        elif p == 1:
            t1 = warpgroup_mma(fa, vh, t1, is_async=True)
            z1 += gl.sum(g, axis=1)
        else:
            t2 = warpgroup_mma(fa, vh, t2, is_async=True)
            z2 += gl.sum(g, axis=1)
    else:
        h: gl.constexpr = (j - _KEY_STAGES) % 2
        y = warpgroup_mma(fa, _half(s_smem.index(p), h), y, is_async=True)
        den += gl.sum(g * z_smem.index(zc + p).slice(h * 32, 32).load(FCOL)[None, :], axis=1)
    return t0, t1, t2, z0, z1, z2, y, den


@gluon.jit
def _run_stages(xa, xb, q, k, v, sel, ones, s_smem, z_smem, zc, t0, t1, t2, z0, z1, z2, y, den,
                LAST: gl.constexpr, AOP: gl.constexpr):
    """Stages 0..LAST - 1 of a chunk from stage 0's issued factors (xa, xb). Returns the state (S issued), z,
    y (issued) and den."""
    for j in gl.static_range(LAST):
        if j > 0 and not _looks_ahead(j - 1, LAST):
            xa, xb = _issue_features(q, k, sel, ones, j)
        if _looks_ahead(j, LAST):
            na, nb = _issue_features(q, k, sel, ones, j + 1)
            xa, xb = warpgroup_mma_wait(_feature_groups(j + 1), deps=(xa, xb))  # stage j + 1's stay pending
        else:
            xa, xb = warpgroup_mma_wait(0, deps=(xa, xb))
        t0, t1, t2, z0, z1, z2, y, den = _stage_output(xa, xb, j, v, s_smem, z_smem, zc, t0, t1, t2, z0, z1,
                                                       z2, y, den, AOP)
        if _looks_ahead(j, LAST):
            xa, xb = na, nb
    return t0, t1, t2, z0, z1, z2, y, den


# ----------------------------------------------------------------------------- reduction
@gluon.jit
def _reduce_kernel(K, V, SEL, W, ROWMAP, PS, PZ, M, TOK, C: gl.constexpr, num_warps: gl.constexpr):
    """Packed state sum of tokens [sp * TOK, (sp + 1) * TOK) of head bh into slot sp * BH + bh."""
    bh = gl.program_id(0)
    sp = gl.program_id(1)
    BH = gl.num_programs(0)
    F: gl.constexpr = _F
    DV: gl.constexpr = _DV
    DT: gl.constexpr = K.dtype.element_ty
    sel, ones = _constant_smem(SEL, DT, BLK_F)
    k_buf = _smem(DT, [2, C, F])
    v_buf = _smem(DT, [2, C, DV])
    s0 = warpgroup_mma_init(gl.zeros([64, DV], gl.float32, MMA))
    s1 = warpgroup_mma_init(gl.zeros([64, DV], gl.float32, MMA))
    s2 = warpgroup_mma_init(gl.zeros([64, DV], gl.float32, MMA))
    z0 = gl.zeros([64], gl.float32, FROW)
    z1 = gl.zeros([64], gl.float32, FROW)
    z2 = gl.zeros([64], gl.float32, FROW)
    start = sp * TOK
    end = gl.minimum(start + TOK, M)
    K = K + bh * M * F
    V = V + bh * M * DV
    _copy_rows(k_buf.index(0), K, start, end, F, C, BLK_F)
    _copy_rows(v_buf.index(0), V, start, end, DV, C, BLK_V)
    async_copy.commit_group()
    for c0 in range(start, end, C):
        i = (c0 - start) // C
        async_copy.wait_group(0)
        t0, t1, t2 = warpgroup_mma_wait(0, deps=(s0, s1, s2))
        fence_async_shared()
        gl.thread_barrier()
        _copy_rows(k_buf.index((i + 1) % 2), K, c0 + C, end, F, C, BLK_F)
        _copy_rows(v_buf.index((i + 1) % 2), V, c0 + C, end, DV, C, BLK_V)
        async_copy.commit_group()
        k = k_buf.index(i % 2)
        xa, xb = _issue_features(k, k, sel, ones, 0)
        # key stages only: the query, readout and y arguments are placeholders
        s0, s1, s2, z0, z1, z2, _, _ = _run_stages(xa, xb, k, k, v_buf.index(i % 2), sel, ones, k, k, 0, t0, t1,
                                                   t2, z0, z1, z2, z0, z0, _KEY_STAGES, AOP)
    async_copy.wait_group(0)
    s0, s1, s2 = warpgroup_mma_wait(0, deps=(s0, s1, s2))
    _store_parts(PS, PZ, sp * BH + bh, s0, s1, s2, z0, z1, z2, gl.cdiv(end - start, C) * C - (end - start),
                 ROWMAP, W)


# ----------------------------------------------------------------------------- forward scan
@gluon.jit
def _fwd_kernel(Q, K, V, S_INIT, Z_INIT, Y, DEN, S_OUT, Z_OUT, SEL, W, ROWMAP, N, TOK, eps,
                C: gl.constexpr, STORE_DEN: gl.constexpr, STORE_STATE: gl.constexpr, num_warps: gl.constexpr):
    """Chunked causal forward over split sp (tokens [sp * TOK, (sp + 1) * TOK)) of head bh from its initial
    state (packed slot sp * BH + bh). Per chunk: the state goes to shared memory for the readout, the
    intra-chunk attention is issued, then the stages (state update, readout). The next chunk's inputs arrive
    by cp.async meanwhile. The last split stores the final state (prefill)."""
    bh = gl.program_id(0)
    sp = gl.program_id(1)
    BH = gl.num_programs(0)
    F: gl.constexpr = _F
    DV: gl.constexpr = _DV
    DT: gl.constexpr = Q.dtype.element_ty
    sel, ones = _constant_smem(SEL, DT, BLK_F)
    q_buf = _smem(DT, [2, C, F])
    k_buf = _smem(DT, [2, C, F])
    v_buf = _smem(DT, [2, C, DV])
    s_smem = _smem(DT, [3, 64, DV])
    # z at 4 (i % 2) + p: by chunk parity, as a warp may still read the last chunk's z while another stores
    z_smem = gl.allocate_shared_memory(gl.float32, [8, 64], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    slot = sp * BH + bh
    s0, z0 = _load_state(S_INIT, Z_INIT, slot, ROWMAP, W, 0)
    s1, z1 = _load_state(S_INIT, Z_INIT, slot, ROWMAP, W, 1)
    s2, z2 = _load_state(S_INIT, Z_INIT, slot, ROWMAP, W, 2)
    start = sp * TOK
    end = gl.minimum(start + TOK, N)
    Q = Q + bh * N * F
    K = K + bh * N * F
    V = V + bh * N * DV
    _copy_rows(q_buf.index(0), Q, start, end, F, C, BLK_F)
    _copy_rows(k_buf.index(0), K, start, end, F, C, BLK_F)
    _copy_rows(v_buf.index(0), V, start, end, DV, C, BLK_V)
    async_copy.commit_group()
    tok_r = gl.arange(0, C, layout=ROW)
    tok_c = gl.arange(0, C, layout=COL)
    for c0 in range(start, end, C):
        i = (c0 - start) // C
        async_copy.wait_group(0)
        t0, t1, t2 = warpgroup_mma_wait(0, deps=(s0, s1, s2))
        s_smem.index(0).store(t0.to(DT))
        s_smem.index(1).store(t1.to(DT))
        s_smem.index(2).store(t2.to(DT))
        zc = (i % 2) * 4
        z_smem.index(zc).store(z0)
        z_smem.index(zc + 1).store(z1)
        z_smem.index(zc + 2).store(z2)
        fence_async_shared()
        gl.thread_barrier()
        nxt = (i + 1) % 2
        _copy_rows(q_buf.index(nxt), Q, c0 + C, end, F, C, BLK_F)
        _copy_rows(k_buf.index(nxt), K, c0 + C, end, F, C, BLK_F)
        _copy_rows(v_buf.index(nxt), V, c0 + C, end, DV, C, BLK_V)
        async_copy.commit_group()
        q = q_buf.index(i % 2)
        k = k_buf.index(i % 2)
        v = v_buf.index(i % 2)
        # within the chunk: phi(q).phi(k) = 1 + s + s^2/2, causal (padded keys come after every valid query)
        a = warpgroup_mma(q, k.permute((1, 0)), gl.zeros([C, C], gl.float32, MMA), use_acc=False, is_async=True)
        xa, xb = _issue_features(q, k, sel, ones, 0)
        a = warpgroup_mma_wait(_feature_groups(0), deps=(a,))  # stage 0's factors stay pending
        p = gl.where(tok_r[:, None] >= tok_c[None, :], 1.0 + a * (0.25 + a * 0.03125), 0.0)  # s = a / 4
        y = warpgroup_mma(gl.convert_layout(p.to(DT), AOP), v, gl.zeros([C, DV], gl.float32, MMA), use_acc=False,
                          is_async=True)
        den_intra = gl.sum(p, axis=1)  # from p in fp32, before the bf16 rounding of the MMA operand
        den = gl.zeros([64], gl.float32, FROW)
        s0, s1, s2, z0, z1, z2, y, den = _run_stages(xa, xb, q, k, v, sel, ones, s_smem, z_smem, zc, t0, t1, t2,
                                                     z0, z1, z2, y, den, _STAGES, AOP)
        y = warpgroup_mma_wait(0, deps=(y,))
        den = gl.convert_layout(den, ROW) + den_intra + eps
        rows = c0 + tok_r
        gl.store(Y + (bh * N + rows[:, None]) * DV + gl.arange(0, DV, layout=COL)[None, :],
                 (y * (1.0 / den)[:, None]).to(DT), mask=(rows < end)[:, None])
        if STORE_DEN:
            gl.store(DEN + bh * N + rows, den, mask=rows < end)
    async_copy.wait_group(0)
    s0, s1, s2 = warpgroup_mma_wait(0, deps=(s0, s1, s2))
    if STORE_STATE:
        if sp == gl.num_programs(1) - 1:
            _store_parts(S_OUT, Z_OUT, bh, s0, s1, s2, z0, z1, z2, gl.cdiv(end - start, C) * C - (end - start),
                         ROWMAP, W)


# ----------------------------------------------------------------------------- launchers
def reduce_states(k: torch.Tensor, v: torch.Tensor, tok: int, nsplit: int):
    """Per-split packed sums of (k, v) [B, H, M, *] (split j: tokens [j * tok, (j + 1) * tok)):
    S [nsplit, BH, 161, 64], z [nsplit, BH, 161]."""
    B, H, M, _ = k.shape
    BH = B * H
    PS = torch.empty(nsplit, BH, T.D_PACKED, DV_GLUON, device=k.device, dtype=torch.float32)
    PZ = torch.empty(nsplit, BH, T.D_PACKED, device=k.device, dtype=torch.float32)
    _reduce_kernel[(BH, nsplit)](k, v, *_tables(k.dtype, k.device), PS, PZ, M, tok, C=CHUNK, num_warps=4)
    return PS, PZ


def forward_scan(q, k, v, S_init, Z_init, y, den, S_out, Z_out, tok: int, nsplit: int, eps: float,
                 store_den: bool, store_state: bool) -> None:
    """_fwd_kernel over B*H heads and nsplit sequence splits of tok tokens (initial states: packed slots)."""
    B, H, N, _ = q.shape
    _fwd_kernel[(B * H, nsplit)](q, k, v, S_init, Z_init, y, den, S_out, Z_out, *_tables(q.dtype, q.device),
                                 N, tok, eps, C=CHUNK, STORE_DEN=store_den, STORE_STATE=store_state, num_warps=4)
