"""megatron-core layer specs for JRT-RNN: the layer pattern as data.

Every layer is megatron-core's TransformerLayer (pre-norm RMSNorm -> mixer -> residual ->
RMSNorm -> gated MLP -> residual); only the module in the self-attention slot differs. The
norms are megatron_jrt.norm's (torch.nn.RMSNorm's weight, fused kernels on CUDA).
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_jrt.config import ATTENTION, BASECONV, PLA, SWA, JRTModelConfig
from megatron_jrt.mixers.attention import CausalCoreAttention, RecurrentSelfAttention
from megatron_jrt.mixers.baseconv import BaseConv, BaseConvSubmodules
from megatron_jrt.mixers.pla import PrefixLinearAttention, PrefixLinearAttentionSubmodules
from megatron_jrt.mixers.swa import SlidingWindowCoreAttention
from megatron_jrt.norm import RMSNorm

# apex / Transformer Engine would be picked here; the local provider needs neither.
_BACKEND = LocalSpecProvider()


def mixer_spec(kind: str, cfg: JRTModelConfig) -> ModuleSpec:
    """The module in the self-attention slot for one letter of the layer pattern."""
    column, row = _BACKEND.column_parallel_linear(), _BACKEND.row_parallel_linear()
    if kind == PLA:
        return ModuleSpec(
            module=PrefixLinearAttention,
            params={"feature_dim": cfg.feature_dim, "prefix_length": cfg.prefix_length},
            submodules=PrefixLinearAttentionSubmodules(
                linear_qkv=column, linear_kv_enc=column, linear_proj=row),
        )
    if kind in (SWA, ATTENTION):
        core = (ModuleSpec(module=SlidingWindowCoreAttention, params={"window": cfg.swa_window})
                if kind == SWA else CausalCoreAttention)
        return ModuleSpec(
            module=RecurrentSelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=SelfAttentionSubmodules(
                linear_qkv=column, core_attention=core, linear_proj=row,
                q_layernorm=IdentityOp, k_layernorm=IdentityOp),
        )
    if kind == BASECONV:
        return ModuleSpec(module=BaseConv, params={"kernel_size": cfg.conv_kernel},
                          submodules=BaseConvSubmodules(in_proj=column, out_proj=row))
    raise ValueError(f"unknown mixer letter {kind!r}")


def layer_spec(kind: str, cfg: JRTModelConfig) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=mixer_spec(kind, cfg),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=get_mlp_module_spec_for_backend(_BACKEND),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(cfg: JRTModelConfig, transformer_config, pp_rank: int | None = None
               ) -> TransformerBlockSubmodules:
    """Specs of the layers this pipeline stage builds (all of them without PP)."""
    layers = [layer_spec(kind, cfg) for kind in cfg.layer_pattern]
    per_stage = cfg.num_layers // transformer_config.pipeline_model_parallel_size
    offset = get_transformer_layer_offset(transformer_config, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=layers[offset:offset + per_stage],
                                      layer_norm=RMSNorm)
