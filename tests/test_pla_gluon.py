"""Hopper Gluon PLA kernels (kernels/pla/gluon_pla.py).

CPU: the tables the kernels are built from reproduce the Taylor kernel and triton_pla's packed state.
GPU (marked gpu; the kernels need an H100): the Gluon forward and reduction against the Triton kernels
(y, normaliser, encoder and final states, with sequence splits) and the fp64 reference. The gradient and
decode tests of test_pla_triton.py run through the Gluon forward as well (bf16, dv 64 on an H100).
"""
import pytest
import torch

from kernels.pla import triton_pla as T
from kernels.pla.gluon_pla import _CONST_ROW, part_tables
from kernels.pla.reference import pla_prefill_reference
from tests.test_pla_triton import TOL, check_all, make, rel


def _gluon_features(x, SEL, side):
    """Features of the rows of x [n, f] per part [3, n, 64] as the kernels build them (fp64): query side g(x),
    key side W^2 g(x)."""
    x = x.double()
    SEL = SEL.double()
    feats = []
    for p in range(3):
        xa = x @ SEL[2 * p if side == "q" else 6 + p].T
        xb = x @ SEL[1 + 2 * p].T
        if p == 2:
            xa = xa + SEL[9 if side == "q" else 11, :, 0]
            xb = xb + SEL[10, :, 0]
        feats.append(xa * xb)
    return torch.stack(feats)


def test_part_tables_give_the_taylor_kernel_and_the_packed_state():
    SEL, W, ROWMAP = part_tables()
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g)
    gq, gk = _gluon_features(q, SEL, "q"), _gluon_features(k, SEL, "k")
    s = (q.double() @ k.double().T) / 4
    torch.testing.assert_close(torch.einsum("pir,pjr->ij", gq, gk), 1 + s + s * s / 2, rtol=1e-12, atol=1e-12)
    assert not gq[2, :, 32:].any() and not gk[2, :, 32:].any()  # the readout skips part 2's rows 32..63
    # key features / W at their packed rows == triton_pla's packed features phi(k) (padding rows zero)
    ea, eb, w = (t.double() for t in T._selection(torch.float32, "cpu"))
    kd = k.double()
    packed = torch.cat([torch.ones(7, 1, dtype=torch.float64), kd / 2, (kd @ ea) * (kd @ eb) * w], 1)
    mapped = torch.zeros(7, T.D_PACKED, dtype=torch.float64)
    rows = ROWMAP >= 0
    mapped[:, ROWMAP[rows].long()] = (gk / W.double()[:, None, :]).permute(1, 0, 2)[:, rows]
    torch.testing.assert_close(mapped, packed, rtol=1e-6, atol=1e-6)  # fp32 row weights
    assert ROWMAP[rows].unique().numel() == T.D_PACKED  # every packed row written once
    assert ROWMAP[2, _CONST_ROW.value] == 0 and torch.all(W > 0)


def _gpu_hopper():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


GLUON_CASES = [  # B, H, N, M, forced split tokens: N < M, N = M, N > M, partial chunks, several splits
    (2, 3, 1000, 300, None), (1, 2, 77, 77, None), (1, 2, 100, 300, None), (1, 1, 1, 5, None),
    (2, 2, 1000, 700, 256), (3, 4, 640, 640, 64), (16, 16, 4096, 2048, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,M,tok", GLUON_CASES)
def test_gluon_forward_matches_triton_and_reference(B, H, N, M, tok):
    if not _gpu_hopper():
        pytest.skip("the Gluon kernels need an sm_90 GPU")
    ins = make(B, H, N, M, 64, torch.bfloat16, "cuda", seed=N + M)
    T._FORCE_SPLIT_TOK = tok
    try:
        assert T._gluon(ins[0], ins[2]) is not None
        out = T._forward(*ins, 1e-12, store_den=True, store_state=True)
        T._GLUON = False
        ref = T._forward(*ins, 1e-12, store_den=True, store_state=True)
    finally:
        T._GLUON, T._FORCE_SPLIT_TOK = True, None
    errs = {name: rel(a, b) for name, a, b in zip(("y", "den", "S_enc", "z_enc", "S", "z"), out, ref)}
    # bf16 rounding: y is stored in bf16; the readout uses the bf16 state in both kernels; z sums bf16 features
    assert errs["y"] < 5e-3 and max(v for k, v in errs.items() if k != "y") < 3e-3, errs
    if N <= 1000:
        y, st = T.pla_prefill_triton(*ins)
        y_ref, st_ref = pla_prefill_reference(*(x.double() for x in ins))
        errs.update(y_ref=rel(y, y_ref), S_ref=rel(st.S, st_ref.S), z_ref=rel(st.z, st_ref.z))
        assert max(errs["y_ref"], errs["S_ref"], errs["z_ref"]) < TOL[torch.bfloat16], errs
    print(f"gluon B{B} H{H} N{N} M{M} split{tok}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.gpu
def test_triton_path_still_matches_reference_where_gluon_would_run():
    """bf16 dv 64 on an H100 takes the Gluon forward; the Triton forward stays correct for other GPUs."""
    T._GLUON = False
    try:
        check_all(T, 2, 3, 1000, 300, 64, torch.bfloat16, "cuda", TOL[torch.bfloat16], seed=3)
    finally:
        T._GLUON = True
