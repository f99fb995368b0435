"""Softmax attention mixers on megatron-core's SelfAttention: full causal ("A") and the base
that sliding-window attention ("S", mixers/swa.py) shares with it.

SelfAttention keeps doing what it does well (packed qkv, TP sharding, checkpoint layout); only
its `core_attention` differs between the two letters. Its split of the packed qkv and the rotary
embedding run as one kernel each way (kernels/rotary, megatron's math) where megatron's own
path would do exactly that math; any setting outside it (TE's rope fusion, interleaved or
yarn rotary, q/k norms, output gates, context parallelism, ...) takes megatron's
forward unchanged. A core is a function on
[b, heads, s, dh] tensors (`CoreAttention.attend`) plus how many past keys a decode step needs
(`cache_length`: the window for SWA, all of them for full attention). `RecurrentSelfAttention`
builds the recurrent interface (megatron_jrt.mixers.RecurrentMixer) from those two, so the
prefill/step code exists once for both letters.

Full attention runs `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`: on
CUDA in bf16/fp16 PyTorch picks FlashAttention-2 (or the memory-efficient kernel), never an
s x s score matrix in memory; megatron's local `DotProductAttention` would build one (and
hard-codes CUDA). Transformer Engine is not needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from kernels.rotary import split_rotary_qkv
from megatron_jrt.mixers import MixerOutput


class CoreAttention(MegatronModule):
    """The `core_attention` slot of SelfAttention: [s, b, heads, dh] q, k, v -> [s, b, heads*dh].

    Subclasses define `attend` on head-major [b, heads, s, dh] tensors (what SDPA takes) and
    `cache_length`, the keys before the current one that a decode step must still see
    (None: all of them).
    """

    cache_length: int | None = None

    def __init__(self, config: TransformerConfig, layer_number: int,
                 softmax_scale: float | None = None, **_unused):
        super().__init__(config)
        if softmax_scale is not None and abs(softmax_scale - config.kv_channels ** -0.5) > 1e-12:
            raise ValueError(f"{type(self).__name__} uses the standard 1/sqrt(head_dim) scale")
        self.layer_number = layer_number

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of q over k, v ([b, heads, s, dh] each) -> [b, heads, s, dh]."""
        raise NotImplementedError

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, *,
                attn_mask_type=None, attention_bias=None, packed_seq_params=None) -> Tensor:
        # The mask is implied by the core (causal, or a causal band); an explicit one (padding)
        # would be silently wrong here, so it is refused.
        if (attention_mask is not None or attention_bias is not None
                or packed_seq_params is not None):
            raise NotImplementedError(f"{type(self).__name__}: attention masks, attention bias "
                                      "and packed sequences are not supported")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        out = self.attend(q, k, v)
        s, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class CausalCoreAttention(CoreAttention):
    """Full causal softmax attention (layer letter A) through PyTorch's fused SDPA kernels."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@dataclass
class KVCache:
    """Rotated keys and values of the tokens a decode step still sees, [b, heads, t, dh]
    (the last `window` tokens for SWA, every token so far for full attention)."""

    keys: Tensor
    values: Tensor


class RecurrentSelfAttention(SelfAttention):
    """megatron's SelfAttention (training path unchanged) plus its recurrent form.

    The state is a KVCache. Decoding one token costs O(cached keys): constant for SWA, growing
    with the sequence for full attention (as any Transformer's KV cache).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # why this layer's qkv takes megatron's split and rotary instead of kernels/rotary
        self.megatron_rotary_reason = _fused_rotary_unsupported(self)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None,
                key_value_states: Tensor | None = None, inference_context=None,
                rotary_pos_emb: Tensor | None = None, *args, **kwargs) -> MixerOutput:
        """megatron's forward, with the qkv split and rotary fused when nothing else is asked
        (no inference context, packed sequences, cos/sin or bias arguments)."""
        if (self.megatron_rotary_reason is not None or key_value_states is not None
                or inference_context is not None or not isinstance(rotary_pos_emb, Tensor)
                or args or any(value is not None for value in kwargs.values())):
            return super().forward(hidden_states, attention_mask, key_value_states,
                                   inference_context, rotary_pos_emb, *args, **kwargs)
        query, key, value = self._split_rotated(hidden_states, rotary_pos_emb)
        return self.linear_proj(self.core_attention(query, key, value, attention_mask))

    def _split_rotated(self, hidden_states: Tensor, rotary_freqs: Tensor) -> tuple[Tensor, ...]:
        """Rotated q, k and v, [s, b, heads, d] each, as megatron's forward makes them."""
        if self.megatron_rotary_reason is not None:
            query, key, value = self.get_query_key_value_tensors(hidden_states, None)
            return (apply_rotary_pos_emb(query, rotary_freqs, config=self.config),
                    apply_rotary_pos_emb(key, rotary_freqs, config=self.config), value)
        mixed, _ = self.linear_qkv(hidden_states)
        return split_rotary_qkv(mixed, rotary_freqs, self.num_query_groups_per_partition,
                                self.hidden_size_per_attention_head)

    def _rotated_qkv(self, hidden_states: Tensor, rotary_freqs: Tensor) -> list[Tensor]:
        return [t.permute(1, 2, 0, 3)  # [b, h, s, d]
                for t in self._split_rotated(hidden_states, rotary_freqs)]

    def _output(self, out: Tensor) -> MixerOutput:
        b, h, s, d = out.shape
        return self.linear_proj(out.permute(2, 0, 1, 3).reshape(s, b, h * d))

    def _cache(self, keys: Tensor, values: Tensor) -> KVCache:
        length = self.core_attention.cache_length
        if length is None:
            return KVCache(keys, values)
        return KVCache(keys[:, :, -length:], values[:, :, -length:])

    # The recurrent interface (megatron_jrt.mixers.RecurrentMixer); the state is a KVCache.

    def prefill(self, hidden_states: Tensor, *, rotary_pos_emb: Tensor
                ) -> tuple[MixerOutput, KVCache]:
        """The forward over a prompt ([s, b, d], rotary for positions 0..s-1) and its cache."""
        q, k, v = self._rotated_qkv(hidden_states, rotary_pos_emb)
        return self._output(self.core_attention.attend(q, k, v)), self._cache(k, v)

    def step(self, hidden_states: Tensor, state: KVCache, *,
             rotary_pos_emb: Tensor) -> tuple[MixerOutput, KVCache]:
        """One token ([1, b, d], rotary for its position): attend to the cache and itself."""
        q, k, v = self._rotated_qkv(hidden_states, rotary_pos_emb)
        keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
        out = F.scaled_dot_product_attention(q, keys, values)  # every cached key is visible
        return self._output(out), self._cache(keys, values)


def _fused_rotary_unsupported(attention: SelfAttention) -> str | None:
    """Why kernels/rotary would not compute what megatron's forward computes for this layer, or
    None: the setting that differs from plain bshd rotary on a packed per-group qkv."""
    config = attention.config
    settings = {
        "apply_rope_fusion": config.apply_rope_fusion,
        "fused_single_qkv_rope": getattr(config, "fused_single_qkv_rope", False),
        "rotary_interleaved": config.rotary_interleaved,
        "multi_latent_attention": config.multi_latent_attention,
        "mrope_section": getattr(config, "mrope_section", None) is not None,
        "yarn_rotary_scaling_factor": hasattr(config, "yarn_rotary_scaling_factor"),
        "no_rope_freq": bool(getattr(config, "no_rope_freq", None)),
        "attention_output_gate": getattr(config, "attention_output_gate", False),
        "context_parallel_size": config.context_parallel_size > 1,
        "num_query_groups": config.num_query_groups < attention.world_size,
        "checkpoint_core_attention": attention.checkpoint_core_attention,
        "q_layernorm": not isinstance(attention.q_layernorm, (type(None), IdentityOp)),
        "k_layernorm": not isinstance(attention.k_layernorm, (type(None), IdentityOp)),
    }
    settings.update({name: getattr(attention, name, False) for name in
                     ("offload_qkv_linear", "offload_core_attention", "offload_attn_proj")})
    return next((name for name, differs in settings.items() if differs), None)
