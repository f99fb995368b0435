"""Sliding-window softmax attention (layer letter S) as the core attention of megatron-core's
SelfAttention: each query sees itself and the `window` keys before it. (mixers/attention.py
holds the SelfAttention and its recurrent form, shared with full attention.)

Two exact paths, O(N * window) memory and time, never O(N^2):
  * CUDA, bf16/fp16: FlashAttention-2 with a (window, 0) local window through PyTorch's public
    `torch.nn.attention.varlen.varlen_attn`. Batch and heads are folded into the head axis of
    one sequence, so megatron's [s, b, heads, d] q, k, v and the [s, b, heads * d] output are
    passed as views: no pad, unfold, mask or copy.
  * elsewhere (CPU, fp32, a head size Flash does not take): `blocked_sliding_window_attention`,
    queries in blocks of `window` against their own block and the previous one through SDPA
    with a band mask. A CUDA call that falls back says so once, with the reason.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from kernels.optional import FallbackWarnings
from megatron_jrt.mixers.attention import CoreAttention


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention over the last `window` keys plus self. q, k, v: [b, h, n, d] -> [b, h, n, d]."""
    if q.is_cuda:
        reason = _flash_unsupported(q, k, v)
        if reason is None:
            try:
                return _flash_sliding_window(q, k, v, window)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # e.g. a Flash build without local attention
                _flash_disabled.append(f"FlashAttention failed ({type(e).__name__}: {e})")
                reason = _flash_disabled[0]
        _FALLBACKS.warn_once(reason, reason)
    return blocked_sliding_window_attention(q, k, v, window)


# ---- CUDA: FlashAttention-2 with a local window ---------------------------------------------

_FLASH_DTYPES = (torch.bfloat16, torch.float16)
_flash_disabled: list[str] = []  # why Flash failed once in this process (then never retried)
_FALLBACKS = FallbackWarnings("sliding-window attention",
                              "using the blocked SDPA path (pads, unfolds and masks: slower)")


@functools.cache
def _varlen_attn():
    """torch.nn.attention.varlen.varlen_attn if it takes a window (2.11 does), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "window_size" in inspect.signature(varlen_attn).parameters else None


def _flash_unsupported(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why the Flash path cannot run this call, or None."""
    if _flash_disabled:
        return _flash_disabled[0]
    if _varlen_attn() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen with window_size"
    if q.dtype not in _FLASH_DTYPES:
        return f"FlashAttention takes bf16/fp16, not {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"FlashAttention takes head sizes that are multiples of 8 up to 256, not {d}"
    if not (q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype):
        return f"q, k, v differ in shape or dtype ({list(q.shape)}, {list(k.shape)}, {list(v.shape)})"
    return None


@functools.lru_cache(maxsize=64)
def _cu_seqlens(n: int, device: torch.device) -> Tensor:
    return torch.tensor([0, n], dtype=torch.int32, device=device)


def _flash_sliding_window(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Flash's local attention: query i sees keys i - window .. i. Batch and heads become the
    heads of one sequence of n tokens: [b, h, n, d] permuted from megatron's [n, b, h, d] is
    [n, b * h, d] without a copy (Flash needs only unit stride over d)."""
    b, h, n, d = q.shape

    def fold(t: Tensor) -> Tensor:
        return t.permute(2, 0, 1, 3).reshape(n, b * h, d)

    cu = _cu_seqlens(n, q.device)
    out = _varlen_attn()(fold(q), fold(k), fold(v), cu, cu, n, n, window_size=(window, 0))
    return out.view(n, b, h, d).permute(1, 2, 0, 3)


# ---- everywhere: blocks of queries against two blocks of keys -------------------------------

def blocked_sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """sliding_window_attention through SDPA on blocks of `window` queries (any device/dtype)."""
    b, h, n, d = q.shape
    blocks = -(-n // window)
    padded = blocks * window
    # Blocks become extra heads: SDPA's fused (memory-efficient) kernels take 4-D inputs only.
    q_blocks = F.pad(q, (0, 0, 0, padded - n)).reshape(b, h * blocks, window, d)

    def two_block_windows(t: Tensor) -> Tensor:
        # Keys/values get one block of padding at the front, so block i sees "block i-1".
        t = F.pad(t, (0, 0, window, padded - n))
        return t.unfold(2, 2 * window, window).transpose(-1, -2).reshape(
            b, h * blocks, 2 * window, d)

    # Query a of a block may see key c of [previous block, own block] iff a <= c <= a + window.
    a = torch.arange(window, device=q.device).view(window, 1)
    c = torch.arange(2 * window, device=q.device).view(1, 2 * window)
    allowed = ((c >= a) & (c <= a + window)).expand(blocks, window, 2 * window).clone()
    allowed[0, :, :window] = False  # block 0 has no previous block
    allowed = allowed.expand(h, blocks, window, 2 * window).reshape(h * blocks, window, 2 * window)
    out = F.scaled_dot_product_attention(q_blocks, two_block_windows(k), two_block_windows(v),
                                         attn_mask=allowed)
    return out.reshape(b, h, padded, d)[:, :, :n]


class SlidingWindowCoreAttention(CoreAttention):
    """Core attention for SelfAttention (mixers/attention.py): each query sees itself and the
    `window` keys before it; a decode step needs only those `window` keys."""

    def __init__(self, config: TransformerConfig, layer_number: int, window: int,
                 softmax_scale: float | None = None, **_unused):
        super().__init__(config, layer_number, softmax_scale)
        self.window = self.cache_length = window

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return sliding_window_attention(q, k, v, self.window)
