"""BaseConv's gated causal conv: the reference against its conv1d form (the mixer's former
path), the fused Triton kernel against the reference (forward, du, dw, d(bias)), the dispatcher,
and the mixer with in_proj's bias folded into the gate.

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
from tests.multiproc import launch

TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(s, b, c, k, dtype, device, tail=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(s, b, 2 * c, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(c, 1, k, generator=g) * 0.5).to(device=device, dtype=dtype)
    t = torch.randn(b, c, k - 1, generator=g).to(device=device, dtype=dtype) if tail else None
    return u, w, t


def make_bias(c, dtype, device, seed=0):
    """in_proj's bias [2c], as large as u's entries (megatron starts it at zero)."""
    return torch.randn(2 * c, generator=torch.Generator().manual_seed(seed + 7)).to(
        device=device, dtype=dtype)


def check_kernel(T, s, b, c, k, dtype, device, tol, tail=False, seed=0, u_view=False,
                 bias=False):
    """Forward, du, dw (and d(bias)) of T.gated_causal_conv_triton vs the fp64 reference."""
    u, w, t = make(s, b, c, k, dtype, device, tail, seed)
    if u_view:  # in_proj's output as a strided view: every other sequence of a bigger batch
        u = torch.cat([u, u], dim=1)[:, ::2]
    inputs = (u, w, make_bias(c, dtype, device, seed)) if bias else (u, w)
    ins = [x.detach().requires_grad_() for x in inputs]
    refs = [x.double().requires_grad_() for x in inputs]
    y = T.gated_causal_conv_triton(ins[0], ins[1], t, *ins[2:])
    yr = gated_causal_conv_reference(refs[0], refs[1], None if t is None else t.double(), *refs[2:])
    assert y.dtype == dtype and y.shape == (s, b, c)
    dy = torch.randn(s, b, c, generator=torch.Generator().manual_seed(seed + 1)).to(
        device=device, dtype=dtype)
    y.backward(dy)
    yr.backward(dy.double())
    errs = {"y": rel(y, yr)}
    for name, x, xr in zip(("du", "dw", "db"), ins, refs):
        assert x.grad.dtype == dtype and x.grad.shape == x.shape
        errs[name] = rel(x.grad, xr.grad)
    bad = {key: e for key, e in errs.items() if not e < tol}
    assert not bad, f"s{s} b{b} c{c} k{k} {dtype} tail={tail} bias={bias}: {errs}"
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


@pytest.mark.parametrize("tail", [False, True])
def test_a_bias_is_the_reference_on_biased_u(tail):
    """bias [2c] is u + bias, in values and in the gradients of u, weight and bias; the tail
    holds biased u1 values, so conv_tail adds it too."""
    u, w, t = make(11, 2, 6, 3, torch.float64, "cpu", tail, seed=5)
    bias = make_bias(6, torch.float64, "cpu")
    u, w, bias = u.requires_grad_(), w.requires_grad_(), bias.requires_grad_()
    y = gated_causal_conv_reference(u, w, t, bias)
    y_biased_u = gated_causal_conv_reference(u + bias, w, t)
    torch.testing.assert_close(y, y_biased_u, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (u, w, bias), dy)
    grads_biased_u = torch.autograd.grad(y_biased_u, (u, w, bias), dy)
    for new, old in zip(grads, grads_biased_u):
        torch.testing.assert_close(new, old, rtol=1e-12, atol=1e-12)
    for n in (1, 2, 11):  # shorter than the tail, as long, longer
        torch.testing.assert_close(conv_tail(u[:n], 3, t, bias), conv_tail(u[:n] + bias, 3, t),
                                   rtol=0, atol=0)


def test_conv_tail_is_a_small_fresh_tensor():
    u, _, t = make(5, 2, 4, 3, torch.float32, "cpu", tail=True)
    tail = conv_tail(u, 3, t)
    assert tail.shape == (2, 4, 2) and tail.is_contiguous()
    assert tail.untyped_storage().data_ptr() != u.untyped_storage().data_ptr()
    torch.testing.assert_close(tail, u[-2:, :, :4].permute(1, 2, 0))


@pytest.mark.parametrize("with_bias", [False, True])
def test_decoding_token_by_token_equals_the_sequence(with_bias):
    """prefill + steps (the tail carried through conv_tail) reproduce the full forward."""
    u, w, _ = make(12, 2, 6, 3, torch.float64, "cpu")
    bias = make_bias(6, torch.float64, "cpu") if with_bias else None
    full = gated_causal_conv(u, w, bias=bias)
    pieces, tail = [gated_causal_conv(u[:5], w, bias=bias)], conv_tail(u[:5], 3, bias=bias)
    for i in range(5, 12):
        pieces.append(gated_causal_conv(u[i:i + 1], w, tail, bias))
        tail = conv_tail(u[i:i + 1], 3, tail, bias)
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
        supports = staticmethod(lambda u, w, bias=None: u.dtype != torch.float64)

        @staticmethod
        def gated_causal_conv_triton(u, w, tail=None, bias=None):
            calls.append((tail, bias))
            return gated_causal_conv_reference(u, w, tail, bias)

    kernel_state(FakeKernels, None)
    grad_tail = t.clone().requires_grad_()
    bias = make_bias(4, torch.float32, "cpu")
    _, messages = _warnings_of([
        lambda: gated_causal_conv(cuda_u, w, t, bias),  # the kernel, with a constant tail
        lambda: gated_causal_conv(cuda_u.double(), w.double()),  # unsupported: reference
        lambda: gated_causal_conv(cuda_u, w, grad_tail),  # tail needs a gradient: reference
        lambda: gated_causal_conv(cuda_u, w, grad_tail),
    ])
    assert len(calls) == 1 and calls[0][0] is t and calls[0][1] is bias
    assert len(messages) == 2, messages
    assert "does not support" in messages[0] and "tail" in messages[1]


# ---- the Triton kernels under the interpreter ---------------------------------------------------

_INTERPRET_SNIPPET = r"""
import torch
from tests.test_baseconv_kernel import check_kernel
from kernels.baseconv import triton_baseconv as T
# the default blocks, with in_proj's bias as in training
print(check_kernel(T, 70, 2, 130, 3, torch.float32, "cpu", 1e-5, bias=True))
T._CFG.update(fwd=(16, 32, 4), bwd=(8, 32, 4, 2), bwd_du1=(8, 16, 4))  # several blocks, tiles
cases = [  # s, b, c, k, tail, bias: odd lengths, one token, TP-local widths (c % block != 0)
    (37, 3, 40, 3, False, False), (37, 3, 40, 3, True, True), (1, 2, 24, 3, True, True),
    (2, 1, 24, 3, False, False), (20, 2, 33, 4, True, False), (9, 2, 8, 1, False, True),
    (16, 1, 64, 3, False, True),
]
for s, b, c, k, tail, bias in cases:
    print(check_kernel(T, s, b, c, k, torch.float32, "cpu", 1e-5, tail=tail, seed=s + c,
                       bias=bias))
print(check_kernel(T, 13, 3, 20, 3, torch.float32, "cpu", 1e-5, u_view=True, bias=True))
print(check_kernel(T, 25, 2, 40, 3, torch.bfloat16, "cpu", 1e-2, tail=True, bias=True))
print("INTERPRET OK")
"""


def test_triton_kernels_under_interpreter():
    """The fused kernels on CPU via TRITON_INTERPRET=1 (fp32 and bf16, with and without a bias,
    tiny shapes; ~10 s)."""
    r = run_under_interpreter(_INTERPRET_SNIPPET)
    assert r.returncode == 0 and "INTERPRET OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---- the mixer: in_proj's bias folded into the gate ----------------------------------------------

def _mixer_against_the_former_path(seq: int, prompt: int):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.mixers.baseconv import BaseConv, BaseConvSubmodules

    init_distributed(seed=5)
    cfg = preset("jrt-tiny")
    mixer = BaseConv(cfg.to_transformer_config(), BaseConvSubmodules(
        in_proj=ColumnParallelLinear, out_proj=RowParallelLinear), layer_number=1,
        kernel_size=cfg.conv_kernel)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():  # megatron starts the bias at zero
        mixer.in_proj.bias.copy_(torch.randn(mixer.in_proj.bias.shape, generator=g))
    x = torch.randn(seq, 2, cfg.hidden_size, generator=g)
    out, _ = mixer(x)
    # before: in_proj added its bias (skip_bias_add=False), then the conv1d form
    u = x @ mixer.in_proj.weight.T + mixer.in_proj.bias
    former = gated_causal_conv_conv1d(u, mixer.conv_weight) @ mixer.out_proj.weight.T
    params = (mixer.in_proj.weight, mixer.in_proj.bias, mixer.conv_weight)
    dy = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, params, dy)
    grads_former = torch.autograd.grad(former, params, dy)
    with torch.no_grad():
        (piece, _), state = mixer.prefill(x[:prompt])
        decoded = [piece]
        for t in range(prompt, seq):
            (piece, _), state = mixer.step(x[t:t + 1], state)
            decoded.append(piece)
    return out.detach(), former.detach(), grads, grads_former, torch.cat(decoded)


def test_mixer_with_the_bias_in_the_gate_is_the_former_path():
    """BaseConv (in_proj skips its bias add, the gate adds it) against in_proj's biased output
    through the conv1d form: output and gradients, in_proj.bias's included; decoding (the tail
    holds biased u1 values) reproduces the forward."""
    out, former, grads, grads_former, decoded = launch(_mixer_against_the_former_path, 1, 12, 5,
                                                       in_process=True)[0]
    torch.testing.assert_close(out, former, rtol=1e-5, atol=1e-6)
    for name, new, old in zip(("in_proj.weight", "in_proj.bias", "conv_weight"), grads,
                              grads_former):
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(decoded, out, rtol=1e-5, atol=1e-6)


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


GPU_BIAS_CASES = [  # jrt-360m's training shape (u [2048, 16, 4096]), decoding, an odd one
    (2048, 16, 2048, 3, False), (1, 8, 2048, 3, True), (77, 5, 512, 4, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("s, b, c, k, tail", GPU_BIAS_CASES)
def test_triton_with_bias_matches_reference_on_gpu(s, b, c, k, tail, dtype):
    from kernels.baseconv import triton_baseconv as T
    errs = check_kernel(T, s, b, c, k, dtype, "cuda", TOL[dtype], tail=tail, seed=s + c,
                        bias=True)
    print(f"s{s} b{b} c{c} k{k} {str(dtype)[6:]} bias: "
          + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda_and_matches_the_former_path():
    """bf16 as in training: the fused path (bias added in the kernel) is at least as close to
    fp64 as the former one (in_proj's bias add in bf16, then the conv1d form)."""
    assert bc.triton_available()
    u, w, _ = make(2048, 8, 2048, 3, torch.bfloat16, "cuda", seed=3)
    bias = make_bias(2048, torch.bfloat16, "cuda", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        y = gated_causal_conv(u, w, bias=bias)
    exact = gated_causal_conv_reference(u.double(), w.double(), bias=bias.double())
    err, err_old = rel(y, exact), rel(gated_causal_conv_conv1d(u + bias, w), exact)
    assert err < TOL[torch.bfloat16] and err <= err_old * 1.1, (err, err_old)
