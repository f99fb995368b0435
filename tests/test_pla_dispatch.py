"""The PLA dispatcher's fallback to the PyTorch reference: said once on CUDA, silent on CPU.

No GPU needed: a CPU tensor that reports ``is_cuda`` drives the dispatcher's decisions, and
the Triton module (or its import error) is replaced for the test.
"""
import types

import pytest
import torch

import kernels.pla as pla
from kernels.pla import encoder_state, pla_decode_step, pla_prefill, prefix_linear_attention
from tests.fakes import OnCuda, fallback_warnings, kernel_state_fixture


def _inputs(f: int = 16, on_cuda: bool = False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, d, generator=g) for d in (f, f, 8))
    if on_cuda:
        q = q.as_subclass(OnCuda)
    return q, k, v, k[:, :, :4], v[:, :, :4]


def _fallback_warnings(calls) -> list[str]:
    return fallback_warnings(calls, "PLA")[1]


kernels_state = kernel_state_fixture(pla)


def test_cuda_fallback_after_import_error_warns_once_naming_it(kernels_state):
    kernels_state(None, ImportError("libcuda.so.1: cannot open shared object file"))
    q, k, v, k_enc, v_enc = _inputs(on_cuda=True)
    state = encoder_state(k_enc, v_enc)
    messages = _fallback_warnings([
        lambda: prefix_linear_attention(q, k, v, k_enc, v_enc),
        lambda: pla_prefill(q, k, v, k_enc, v_enc),
        lambda: pla_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state),
    ])
    assert len(messages) == 1, messages
    assert "Triton kernels unavailable on CUDA" in messages[0]
    assert "ImportError: libcuda.so.1: cannot open shared object file" in messages[0]
    assert "PyTorch reference" in messages[0] and "1.3x slower" in messages[0]
    # The fallback still computes PLA: the same as the CPU reference.
    expected = prefix_linear_attention(*_inputs())
    torch.testing.assert_close(prefix_linear_attention(q, k, v, k_enc, v_enc).as_subclass(
        torch.Tensor), expected, rtol=0, atol=0)


def test_cpu_and_masked_calls_take_the_reference_silently(kernels_state):
    kernels_state(None, ImportError("no triton"))
    q, k, v, k_enc, v_enc = _inputs()
    mask = torch.ones(1, 12, dtype=torch.bool)
    cuda_q = q.as_subclass(OnCuda)
    assert _fallback_warnings([
        lambda: prefix_linear_attention(q, k, v, k_enc, v_enc),
        lambda: pla_prefill(q, k, v, k_enc, v_enc),
        lambda: prefix_linear_attention(cuda_q, k, v, k_enc, v_enc, key_mask=mask),
    ]) == []


def test_unsupported_shape_warns_once_with_its_own_reason(kernels_state):
    kernels_state(types.SimpleNamespace(supports=lambda q, v: False,
                                        supports_decode=lambda q, v, state: False), None)
    q, k, v, k_enc, v_enc = _inputs(f=8, on_cuda=True)
    state = encoder_state(k_enc, v_enc)
    messages = _fallback_warnings([
        lambda: prefix_linear_attention(q, k, v, k_enc, v_enc),
        lambda: prefix_linear_attention(q, k, v, k_enc, v_enc),
        lambda: pla_decode_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state),
    ])
    assert len(messages) == 1, messages
    assert "the Triton kernels do not support q [1, 2, 12, 8] torch.float32" in messages[0]
    assert "PyTorch reference" in messages[0]


@pytest.mark.gpu
def test_on_a_gpu_the_supported_shapes_take_triton_without_a_warning():
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    q, k = (torch.randn(2, 4, 256, 16, device=device, generator=g, dtype=torch.bfloat16)
            for _ in range(2))
    v = torch.randn(2, 4, 256, 64, device=device, generator=g, dtype=torch.bfloat16)
    assert pla.triton_available(), pla._KERNELS.error
    assert _fallback_warnings([lambda: prefix_linear_attention(q, k, v, k[:, :, :64],
                                                               v[:, :, :64])]) == []
