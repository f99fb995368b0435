"""Triton PLA kernels against the fp64 reference.

GPU tests (marked gpu, skipped on CPU): forward, every gradient, prefill state and 1000
decode steps over a grid of shapes. One CPU test runs the same kernels at a tiny shape
under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess since the flag is read
when the kernels are defined).

Tolerances are on ||out - ref|| / ||ref|| (fp64 reference on upcast inputs):
bf16 inputs 2e-2 (bf16 operands in every matmul, fp32 accumulation and state),
fp32 inputs 1e-5 (IEEE fp32 matmuls).
"""

import pytest
import torch

from kernels.pla.reference import PLAState, pla_decode_step, pla_prefill_reference, pla_reference
from tests.fakes import run_under_interpreter

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(B, H, N, M, dv, dtype, device, f=16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return r(B, H, N, f), r(B, H, N, f), r(B, H, N, dv), r(B, H, M, f), r(B, H, M, dv)


def check_all(T, B, H, N, M, dv, dtype, device, tol, seed=0):
    """Forward, gradients and prefill state of the Triton path vs the fp64 reference."""
    ins = make(B, H, N, M, dv, dtype, device, seed=seed)
    ins_t = [x.clone().requires_grad_() for x in ins]
    ins_r = [x.double().clone().requires_grad_() for x in ins]
    y = T.pla_triton(*ins_t)
    yr = pla_reference(*ins_r)
    assert y.dtype == dtype and torch.isfinite(y).all()
    errs = {"y": rel(y, yr)}
    g = torch.randn(B, H, N, dv, device=device, dtype=torch.float64)
    (y.double() * g).sum().backward()
    (yr * g).sum().backward()
    for name, a, b in zip(["dq", "dk", "dv", "dk_enc", "dv_enc"], ins_t, ins_r):
        errs[name] = rel(a.grad, b.grad)
    with torch.no_grad():
        yp, st = T.pla_prefill_triton(*ins)
        _, str_ = pla_prefill_reference(*[x.double() for x in ins])
    errs["y_prefill"] = rel(yp, yr)
    errs["S"] = rel(st.S, str_.S)
    errs["z"] = rel(st.z, str_.z)
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, f"B{B} H{H} N{N} M{M} dv{dv} {dtype}: {errs}"
    return errs


SHAPES = [  # B, H, N, M, dv: N < M, N = M, N > M, N not a multiple of the chunk, batch 1 and many
    (2, 3, 100, 160, 64),
    (1, 16, 256, 256, 112),
    (4, 4, 1000, 500, 64),
    (8, 1, 2048, 1024, 112),
    (3, 2, 77, 13, 112),
    (16, 16, 512, 256, 64),
    (1, 5, 1, 1, 64),
]


CASES = [s + (torch.bfloat16,) for s in SHAPES] + [s + (torch.float32,) for s in SHAPES[:2]]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,M,dv,dtype", CASES)
def test_triton_matches_reference(B, H, N, M, dv, dtype):
    from kernels.pla import triton_pla as T
    errs = check_all(T, B, H, N, M, dv, dtype, "cuda", TOL[dtype], seed=N + dv)
    print(f"B{B} H{H} N{N} M{M} dv{dv} {str(dtype)[6:]}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


# forced sequence splits (tokens per split, rounded up to the chunk): split boundaries inside and at
# the end of the encoder region, a partial last split, many splits per head
SPLIT_CASES = [
    (2, 3, 1000, 300, 64, torch.bfloat16, 96),
    (1, 4, 777, 1024, 112, torch.bfloat16, 200),
    (3, 16, 640, 640, 64, torch.bfloat16, 64),
    (1, 2, 333, 100, 112, torch.float32, 64),
    (2, 1, 129, 129, 64, torch.float32, 1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,N,M,dv,dtype,tok", SPLIT_CASES)
def test_triton_split_paths(B, H, N, M, dv, dtype, tok):
    from kernels.pla import triton_pla as T
    T._FORCE_SPLIT_TOK = tok
    try:
        errs = check_all(T, B, H, N, M, dv, dtype, "cuda", TOL[dtype], seed=N + dv + tok)
    finally:
        T._FORCE_SPLIT_TOK = None
    print(f"split{tok} B{B} H{H} N{N} M{M} dv{dv} {str(dtype)[6:]}: " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda():
    import kernels.pla as pla
    assert pla.triton_available()
    ins = make(2, 2, 300, 150, 64, torch.bfloat16, "cuda")
    y = pla.prefix_linear_attention(*ins)
    assert rel(y, pla_reference(*[x.double() for x in ins])) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dv", [64, 112])
def test_decode_1000_steps_track_reference(dv):
    """Prefill on GPU, then 1000 Triton decode steps vs 1000 fp64 reference steps."""
    from kernels.pla import triton_pla as T
    B, H, N, M = 4, 16, 300, 150
    ins = make(B, H, N, M, dv, torch.bfloat16, "cuda", seed=1)
    _, st = T.pla_prefill_triton(*ins)
    st_ref = PLAState(st.S.double().clone(), st.z.double().clone())
    y = torch.empty(B, H, dv, device="cuda", dtype=torch.bfloat16)
    errs = []
    qs, ks = (torch.randn(1000, B, H, 16, device="cuda").bfloat16() for _ in range(2))
    vs = torch.randn(1000, B, H, dv, device="cuda").bfloat16()
    for i in range(1000):
        T.pla_decode_step_triton(qs[i], ks[i], vs[i], st, out=y)
        yr = pla_decode_step(qs[i].double(), ks[i].double(), vs[i].double(), st_ref)
        errs.append((y.double() - yr).norm() / yr.norm())
    worst = torch.stack(errs).max().item()
    assert worst < 1e-2, worst  # bf16 output rounding
    assert rel(st.S, st_ref.S) < 1e-5 and rel(st.z, st_ref.z) < 1e-5
    print(f"decode dv{dv}: worst step rel err {worst:.1e}, state rel err {rel(st.S, st_ref.S):.1e}")


_INTERPRET_SNIPPET = r"""
import torch
from tests.test_pla_triton import check_all
from kernels.pla import triton_pla as T
from kernels.pla.reference import PLAState, pla_decode_step
for shape in [(1, 2, 37, 21, 40), (2, 1, 16, 30, 16)]:
    print(check_all(T, *shape, torch.float32, "cpu", 1e-5))
T._FORCE_SPLIT_TOK = 16  # sequence-split paths: 37 tokens -> 3 splits of one chunk, last one partial
print(check_all(T, 1, 2, 37, 21, 40, torch.float32, "cpu", 1e-5))
T._FORCE_SPLIT_TOK = None
for kind, bv in (("fwd", 16), ("dq", 16), ("dkv", 32), ("enc", 16)):  # several dv blocks per kernel
    T._CFG[(kind, 40)] = dict(C=16, BV=bv, num_warps=4, num_stages=1, waves=1)
print(check_all(T, 1, 2, 37, 21, 40, torch.float32, "cpu", 1e-5))
q, k, v = torch.randn(2, 3, 16), torch.randn(2, 3, 16), torch.randn(2, 3, 24)
S, z = torch.randn(2, 3, 273, 24), torch.rand(2, 3, 273) + 10
a, b = PLAState(S.clone(), z.clone()), PLAState(S.clone(), z.clone())
ya, yb = T.pla_decode_step_triton(q, k, v, a), pla_decode_step(q, k, v, b)
torch.testing.assert_close(ya, yb); torch.testing.assert_close(a.S, b.S); torch.testing.assert_close(a.z, b.z)
# strided views of one packed projection, as the PLA mixer passes them: the forward saves its
# contiguous copies (the backward copies nothing again) and the packed gradient is the reference's
from kernels.pla.reference import pla_reference
packed = torch.randn(37, 1, 2, 16 + 16 + 40)
enc = [torch.randn(1, 2, 21, 16), torch.randn(1, 2, 21, 40)]
grads = []
for pla in (T.pla_triton, pla_reference):
    x = packed.clone().requires_grad_()
    y = pla(*(t.permute(1, 2, 0, 3) for t in x.split([16, 16, 40], -1)), *enc)
    if pla is T.pla_triton:
        assert all(t.is_contiguous() for t in y.grad_fn.saved_tensors[:5])
    y.sum().backward()
    grads.append(x.grad)
torch.testing.assert_close(*grads, rtol=1e-4, atol=1e-4)
print("INTERPRET OK")
"""


def test_triton_kernels_under_interpreter():
    """The same kernels on CPU via TRITON_INTERPRET=1 (chunk 16, fp32, tiny shapes; ~15 s)."""
    r = run_under_interpreter(_INTERPRET_SNIPPET)
    assert r.returncode == 0 and "INTERPRET OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
