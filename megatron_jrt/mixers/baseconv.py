"""BaseConv mixer: y = out_proj(silu(conv(u1)) * u2) with [u1, u2] = in_proj(x).

Channels are split across TP ranks. Like megatron's gated MLP, each rank's slice of in_proj
holds its own [u1, u2] halves; the checkpoint stores the global [u1, u2] layout through
megatron's swiglu sharded-tensor factory, so checkpoints reshard across TP sizes.
The gate silu(conv(u1)) * u2 is kernels.baseconv.gated_causal_conv: one fused Triton kernel on
CUDA that reads in_proj's [s, b, 2c] output in place (no chunk, permute or cat copies) and adds
in_proj's bias as it reads (in_proj skips its add: one elementwise pass over u fewer, forward
and backward); the bias stays in_proj's parameter, so checkpoints are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from megatron.core.parallel_state import get_tensor_model_parallel_rank
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from torch import Tensor, nn

from kernels.baseconv import conv_tail, gated_causal_conv
from megatron_jrt.mixers import MixerOutput


@dataclass
class BaseConvState:
    """The u1 inputs (bias included) of the last k-1 tokens, [b, local channels, k-1], oldest
    first."""

    tail: Tensor


@dataclass
class BaseConvSubmodules:
    in_proj: ModuleSpec | type  # d -> 4d (bias), per rank [u1, u2]
    out_proj: ModuleSpec | type  # 2d -> d (bias)


class BaseConv(MegatronModule):
    """Gated short depthwise causal convolution (kernel 3) from the Based architecture."""

    def __init__(self, config: TransformerConfig, submodules: BaseConvSubmodules,
                 layer_number: int, kernel_size: int, pg_collection=None, **_unused):
        super().__init__(config)
        self.layer_number = layer_number
        self.kernel_size = kernel_size
        tp_group = pg_collection.tp if pg_collection is not None else None
        width = 2 * config.hidden_size
        self.local_width = width // config.tensor_model_parallel_size
        # stride 2: with CPU initialisation each rank keeps its [u1, u2] rows of one master
        # weight, so the model is the same function whatever the TP size (as megatron's MLP).
        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, 2 * width, config=config,
            init_method=config.init_method, gather_output=False, bias=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group, stride=2)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.conv_weight = nn.Parameter(
            torch.empty(self.local_width, 1, kernel_size, device=device, dtype=config.params_dtype))
        self.conv_weight.tensor_model_parallel = True
        self.conv_weight.partition_dim = 0
        self.conv_weight.partition_stride = 1
        if config.perform_initialization:
            self._init_conv_weight(config, width)
        self.out_proj = build_module(
            submodules.out_proj, width, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=True, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group)

    def _init_conv_weight(self, config: TransformerConfig, width: int) -> None:
        """normal(0.02), from a master copy on CPU (like megatron's CPU init), else per-rank RNG."""
        if not config.use_cpu_initialization:
            with get_cuda_rng_tracker().fork():
                nn.init.normal_(self.conv_weight, std=config.init_method_std)
            return
        master = torch.empty(width, 1, self.kernel_size, dtype=torch.float32)
        nn.init.normal_(master, std=config.init_method_std)
        rank = get_tensor_model_parallel_rank()
        local = master[rank * self.local_width:(rank + 1) * self.local_width]
        with torch.no_grad():
            self.conv_weight.copy_(local)

    def _gate(self, hidden_states: Tensor, tail: Tensor | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
        """silu(conv(u1)) * u2 for [s, b, d] inputs after `tail` ([b, channels, k-1] earlier
        biased u1 values; zeros at the start) -> (gated [s, b, channels], in_proj's output u
        without its bias, the bias)."""
        u, bias = self.in_proj(hidden_states)  # [s, b, 2 * local_width]: per rank [u1, u2]
        return gated_causal_conv(u, self.conv_weight, tail, bias), u, bias

    def forward(self, hidden_states: Tensor, attention_mask=None, inference_context=None,
                **kwargs) -> tuple[Tensor, Tensor | None]:
        if inference_context is not None:
            raise NotImplementedError("megatron inference contexts are not supported; "
                                      "use megatron_jrt.inference")
        gated, _, _ = self._gate(hidden_states)
        return self.out_proj(gated)

    # The recurrent interface (megatron_jrt.mixers.RecurrentMixer); the state is BaseConvState.

    def prefill(self, hidden_states: Tensor, *, rotary_pos_emb: Tensor | None = None
                ) -> tuple[MixerOutput, BaseConvState]:
        """The forward over a prompt, and its last k-1 conv inputs. Rotary is ignored."""
        gated, u, bias = self._gate(hidden_states)
        return self.out_proj(gated), BaseConvState(conv_tail(u, self.kernel_size, bias=bias))

    def step(self, hidden_states: Tensor, state: BaseConvState, *,
             rotary_pos_emb: Tensor | None = None) -> tuple[MixerOutput, BaseConvState]:
        """One token per sequence ([1, b, d]) after the conv inputs in `state`."""
        gated, u, bias = self._gate(hidden_states, state.tail)
        return self.out_proj(gated), BaseConvState(conv_tail(u, self.kernel_size, state.tail, bias))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None):
        sharded = {}
        for name, module in self.named_children():
            sub = module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata)
            if name == "in_proj":
                singleton = (metadata or {}).get("singleton_local_shards", False)
                for key in (f"{prefix}in_proj.weight", f"{prefix}in_proj.bias"):
                    sub[key] = apply_swiglu_sharded_factory(sub[key], sharded_offsets, singleton)
            sharded.update(sub)
        own = {"conv_weight": self.conv_weight}
        sharded.update(make_sharded_tensors_for_checkpoint(
            own, prefix, {"conv_weight": 0}, sharded_offsets))
        return sharded
