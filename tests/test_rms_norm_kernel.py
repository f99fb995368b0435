"""RMSNorm: the reference against torch, the fused Triton kernels against the reference (output,
dx, dw), the dispatcher, and the layers' norm module against torch.nn.RMSNorm.

CPU: the reference vs F.rms_norm; the Triton kernels under the interpreter (TRITON_INTERPRET=1,
in a subprocess since the flag is read when the kernels are defined) at small shapes; the
dispatcher; megatron_jrt.norm.RMSNorm. GPU tests (marked gpu): realistic shapes, and the weight
gradient bit-equal from run to run.

Tolerances are on ||out - ref|| / ||ref|| (the reference in fp32 on the same, upcast inputs):
bf16 and fp16 1e-2 (one rounding of y, dx and dw; the interpreter truncates where the GPU
rounds to nearest, hence not tighter), fp32 1e-5.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels.rms_norm as rn
from kernels.rms_norm import rms_norm, rms_norm_reference
from tests.fakes import OnCuda, fallback_warnings, kernel_state_fixture, run_under_interpreter
from tests.multiproc import launch

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
EPS = 1e-5


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make(shape, dtype, weight_dtype, device, seed=0):
    """x [*shape], a weight [d] near one (as trained), dy [*shape]."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2).to(device=device, dtype=dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(device=device, dtype=weight_dtype)
    dy = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return x, w, dy


def check_kernel(T, shape, dtype, device, *, weight_dtype=None, layout="contiguous",
                 weight_grad=True, seed=0):
    """y, dx and dw of T.rms_norm_triton vs the fp32 reference -> their relative errors.
    layout: contiguous | transposed (x [b, s, d] seen as [s, b, d]: rows not a view)."""
    weight_dtype = weight_dtype or dtype
    x, w, dy = make(shape, dtype, weight_dtype, device, seed)
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    xt, wt = x.detach().requires_grad_(), w.detach().requires_grad_(weight_grad)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    y = T.rms_norm_triton(xt, wt, EPS)
    yr = rms_norm_reference(xr, wr, EPS)
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy)
    yr.backward(dy.float())
    assert xt.grad.dtype == dtype and xt.grad.shape == x.shape
    errs = {"y": rel(y, yr), "dx": rel(xt.grad, xr.grad)}
    if weight_grad:
        assert wt.grad.dtype == weight_dtype and wt.grad.shape == w.shape
        errs["dw"] = rel(wt.grad, wr.grad)
    else:
        assert wt.grad is None
    bad = {key: e for key, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"{shape} {dtype} weight {weight_dtype} {layout}: {errs}"
    return errs


# ---- the reference ----------------------------------------------------------------------------

def test_reference_equals_torch_rms_norm():
    for dtype, tol in ((torch.float32, {}), (torch.bfloat16, dict(rtol=1e-2, atol=2e-2))):
        x, w, dy = make((7, 3, 50), dtype, dtype, "cpu")
        grads = []
        for fn in (lambda x, w: rms_norm_reference(x, w, EPS),
                   lambda x, w: F.rms_norm(x, (50,), w, EPS)):
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = fn(xg, wg)
            y.backward(dy)
            grads.append((y.detach(), xg.grad, wg.grad))
        for ours, torchs in zip(*grads):
            assert ours.dtype == dtype
            torch.testing.assert_close(ours, torchs, **tol)
    # an fp32 weight on bf16 activations: the output stays bf16
    x, w, _ = make((4, 16), torch.bfloat16, torch.float32, "cpu")
    assert rms_norm_reference(x, w, EPS).dtype == torch.bfloat16


# ---- the Triton kernels under the interpreter ---------------------------------------------------

_INTERPRET_SNIPPET = r"""
import torch
from tests.test_rms_norm_kernel import check_kernel
from kernels.rms_norm import triton_rms_norm as T
cases = [  # shape, dtype, weight dtype, layout, weight gradient
    ((37, 3, 100), torch.float32, None, "contiguous", True),  # d not a power of two
    ((37, 3, 100), torch.bfloat16, None, "contiguous", True),
    ((9, 130), torch.bfloat16, torch.float32, "contiguous", True),
    ((5, 3, 64), torch.float16, None, "transposed", True),
    ((6, 2, 48), torch.float32, None, "contiguous", False),
    ((3, 4096), torch.float32, None, "contiguous", True),  # a row wider than the tile
    ((0, 2, 64), torch.float32, None, "contiguous", True),  # no rows: dw is zero
]
for shape, dtype, weight_dtype, layout, weight_grad in cases:
    print(check_kernel(T, shape, dtype, "cpu", weight_dtype=weight_dtype, layout=layout,
                       weight_grad=weight_grad))
# small tiles: several programs each way, the last tile and program partly masked
T.FWD_CONFIG, T.BWD_CONFIG, T.BWD_ROWS_PER_PROGRAM = (256, 4), (256, 4), 8
for dtype in (torch.float32, torch.bfloat16):
    print(check_kernel(T, (23, 3, 100), dtype, "cpu", seed=1))
print("INTERPRET OK")
"""


def test_triton_kernels_under_interpreter():
    """The fused kernels on CPU via TRITON_INTERPRET=1 (fp32, bf16, fp16, tiny shapes)."""
    r = run_under_interpreter(_INTERPRET_SNIPPET)
    assert r.returncode == 0 and "INTERPRET OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---- the dispatcher ---------------------------------------------------------------------------

kernel_state = kernel_state_fixture(rn)


def _warnings_of(calls):
    return fallback_warnings(calls, "RMSNorm")


def test_cpu_takes_the_reference_silently(kernel_state):
    kernel_state(None, ImportError("no triton"))
    x, w, _ = make((4, 2, 32), torch.float32, torch.float32, "cpu")
    (y,), messages = _warnings_of([lambda: rms_norm(x, w, EPS)])
    assert messages == []
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), rtol=0, atol=0)


def test_cuda_fallbacks_warn_once_per_reason(kernel_state):
    x, w, _ = make((4, 2, 32), torch.float32, torch.float32, "cpu")
    cuda_x = x.as_subclass(OnCuda)
    kernel_state(None, ImportError("libcuda.so.1: cannot open shared object file"))
    _, messages = _warnings_of([lambda: rms_norm(cuda_x, w, EPS)] * 3)
    assert len(messages) == 1 and "ImportError: libcuda.so.1" in messages[0]

    calls = []

    class FakeKernels:
        supports = staticmethod(lambda x, w: x.dtype != torch.float64)

        @staticmethod
        def rms_norm_triton(x, w, eps):
            calls.append(eps)
            return rms_norm_reference(x, w, eps)

    kernel_state(FakeKernels, None)
    _, messages = _warnings_of([lambda: rms_norm(cuda_x, w, EPS),
                                lambda: rms_norm(cuda_x.double(), w, EPS),  # the reference
                                lambda: rms_norm(cuda_x.double(), w, EPS)])
    assert calls == [EPS]
    assert len(messages) == 1 and "does not support" in messages[0], messages


# ---- the layers' norm module ------------------------------------------------------------------

def _config(**changes):
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                               normalization="RMSNorm")
    for key, value in changes.items():  # after __post_init__'s checks of their relations
        setattr(config, key, value)
    return config


def _model_norms():
    """jrt-tiny's norms -> {qualified name: (class, parameter names)}."""
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed()
    cfg = preset("jrt-tiny")
    model = build_model(cfg, cfg.to_transformer_config())
    return {name: (type(m), list(m.state_dict())) for name, m in model.named_modules()
            if name.endswith(("input_layernorm", "pre_mlp_layernorm", "final_layernorm"))}


def test_norm_module_is_torch_rms_norm_with_the_same_weight():
    from megatron_jrt.norm import RMSNorm

    ours = RMSNorm(config=_config(), hidden_size=32, eps=EPS)
    torchs = torch.nn.RMSNorm(32, eps=EPS)
    assert list(ours.state_dict()) == list(torchs.state_dict()) == ["weight"]
    torch.testing.assert_close(ours.weight, torchs.weight, rtol=0, atol=0)  # the same init
    x, w, dy = make((5, 2, 32), torch.float32, torch.float32, "cpu")
    with torch.no_grad():
        torchs.weight.copy_(w)
    ours.load_state_dict(torchs.state_dict())
    outs = []
    for norm in (ours, torchs):
        xg = x.clone().requires_grad_()
        y = norm(xg)
        y.backward(dy)
        outs.append((y.detach(), xg.grad, norm.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_model_builds_its_norms_from_the_module():
    """Both norms of every layer and the final norm; each still holds just `weight`."""
    from megatron_jrt.norm import RMSNorm

    norms = launch(_model_norms, 1, in_process=True)[0]
    assert len(norms) == 2 * 4 + 1 and "decoder.final_layernorm" in norms
    assert all(norm == (RMSNorm, ["weight"]) for norm in norms.values()), norms


@pytest.mark.parametrize("changes, key", [
    (dict(layernorm_zero_centered_gamma=True), "layernorm_zero_centered_gamma"),
    (dict(persist_layer_norm=True), "persist_layer_norm"),
    (dict(sequence_parallel=True), "sequence_parallel"),
    (dict(memory_efficient_layer_norm=True), "memory_efficient_layer_norm"),
    (dict(normalization="LayerNorm"), "normalization"),
])
def test_norm_module_refuses_unsupported_settings(changes, key):
    from megatron_jrt.config import ConfigError
    from megatron_jrt.norm import RMSNorm

    with pytest.raises(ConfigError, match=f"^{key}: .*megatron_jrt.norm.RMSNorm"):
        RMSNorm(config=_config(**changes), hidden_size=32, eps=EPS)
    with pytest.raises(ConfigError, match="zero_centered_gamma"):
        RMSNorm(config=_config(), hidden_size=32, eps=EPS, zero_centered_gamma=True)


# ---- GPU ----------------------------------------------------------------------------------------

GPU_CASES = [  # shape, dtype, weight dtype: jrt-360m's step (2048 x 16, hidden 1024), 8192 x 2,
    # jrt-1.3b's hidden, wide rows, an fp32 weight on bf16 activations, fp16
    ((2048, 16, 1024), torch.bfloat16, torch.bfloat16),
    ((8192, 2, 1024), torch.bfloat16, torch.bfloat16),
    ((1000, 3, 1792), torch.bfloat16, torch.bfloat16),
    ((64, 3, 8192), torch.float32, torch.float32),
    ((100, 7, 16384), torch.bfloat16, torch.float32),
    ((5, 1, 1000), torch.float16, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype, weight_dtype", GPU_CASES)
def test_triton_matches_reference_on_gpu(shape, dtype, weight_dtype):
    from kernels.rms_norm import triton_rms_norm as T
    errs = check_kernel(T, shape, dtype, "cuda", weight_dtype=weight_dtype, seed=sum(shape))
    print(f"{shape} {str(dtype)[6:]} weight {str(weight_dtype)[6:]}: "
          + " ".join(f"{k} {e:.1e}" for k, e in errs.items()))


@pytest.mark.gpu
def test_weight_gradient_is_deterministic_on_gpu():
    """Per-program partial sums reduced by torch, no atomics: two runs bit-equal."""
    x, w, dy = make((2048, 16, 1024), torch.bfloat16, torch.bfloat16, "cuda")
    grads = []
    for _ in range(2):
        wg = w.detach().requires_grad_()
        rms_norm(x.detach().requires_grad_(), wg, EPS).backward(dy)
        grads.append(wg.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda():
    x, w, _ = make((64, 4, 1024), torch.bfloat16, torch.bfloat16, "cuda")
    assert rn.triton_available()
    (y,), messages = _warnings_of([lambda: rms_norm(x.requires_grad_(), w, EPS)])
    assert messages == [] and type(y.grad_fn).__name__ == "RMSNormFunctionBackward"
    assert rel(y, rms_norm_reference(x.float(), w.float(), EPS)) < TOL[torch.bfloat16]
