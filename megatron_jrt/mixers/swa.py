"""Sliding-window softmax attention as the core attention of megatron-core's SelfAttention.

SelfAttention keeps doing what it does well (packed qkv, rotary, TP sharding, checkpoint
layout); only the core changes: each query sees itself and the `window` keys before it.
Queries are processed in blocks of `window`; a block needs its own keys and the previous
block's, so memory and time are O(N * window), never O(N^2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_jrt.mixers import MixerOutput


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention over the last `window` keys plus self. q, k, v: [b, h, n, d] -> [b, h, n, d]."""
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


class SlidingWindowCoreAttention(MegatronModule):
    """Drop-in `core_attention` for SelfAttention: [s, b, heads, d] inputs -> [s, b, heads*d]."""

    def __init__(self, config: TransformerConfig, layer_number: int, window: int,
                 softmax_scale: float | None = None, **_unused):
        super().__init__(config)
        if softmax_scale is not None and abs(softmax_scale - config.kv_channels ** -0.5) > 1e-12:
            raise ValueError("sliding-window attention uses the standard 1/sqrt(head_dim) scale")
        self.layer_number = layer_number
        self.window = window

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, *,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = sliding_window_attention(q, k, v, self.window)
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


@dataclass
class SlidingWindowState:
    """The rotated keys and values of the last `window` tokens, [b, heads, <= window, d]."""

    keys: torch.Tensor
    values: torch.Tensor


class SlidingWindowSelfAttention(SelfAttention):
    """megatron's SelfAttention (training path unchanged) plus its recurrent form."""

    def _rotated_qkv(self, hidden_states: Tensor, rotary_freqs: Tensor) -> list[Tensor]:
        query, key, value = self.get_query_key_value_tensors(hidden_states, None)
        query = apply_rotary_pos_emb(query, rotary_freqs, config=self.config)
        key = apply_rotary_pos_emb(key, rotary_freqs, config=self.config)
        return [t.permute(1, 2, 0, 3) for t in (query, key, value)]  # [b, h, s, d]

    def _output(self, out: Tensor) -> MixerOutput:
        b, h, s, d = out.shape
        return self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, h * d))

    # The recurrent interface (megatron_jrt.mixers.RecurrentMixer); the state is
    # SlidingWindowState.

    def prefill(self, hidden_states: Tensor, *, rotary_pos_emb: Tensor
                ) -> tuple[MixerOutput, SlidingWindowState]:
        """The forward over a prompt ([s, b, d], rotary for positions 0..s-1) and its cache."""
        q, k, v = self._rotated_qkv(hidden_states, rotary_pos_emb)
        window = self.core_attention.window
        out = sliding_window_attention(q, k, v, window)
        return self._output(out), SlidingWindowState(k[:, :, -window:], v[:, :, -window:])

    def step(self, hidden_states: Tensor, state: SlidingWindowState, *,
             rotary_pos_emb: Tensor) -> tuple[MixerOutput, SlidingWindowState]:
        """One token ([1, b, d], rotary for its position): attend to the cache and itself."""
        q, k, v = self._rotated_qkv(hidden_states, rotary_pos_emb)
        keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)  # every cached key is visible
        window = self.core_attention.window
        return self._output(out), SlidingWindowState(keys[:, :, -window:], values[:, :, -window:])
