"""Sliding-window attention's two paths: FlashAttention's local window on CUDA and the blocked
SDPA path everywhere (whose exactness tests/test_model_parts.py checks against a banded softmax).

CPU: the Flash path's folding of megatron's [s, b, heads, d] views into one sequence of b*heads
heads, with Flash replaced by a plain implementation of its documented window semantics (query i
sees keys i - left .. i + right); the dispatcher's fallbacks. GPU (marked gpu): the real Flash
path against the blocked path, forward and backward, in bf16.
"""
import math
import warnings

import pytest
import torch

from megatron_jrt.mixers import swa
from megatron_jrt.mixers.swa import blocked_sliding_window_attention, sliding_window_attention
from tests.fakes import OnCuda


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def megatron_qkv(n, b, h, d, dtype, device, seed=0):
    """q, k, v as SelfAttention hands them to its core: views of one mixed [n, b, h, 3d] tensor
    (split per head), permuted to [b, h, n, d]; and the mixed tensor."""
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randn(n, b, h, 3 * d, generator=g).to(device=device, dtype=dtype)
    q, k, v = (t.permute(1, 2, 0, 3) for t in mixed.split(d, dim=-1))
    return q, k, v, mixed


def flash_semantics(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size):
    """varlen_attn as documented, in plain PyTorch: [T, H, D] packed sequences; query i of a
    sequence sees its keys j with i - left <= j <= i + right (left = -1: no limit)."""
    left, right = window_size
    out = torch.empty_like(q)
    for start, end in zip(cu_q.tolist()[:-1], cu_q.tolist()[1:]):
        i = torch.arange(end - start).view(-1, 1)
        j = torch.arange(end - start).view(1, -1)
        allowed = (j <= i + right) & ((j >= i - left) if left >= 0 else True)
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        out[start:end] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs
                          ).transpose(0, 1)
    return out


@pytest.fixture
def fake_flash(monkeypatch):
    """Flash replaced by `flash_semantics`; records the storage of the q it was given."""
    seen = []

    def varlen(q, k, v, *args, **kwargs):
        seen.append(q)
        return flash_semantics(q, k, v, *args, **kwargs)

    monkeypatch.setattr(swa, "_varlen_attn", lambda: varlen)
    monkeypatch.setattr(swa, "_flash_disabled", [])
    monkeypatch.setattr(swa._FALLBACKS, "_warned", set())
    return seen


@pytest.mark.parametrize("n, window", [(1, 4), (7, 4), (8, 4), (33, 8), (20, 32), (9, 8)])
def test_flash_folding_equals_the_blocked_path(fake_flash, n, window):
    q, k, v, mixed = megatron_qkv(n, 2, 3, 8, torch.float64, "cpu", seed=n + window)
    out = swa._flash_sliding_window(q, k, v, window)
    torch.testing.assert_close(out, blocked_sliding_window_attention(q, k, v, window),
                               rtol=1e-10, atol=1e-10)
    # megatron's views went in as they are: no copy of q
    assert fake_flash[0].untyped_storage().data_ptr() == mixed.untyped_storage().data_ptr()
    # and the core's output layout [n, b, h*d] is a view of what Flash returned
    assert out.permute(2, 0, 1, 3).reshape(n, 2, 24).data_ptr() == out.data_ptr()


def _dispatch_warnings(calls):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [call() for call in calls]
    return results, [str(w.message) for w in caught
                     if str(w.message).startswith("sliding-window attention:")]


def test_cuda_bf16_takes_flash_and_fp32_falls_back_once(fake_flash):
    q, k, v, _ = megatron_qkv(21, 2, 2, 8, torch.bfloat16, "cpu")
    cuda_q = q.as_subclass(OnCuda)
    (out,), messages = _dispatch_warnings([lambda: sliding_window_attention(cuda_q, k, v, 4)])
    assert messages == [] and len(fake_flash) == 1
    torch.testing.assert_close(out.as_subclass(torch.Tensor).float(),
                               blocked_sliding_window_attention(q, k, v, 4).float(),
                               rtol=2e-2, atol=2e-2)
    q32 = q.float().as_subclass(OnCuda)
    _, messages = _dispatch_warnings(
        [lambda: sliding_window_attention(q32, k.float(), v.float(), 4)] * 2)
    assert len(fake_flash) == 1 and len(messages) == 1 and "bf16/fp16" in messages[0]


def test_cpu_takes_the_blocked_path_silently(fake_flash):
    q, k, v, _ = megatron_qkv(21, 2, 2, 8, torch.bfloat16, "cpu")
    (out,), messages = _dispatch_warnings([lambda: sliding_window_attention(q, k, v, 4)])
    assert messages == [] and fake_flash == []
    torch.testing.assert_close(out, blocked_sliding_window_attention(q, k, v, 4), rtol=0, atol=0)


def test_a_flash_failure_falls_back_and_is_not_retried(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("This flash attention build does not support local attention.")

    monkeypatch.setattr(swa, "_varlen_attn", lambda: broken)
    monkeypatch.setattr(swa, "_flash_disabled", [])
    monkeypatch.setattr(swa._FALLBACKS, "_warned", set())
    q, k, v, _ = megatron_qkv(10, 1, 2, 8, torch.bfloat16, "cpu")
    cuda_q = q.as_subclass(OnCuda)
    results, messages = _dispatch_warnings([lambda: sliding_window_attention(cuda_q, k, v, 4)] * 3)
    assert len(calls) == 1 and len(messages) == 1
    assert "does not support local attention" in messages[0]
    torch.testing.assert_close(results[2].as_subclass(torch.Tensor),
                               blocked_sliding_window_attention(q, k, v, 4), rtol=0, atol=0)


# ---- GPU --------------------------------------------------------------------------------------

GPU_CASES = [  # b, h, n, d, window: jrt-360m at 2k/8k/32k, head size 112, odd and short lengths
    (8, 16, 2048, 64, 128), (2, 16, 8192, 64, 128), (1, 16, 32768, 64, 128),
    (4, 14, 2048, 112, 128), (3, 4, 1000, 64, 128), (2, 4, 129, 64, 128), (2, 4, 77, 64, 128),
    (2, 4, 200, 64, 256), (2, 4, 300, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("b, h, n, d, window", GPU_CASES)
def test_flash_path_matches_the_blocked_path_on_gpu(b, h, n, d, window):
    """bf16 Flash and bf16 blocked, each against the blocked path in fp32: out, dq, dk, dv."""
    *_, mixed = megatron_qkv(n, b, h, d, torch.bfloat16, "cuda", seed=n + d)
    g = torch.randn(b, h, n, d, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    results = {}
    for name, fn, dtype in [("flash", swa._flash_sliding_window, torch.bfloat16),
                            ("blocked", blocked_sliding_window_attention, torch.bfloat16),
                            ("exact", blocked_sliding_window_attention, torch.float32)]:
        x = mixed.to(dtype, copy=True).requires_grad_()
        q, k, v = (t.permute(1, 2, 0, 3) for t in x.split(d, dim=-1))
        out = fn(q, k, v, window)
        out.backward(g.to(dtype))
        results[name] = (out.detach(), *x.grad.split(d, dim=-1))
    names = ["out", "dq", "dk", "dv"]
    errs = {f"{path} {n_}": rel(a, e) for path in ("flash", "blocked")
            for n_, a, e in zip(names, results[path], results["exact"])}
    print(f"b{b} h{h} n{n} d{d} w{window}: " + " ".join(f"{k_}={e:.1e}" for k_, e in errs.items()))
    for n_ in names:  # Flash is as exact as the path it replaces (bf16 rounding: ~4e-3)
        assert errs[f"flash {n_}"] < 1e-2, errs
        assert errs[f"flash {n_}"] < 2 * errs[f"blocked {n_}"] + 2e-3, errs


@pytest.mark.gpu
def test_sliding_window_attention_takes_flash_on_cuda_without_copies():
    q, k, v, mixed = megatron_qkv(2048, 8, 16, 64, torch.bfloat16, "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        assert swa._flash_unsupported(q, k, v) is None
        out = sliding_window_attention(q, k, v, 128)
    # the [n, b, h*d] layout the core returns is a view of Flash's output
    assert out.permute(2, 0, 1, 3).reshape(2048, 8, -1).data_ptr() == out.data_ptr()
    expected = blocked_sliding_window_attention(q.float(), k.float(), v.float(), 128)
    assert rel(out, expected) < 1e-2
