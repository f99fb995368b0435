"""The vocabulary cross entropy: the reference against torch and megatron-core, the fused Triton
kernels against fp64 (loss and logits gradient), the dispatcher, and JRTModel's loss.

CPU: the reference vs F.cross_entropy in fp64 and vs megatron's unfused
vocab_parallel_cross_entropy; the Triton kernels under the interpreter (TRITON_INTERPRET=1, in a
subprocess since the flag is read when the kernels are defined) at small shapes; TP=2 on a gloo
group (the reference, megatron's and the interpreted kernels on each rank's half of the
vocabulary equal the whole vocabulary's loss and gradient); the model's fused loss flag takes
the reference on CPU and gives megatron's losses. GPU tests (marked gpu): realistic shapes.

Tolerances are on ||out - exact|| / ||exact|| (exact: fp64 on the same, upcast logits): the loss
1e-5 (fp32 accumulation); the gradient 1e-5 in fp32 and 1e-2 in bf16 (one rounding; the
interpreter truncates where the GPU rounds to nearest, hence not tighter).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.cross_entropy as ce
from kernels.cross_entropy import (vocab_parallel_cross_entropy,
                                   vocab_parallel_cross_entropy_reference)
from tests.fakes import OnCuda, fallback_warnings, kernel_state_fixture, run_under_interpreter
from tests.multiproc import launch

GRAD_TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
LOSS_TOL = 1e-5


def make(s, b, v, dtype, device, seed=0, scale=3.0):
    """Logits [s, b, v] (a peaked softmax, as in training), labels [s, b], loss gradient [s, b]."""
    g = torch.Generator(device).manual_seed(seed)
    logits = (torch.randn(s, b, v, generator=g, device=device) * scale).to(dtype)
    labels = torch.randint(0, v, (s, b), generator=g, device=device)
    dloss = torch.randn(s, b, generator=g, device=device)
    return logits, labels, dloss


def exact_errors(loss, grad, logits, labels, dloss, chunk=4096):
    """(loss, grad) relative errors against fp64, over chunks of rows: fp64 copies of
    [32768, 50264] logits would take 13 GB at once."""
    v = logits.shape[-1]
    x, y, d = logits.reshape(-1, v), labels.reshape(-1), dloss.reshape(-1).double()
    loss, grad = loss.reshape(-1), grad.reshape(-1, v)
    sq = torch.zeros(4, dtype=torch.float64, device=logits.device)
    for i in range(0, x.shape[0], chunk):
        xr, yr = x[i:i + chunk].double(), y[i:i + chunk, None]
        lse = torch.logsumexp(xr, dim=-1, keepdim=True)
        loss_r = (lse - xr.gather(1, yr)).squeeze(1)
        grad_r = torch.exp(xr - lse).scatter_add_(1, yr, -torch.ones_like(xr[:, :1]))
        grad_r *= d[i:i + chunk, None]
        sq += torch.stack([(loss[i:i + chunk].double() - loss_r).square().sum(),
                           loss_r.square().sum(),
                           (grad[i:i + chunk].double() - grad_r).square().sum(),
                           grad_r.square().sum()])
    sq = sq.tolist()
    return math.sqrt(sq[0] / sq[1]), math.sqrt(sq[2] / sq[3])


def check_kernel(T, s, b, v, dtype, device, *, layout="contiguous", inplace=False, seed=0):
    """Loss and logits gradient of T.vocab_parallel_cross_entropy_triton vs fp64.
    layout: contiguous | strided (rows of a wider tensor) | transposed ([b, s, v] seen as
    [s, b, v]: rows not a view)."""
    logits, labels, dloss = make(s, b, v, dtype, device, seed)
    leaf = logits.detach().clone().requires_grad_()
    x = leaf * 1 if inplace else leaf  # in place: a non-leaf that the backward may overwrite
    if layout == "strided":
        x = torch.cat([x, x[..., :7]], dim=-1)[..., :v]
    elif layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    loss = T.vocab_parallel_cross_entropy_triton(x, labels, None, inplace)
    assert loss.dtype == torch.float32 and loss.shape == (s, b)
    loss.backward(dloss)
    assert leaf.grad.dtype == dtype
    errs = exact_errors(loss.detach(), leaf.grad, logits, labels, dloss)
    assert errs[0] < LOSS_TOL and errs[1] < GRAD_TOL[dtype], (s, b, v, dtype, layout, errs)
    assert torch.equal(leaf.detach(), logits), "the caller's logits must be left as they were"
    return errs


# ---- the reference ----------------------------------------------------------------------------

def test_reference_equals_torch_cross_entropy():
    logits, labels, dloss = make(7, 3, 301, torch.float64, "cpu")
    x = logits.clone().requires_grad_()
    xt = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy_reference(x, labels)
    loss_t = F.cross_entropy(xt.flatten(0, 1), labels.flatten(), reduction="none").view(7, 3)
    torch.testing.assert_close(loss, loss_t, rtol=1e-13, atol=1e-13)
    loss.backward(dloss.double())
    loss_t.backward(dloss.double())
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-13, atol=1e-13)
    # bf16 logits: an fp32 loss and a bf16 gradient
    loss = vocab_parallel_cross_entropy_reference(logits.bfloat16().requires_grad_(), labels)
    assert loss.dtype == torch.float32


def _reference_vs_megatron_tp1():
    from megatron.core import tensor_parallel

    from megatron_jrt.distributed import init_distributed

    init_distributed()
    logits, labels, dloss = make(9, 2, 301, torch.float32, "cpu", seed=1)
    grads = []
    for fn in (vocab_parallel_cross_entropy_reference,
               tensor_parallel.vocab_parallel_cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward(dloss)
        grads.append((loss.detach(), x.grad))
    return grads


def test_reference_equals_megatron_vocab_parallel_cross_entropy():
    (loss, grad), (loss_m, grad_m) = launch(_reference_vs_megatron_tp1, 1, in_process=True)[0]
    torch.testing.assert_close(loss, loss_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_m, rtol=1e-6, atol=1e-8)


# ---- TP=2: each rank's half of the vocabulary equals the whole ---------------------------------

def _tp2_halves():
    """Every rank draws the same logits and takes its half: megatron's loss, the reference's and
    the Triton path's (interpreted) against F.cross_entropy over the whole vocabulary."""
    from megatron.core import parallel_state, tensor_parallel

    from kernels.cross_entropy import triton_cross_entropy as T
    from megatron_jrt.distributed import init_distributed

    init_distributed(tensor_parallel=2)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = torch.distributed.get_rank(group)
    T.FWD_CONFIG = T.BWD_CONFIG = (64, 4)  # several blocks per half, the last one partial
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits, labels, dloss = make(11, 3, 2 * 150, dtype, "cpu", seed=5)
        full = logits.double().requires_grad_()
        loss_full = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction="none")
        loss_full.backward(dloss.double().flatten())
        half = slice(rank * 150, (rank + 1) * 150)
        fns = {"reference": lambda x, y: vocab_parallel_cross_entropy_reference(x, y, group),
               "megatron": tensor_parallel.vocab_parallel_cross_entropy,
               "triton": lambda x, y: T.vocab_parallel_cross_entropy_triton(x, y, group)}
        for name, fn in fns.items():
            if name == "megatron" and dtype != torch.float32:
                continue
            x = logits[..., half].clone().requires_grad_()
            loss = fn(x, labels)
            loss.backward(dloss)
            want = full.grad[..., half]
            out[name, str(dtype)] = ((loss.double().flatten() - loss_full).abs().max().item(),
                                     ((x.grad.double() - want).norm() / want.norm()).item())
    return out


def test_tp2_halves_equal_the_whole_vocabulary(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the ranks are fresh processes: they read it
    for errs in launch(_tp2_halves, 2, timeout=300):
        assert len(errs) == 5, errs
        for (name, dtype), (loss_err, grad_err) in errs.items():
            tol = GRAD_TOL[torch.bfloat16 if "bfloat16" in dtype else torch.float32]
            assert loss_err < 1e-5 and grad_err < tol, (name, dtype, loss_err, grad_err)


# ---- the dispatcher ---------------------------------------------------------------------------

kernel_state = kernel_state_fixture(ce)


def _warnings_of(calls):
    return fallback_warnings(calls, "Cross entropy")


def test_cpu_takes_the_reference_silently(kernel_state):
    kernel_state(None, ImportError("no triton"))
    logits, labels, _ = make(4, 2, 33, torch.float32, "cpu")
    (loss,), messages = _warnings_of([lambda: vocab_parallel_cross_entropy(logits, labels)])
    assert messages == []
    torch.testing.assert_close(loss, vocab_parallel_cross_entropy_reference(logits, labels),
                               rtol=0, atol=0)


def test_cuda_fallbacks_warn_once_per_reason(kernel_state):
    logits, labels, _ = make(4, 2, 33, torch.float32, "cpu")
    cuda_logits = logits.as_subclass(OnCuda)
    kernel_state(None, ImportError("libcuda.so.1: cannot open shared object file"))
    _, messages = _warnings_of([lambda: vocab_parallel_cross_entropy(cuda_logits, labels)] * 3)
    assert len(messages) == 1 and "ImportError: libcuda.so.1" in messages[0]

    calls = []

    class FakeKernels:
        supports = staticmethod(lambda x: x.dtype != torch.float64)

        @staticmethod
        def vocab_parallel_cross_entropy_triton(x, y, group, inplace_backward):
            calls.append(inplace_backward)
            return vocab_parallel_cross_entropy_reference(x, y, group)

    kernel_state(FakeKernels, None)
    _, messages = _warnings_of([
        lambda: vocab_parallel_cross_entropy(cuda_logits, labels, inplace_backward=True),
        lambda: vocab_parallel_cross_entropy(cuda_logits.double(), labels),  # the reference
        lambda: vocab_parallel_cross_entropy(cuda_logits.double(), labels),
    ])
    assert calls == [True]
    assert len(messages) == 1 and "does not support" in messages[0], messages


# ---- JRTModel's loss --------------------------------------------------------------------------

def _model_losses():
    """jrt-tiny (fp32, CPU) with megatron's native cross-entropy fusion flag on, then off:
    [(per-token loss, tied output weight's gradient)] of each."""
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed(seed=3)
    cfg = preset("jrt-tiny", vocab_size=300)
    assert cfg.to_transformer_config(fusions=True, bf16=True).cross_entropy_loss_fusion
    model = build_model(cfg, cfg.to_transformer_config(cross_entropy_loss_fusion=True,
                                                       cross_entropy_fusion_impl="native"))
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 300, (2, 2, 24), generator=g)
    positions = torch.arange(24).unsqueeze(0).expand_as(tokens)
    out = []
    for fused in (True, False):
        model.config.cross_entropy_loss_fusion = fused
        model.zero_grad()
        loss = model(tokens, positions, None, labels=labels)
        loss.sum().backward()
        out.append((loss.detach(), model.shared_embedding_or_output_weight().grad.clone()))
    return out


def test_model_fused_loss_takes_the_reference_on_cpu_and_equals_megatrons(monkeypatch):
    """The flag on: kernels/cross_entropy (its reference on CPU); off: megatron's unfused loss."""
    calls, reference = [], ce.vocab_parallel_cross_entropy_reference

    def counted(logits, labels, group):
        calls.append(tuple(logits.shape))
        return reference(logits, labels, group)

    monkeypatch.setattr(ce, "vocab_parallel_cross_entropy_reference", counted)
    (loss, grad), (loss_m, grad_m) = launch(_model_losses, 1, in_process=True)[0]
    assert calls == [(24, 2, 304)]  # [s, b, padded vocabulary], with the flag on only
    assert loss.shape == (2, 24)
    torch.testing.assert_close(loss, loss_m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, grad_m, rtol=1e-5, atol=1e-7)


# ---- the Triton kernels under the interpreter ---------------------------------------------------

_INTERPRET_SNIPPET = r"""
import torch
from tests.test_cross_entropy_kernel import check_kernel
from kernels.cross_entropy import triton_cross_entropy as T
for dtype in (torch.float32, torch.bfloat16):
    print(check_kernel(T, 37, 1, 301, dtype, "cpu"))  # the default block: one, mostly masked
T.FWD_CONFIG = T.BWD_CONFIG = (64, 4)  # several blocks, the last one partial
cases = [  # s, b, v, dtype, layout, inplace
    (37, 1, 301, torch.float32, "contiguous", False),
    (37, 1, 301, torch.bfloat16, "contiguous", False),
    (5, 3, 301, torch.float16, "contiguous", False), (6, 2, 64, torch.float32, "contiguous", False),
    (1, 1, 2, torch.float32, "contiguous", False), (7, 3, 130, torch.bfloat16, "strided", False),
    (7, 3, 130, torch.float32, "transposed", False),
    (9, 2, 301, torch.bfloat16, "contiguous", True),
    (7, 3, 130, torch.bfloat16, "strided", True), (7, 3, 130, torch.float32, "transposed", True),
]
for s, b, v, dtype, layout, inplace in cases:
    print(check_kernel(T, s, b, v, dtype, "cpu", layout=layout, inplace=inplace, seed=s + v))

# in place: the logits' memory holds the gradient; a second backward fails instead of reading it
logits = torch.randn(4, 2, 50).requires_grad_()
x = logits * 1
loss = T.vocab_parallel_cross_entropy_triton(x, torch.zeros(4, 2, dtype=torch.long), None, True)
loss.sum().backward(retain_graph=True)
assert torch.equal(x, logits.grad)
try:
    loss.sum().backward()
except RuntimeError as e:
    assert "inplace" in str(e), e  # autograd's error for a saved tensor changed in place
else:
    raise AssertionError("a second backward through overwritten logits must fail")
print("INTERPRET OK")
"""


def test_triton_kernels_under_interpreter():
    """The fused kernels on CPU via TRITON_INTERPRET=1 (fp32, bf16, fp16, tiny shapes)."""
    r = run_under_interpreter(_INTERPRET_SNIPPET)
    assert r.returncode == 0 and "INTERPRET OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---- GPU ----------------------------------------------------------------------------------------

GPU_CASES = [  # s, b, v, dtype: jrt-360m's step (2048 x 16, vocabulary 50264), a TP=2 half,
    # 32k tokens in one sequence, fp32
    (2048, 16, 50264, torch.bfloat16), (2048, 16, 25132, torch.bfloat16),
    (32768, 1, 50264, torch.bfloat16), (512, 4, 50264, torch.float32),
    (100, 3, 1000, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("s, b, v, dtype", GPU_CASES)
def test_triton_matches_fp64_on_gpu(s, b, v, dtype, inplace):
    from kernels.cross_entropy import triton_cross_entropy as T
    loss_err, grad_err = check_kernel(T, s, b, v, dtype, "cuda", inplace=inplace, seed=s + v)
    print(f"s{s} b{b} v{v} {str(dtype)[6:]} inplace={inplace}: loss {loss_err:.1e} "
          f"grad {grad_err:.1e}")


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda_and_matches_megatron_native():
    """bf16 as in training: the kernel is at least as close to fp64 as megatron's fused loss,
    which the model used before, with no fallback warned."""
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    from megatron_jrt.distributed import init_distributed

    def errors():
        from megatron.core import parallel_state

        init_distributed()
        group = parallel_state.get_tensor_model_parallel_group()
        logits, labels, dloss = make(1024, 8, 50264, torch.bfloat16, "cuda", seed=3)
        out = []
        for fn in (vocab_parallel_cross_entropy, fused_vocab_parallel_cross_entropy):
            x = logits.clone().requires_grad_()
            (loss,), messages = _warnings_of([lambda: fn(x, labels, group)])
            assert messages == [], messages  # no fallback
            loss.backward(dloss)
            out.append(exact_errors(loss.detach(), x.grad, logits, labels, dloss))
        return out

    assert ce.triton_available()
    ours, megatron = launch(errors, 1, in_process=True)[0]
    assert ours[0] < LOSS_TOL and ours[1] < GRAD_TOL[torch.bfloat16], ours
    assert ours[0] <= megatron[0] * 1.1 + 1e-7 and ours[1] <= megatron[1] * 1.1, (ours, megatron)
