"""BaseConv's gated causal conv: the reference against its conv1d form (the mixer's former
path), the fused Triton kernel against the reference (forward, du, dw), and the dispatcher.

CPU: the reference vs the conv1d form in fp64; the Triton kernels under the interpreter
(TRITON_INTERPRET=1, in a subprocess since the flag is read when the kernels are defined) at
small shapes. GPU tests (marked gpu): realistic shapes in bf16 and fp32.

Tolerances are on ||out - ref|| / ||ref|| (fp64 reference on the same, upcast inputs): bf16
1e-2 (one bf16 rounding of y and du; dy is rounded to bf16 too), fp32 1e-5.
"""
import warnings

import pytest
import torch

import kernels.baseconv as bc
from kernels.baseconv import conv_tail, gated_causal_conv, gated_causal_conv_reference
from kernels.baseconv.reference import gated_causal_conv_conv1d
from tests.fakes import OnCuda, fallback_warnings, kernel_state_fixture, run_under_interpreter

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(s, b, c, k, dtype, device, tail=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(s, b, 2 * c, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(c, 1, k, generator=g) * 0.5).to(device=device, dtype=dtype)
    t = torch.randn(b, c, k - 1, generator=g).to(device=device, dtype=dtype) if tail else None
    return u, w, t


def check_kernel(T, s, b, c, k, dtype, device, tol, tail=False, seed=0, u_view=False):
    """Forward, du and dw of T.gated_causal_conv_triton vs the fp64 reference."""
    u, w, t = make(s, b, c, k, dtype, device, tail, seed)
    if u_view:  # in_proj's output as a strided view: every other sequence of a bigger batch
        u = torch.cat([u, u], dim=1)[:, ::2]
    ut, wt = u.detach().requires_grad_(), w.detach().requires_grad_()
    ur, wr = u.double().requires_grad_(), w.double().requires_grad_()
    y = T.gated_causal_conv_triton(ut, wt, t)
    yr = gated_causal_conv_reference(ur, wr, None if t is None else t.double())
    assert y.dtype == dtype and y.shape == (s, b, c)
    dy = torch.randn(s, b, c, generator=torch.Generator().manual_seed(seed + 1)).to(
        device=device, dtype=dtype)
    y.backward(dy)
    yr.backward(dy.double())
    errs = {"y": rel(y, yr), "du": rel(ut.grad, ur.grad), "dw": rel(wt.grad, wr.grad)}
    assert ut.grad.dtype == dtype and wt.grad.dtype == dtype and wt.grad.shape == w.shape
    bad = {key: e for key, e in errs.items() if not e < tol}
    assert not bad, f"s{s} b{b} c{c} k{k} {dtype} tail={tail}: {errs}"
    return errs


# ---- the reference and its conv1d form --------------------------------------------------------

@pytest.mark.parametrize("s, b, c, k, tail", [
    (1, 2, 3, 3, False), (2, 1, 5, 3, True), (17, 3, 8, 3, False), (17, 3, 8, 3, True),
    (9, 2, 4, 1, False), (9, 2, 4, 4, True),
])
def test_reference_equals_the_conv1d_form(s, b, c, k, tail):
    u, w, t = make(s, b, c, k, torch.float64, "cpu", tail, seed=s * 10 + k)
    u, w = u.requires_grad_(), w.requires_grad_()
    y_old = gated_causal_conv_conv1d(u, w, t)
    y = gated_causal_conv_reference(u, w, t)
    torch.testing.assert_close(y, y_old, rtol=1e-12, atol=1e-12)
    x = torch.cat([torch.zeros(b, c, k - 1, dtype=u.dtype) if t is None else t,
                   u[..., :c].permute(1, 2, 0)], dim=-1)  # the former [b, c, k-1+s] conv input
    torch.testing.assert_close(conv_tail(u, k, t), x[:, :, x.shape[-1] - (k - 1):], rtol=0, atol=0)
    dy = torch.randn_like(y)
    grads_old = torch.autograd.grad(y_old, (u, w), dy)
    grads = torch.autograd.grad(y, (u, w), dy)
    for new, old in zip(grads, grads_old):
        torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12)


def test_conv_tail_is_a_small_fresh_tensor():
    u, _, t = make(5, 2, 4, 3, torch.float32, "cpu", tail=True)
    tail = conv_tail(u, 3, t)
    assert tail.shape == (2, 4, 2) and tail.is_contiguous()
    assert tail.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()
    torch.testing.assert_close(tail, u[-2:, :, :4].permute(1, 2, 0))


def test_decoding_token_by_token_equals_the_sequence():
    """prefill + steps (the tail carried through conv_tail) reproduce the full forward."""
    u, w, _ = make(12, 2, 6, 3, torch.float64, "cpu")
    full = gated_causal_conv(u, w)
    pieces, tail = [gated_causal_conv(u[:5], w)], conv_tail(u[:5], 3)
    for i in range(5, 12):
        pieces.append(gated_causal_conv(u[i:i + 1], w, tail))
        tail = conv_tail(u[i:i + 1], 3, tail)
    torch.testing.assert_close(torch.cat(pieces), full, rtol=1e-12, atol=1e-12)


# ---- the dispatcher ---------------------------------------------------------------------------

kernel_state = kernel_state_fixture(bc)


def _warnings_of(calls):
    return fallback_warnings(calls, "BaseConv")


def test_cpu_takes_the_reference_silently(kernel_state):
    kernel_state(None, ImportError("no triton"))
    u, w, t = make(6, 2, 4, 3, torch.float32, "cpu", tail=True)
    (y,), messages = _warnings_of([lambda: gated_causal_conv(u, w, t)])
    assert messages == []
    torch.testing.assert_close(y, gated_causal_conv_reference(u, w, t), rtol=0, atol=0)


def test_cuda_fallbacks_warn_once_per_reason(kernel_state):
    u, w, t = make(6, 2, 4, 3, torch.float32, "cpu", tail=True)
    cuda_u = u.as_subclass(OnCuda)
    kernel_state(None, ImportError("libcuda.so.1: cannot open shared object file"))
    _, messages = _warnings_of([lambda: gated_causal_conv(cuda_u, w)] * 3)
    assert len(messages) == 1 and "ImportError: libcuda.so.1" in messages[0]

    calls = []

    class FakeKernels:
        supports = staticmethod(lambda u, w: u.dtype != torch.float64)

        @staticmethod
        def gated_causal_conv_triton(u, w, tail=None):
            calls.append(tail)
            return gated_causal_conv_reference(u, w, tail)

    kernel_state(FakeKernels, None)
    grad_tail = t.clone().requires_grad_()
    _, messages = _warnings_of([
        lambda: gated_causal_conv(cuda_u, w, t),  # the kernel, with a constant tail
        lambda: gated_causal_conv(cuda_u.double(), w.double()),  # unsupported: reference
        lambda: gated_causal_conv(cuda_u, w, grad_tail),  # tail needs a gradient: reference
        lambda: gated_causal_conv(cuda_u, w, grad_tail),
    ])
    assert len(calls) == 1 and calls[0] is t
    assert len(messages) == 2, messages
    assert "does not support" in messages[0] and "tail" in messages[1]


# ---- the Triton kernels under the interpreter ---------------------------------------------------

_INTERPRET_SNIPPET = r"""
import torch
from tests.test_baseconv_kernel import check_kernel
from kernels.baseconv import triton_baseconv as T
print(check_kernel(T, 70, 2, 130, 3, torch.float32, "cpu", 1e-5))  # the default blocks
T._CFG.update(fwd=(16, 32, 4), bwd=(8, 32, 4, 2), bwd_du1=(8, 16, 4))  # several blocks, tiles
cases = [  # s, b, c, k, tail: odd lengths, one token, TP-local widths (c % block != 0)
    (37, 3, 40, 3, False), (37, 3, 40, 3, True), (1, 2, 24, 3, True), (2, 1, 24, 3, False),
    (20, 2, 33, 4, True), (9, 2, 8, 1, False), (16, 1, 64, 3, False),
]
for s, b, c, k, tail in cases:
    print(check_kernel(T, s, b, c, k, torch.float32, "cpu", 1e-5, tail=tail, seed=s + c))
print(check_kernel(T, 13, 3, 20, 3, torch.float32, "cpu", 1e-5, u_view=True))
print(check_kernel(T, 25, 2, 40, 3, torch.bfloat16, "cpu", 1e-2, tail=True))
print("INTERPRET OK")
"""


def test_triton_kernels_under_interpreter():
    """The fused kernels on CPU via TRITON_INTERPRET=1 (fp32 and bf16, tiny shapes; ~10 s)."""
    r = run_under_interpreter(_INTERPRET_SNIPPET)
    assert r.returncode == 0 and "INTERPRET OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---- GPU ----------------------------------------------------------------------------------------

GPU_CASES = [  # s, b, c, k, tail: jrt-360m (c = 2048) and jrt-1.3b (4096) widths, TP-local, 8k/32k
    (2048, 8, 2048, 3, False), (2048, 4, 4096, 3, False), (2048, 8, 1024, 3, False),
    (8192, 2, 2048, 3, False), (32768, 1, 2048, 3, False), (1000, 3, 1000, 3, False),
    (1, 8, 2048, 3, True), (77, 5, 512, 4, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("s, b, c, k, tail", GPU_CASES)
def test_triton_matches_reference_on_gpu(s, b, c, k, tail, dtype):
    from kernels.baseconv import triton_baseconv as T
    errs = check_kernel(T, s, b, c, k, dtype, "cuda", TOL[dtype], tail=tail, seed=s + c)
    print(f"s{s} b{b} c{c} k{k} {str(dtype)[6:]}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda_and_matches_the_former_path():
    """bf16 as in training: the fused path is at least as close to fp64 as the former one."""
    assert bc.triton_available()
    u, w, _ = make(2048, 8, 2048, 3, torch.bfloat16, "cuda", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        y = gated_causal_conv(u, w)
    exact = gated_causal_conv_reference(u.double(), w.double())
    err, err_old = rel(y, exact), rel(gated_causal_conv_conv1d(u, w), exact)
    assert err < TOL[torch.bfloat16] and err <= err_old * 1.1, (err, err_old)
