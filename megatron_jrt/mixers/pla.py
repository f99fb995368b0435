"""Prefix linear attention (PLA) as a megatron-core mixer for the self-attention slot.

Per head: q, k (f dims) and v (dv dims) for every token; k_enc, v_enc for the first M tokens
only, summed into the encoder state that the causal Taylor linear attention starts from
(JRT_SPEC.md section 2). Projections are column-parallel and grouped by head, so a TP rank
holds whole heads and checkpoints reshard with the standard column/row rules.

With prefix length 0 (the Based baseline) there is no encoder: no k_enc/v_enc projection is
built and the state starts at zero, which makes PLA causal Taylor linear attention. The kernels
take an empty encoder region as that zero state, so both cases run the same dispatcher.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from kernels.pla import PLAState, pla_decode_step, pla_prefill, prefix_linear_attention
from megatron_jrt.mixers import MixerOutput


@dataclass
class PrefixLinearAttentionSubmodules:
    linear_qkv: ModuleSpec | type  # d -> H * (f + f + dv), per head [q, k, v]
    # d -> H * (f + dv), per head [k_enc, v_enc]; not built when the prefix length is 0
    linear_kv_enc: ModuleSpec | type
    linear_proj: ModuleSpec | type  # H * dv -> d


class PrefixLinearAttention(MegatronModule):
    """y_i = phi(q_i)[S_e + sum_{j<=i} phi(k_j) v_j^T] / (phi(q_i).[z_e + sum_{j<=i} phi(k_j)])."""

    def __init__(self, config: TransformerConfig, submodules: PrefixLinearAttentionSubmodules,
                 layer_number: int, feature_dim: int, prefix_length: int,
                 pg_collection=None, **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        self.feature_dim = feature_dim
        self.prefix_length = prefix_length
        self.head_dim = config.kv_channels
        tp_size = config.tensor_model_parallel_size
        self.local_heads = config.num_attention_heads // tp_size
        tp_group = pg_collection.tp if pg_collection is not None else None
        heads = config.num_attention_heads
        column = dict(config=config, init_method=config.init_method, gather_output=False,
                      bias=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name=None,
                      tp_group=tp_group)
        self.linear_qkv = build_module(submodules.linear_qkv, config.hidden_size,
                                       heads * (2 * feature_dim + self.head_dim), **column)
        self.linear_kv_enc = None if prefix_length == 0 else build_module(
            submodules.linear_kv_enc, config.hidden_size, heads * (feature_dim + self.head_dim),
            **column)
        self.linear_proj = build_module(
            submodules.linear_proj, heads * self.head_dim, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=False, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group)

    def _heads(self, projected: Tensor, sizes: list[int]) -> list[Tensor]:
        """[s, b, local_heads * sum(sizes)] -> one [b, heads, s, size] tensor per size."""
        s, b, _ = projected.shape
        per_head = projected.view(s, b, self.local_heads, sum(sizes))
        return [t.permute(1, 2, 0, 3) for t in per_head.split(sizes, dim=-1)]

    def _project(self, hidden_states: Tensor) -> list[Tensor]:
        """q, k, v for every token and k_enc, v_enc for the prefix, each [b, heads, s, dim]
        (k_enc, v_enc are empty without an encoder)."""
        f, dv = self.feature_dim, self.head_dim
        qkv, _ = self.linear_qkv(hidden_states)
        q, k, v = self._heads(qkv, [f, f, dv])
        if self.linear_kv_enc is None:
            return [q, k, v, k[:, :, :0], v[:, :, :0]]
        prefix = min(self.prefix_length, hidden_states.shape[0])
        kv_enc, _ = self.linear_kv_enc(hidden_states[:prefix])
        return [q, k, v] + self._heads(kv_enc, [f, dv])

    def _output(self, y: Tensor) -> MixerOutput:
        """[b, heads, s, dv] -> the output projection's (output, bias)."""
        b, h, s, dv = y.shape
        return self.linear_proj(y.permute(2, 0, 1, 3).reshape(s, b, h * dv))

    def forward(self, hidden_states: Tensor, attention_mask=None, inference_context=None,
                **kwargs) -> tuple[Tensor, Tensor | None]:
        if inference_context is not None:
            raise NotImplementedError("megatron inference contexts are not supported; "
                                      "use megatron_jrt.inference")
        return self._output(prefix_linear_attention(*self._project(hidden_states)))

    # The recurrent interface (megatron_jrt.mixers.RecurrentMixer); the state is PLAState.

    def prefill(self, hidden_states: Tensor, *, rotary_pos_emb: Tensor | None = None
                ) -> tuple[MixerOutput, PLAState]:
        """The forward over a prompt ([s, b, d], s >= the prefix length), and the fp32 state
        (S, z per head) after its last token. PLA has no positions: rotary is ignored."""
        y, state = pla_prefill(*self._project(hidden_states))
        return self._output(y), state

    def step(self, hidden_states: Tensor, state: PLAState, *,
             rotary_pos_emb: Tensor | None = None) -> tuple[MixerOutput, PLAState]:
        """One token per sequence ([1, b, d]) after the prefix; updates `state` in place."""
        f, dv = self.feature_dim, self.head_dim
        qkv, _ = self.linear_qkv(hidden_states)
        q, k, v = (t[:, :, 0] for t in self._heads(qkv, [f, f, dv]))  # [b, heads, dim]
        y = pla_decode_step(q, k, v, state)
        return self._output(y.unsqueeze(2)), state
