"""`training.compile`: torch.compile below the layer level, where inductor fuses and traces cleanly.

Eager, every elementwise op of a layer is its own kernel and its own pass over [s, b, width]
activations: the SwiGLU's silu, product and the backward's products and concatenation, the
rotary embedding of full attention. Compiled, each of these parts becomes a few fused kernels
forward and backward, and AOTAutograd saves fewer activations.

What is compiled, per layer: the MLP; the whole mixer for full attention (`A`: qkv split,
rotary, SDPA, output projection). Not compiled, and why:
  * whole layers and the sliding-window mixer (`S`): on CPU inductor's code for the blocked
    sliding-window path aborts the process in its backward (torch 2.13), and on CUDA that
    path is FlashAttention's varlen kernel behind Python checks;
  * PLA and BaseConv: their work is in (or moving to) Triton kernels, which compile would only
    wrap; the glue around them is small;
  * the norms (megatron_jrt.norm): one fused Triton kernel each way already (kernels/rms_norm).
Modules are compiled in place (`nn.Module.compile`), so parameter names and checkpoints are
unchanged. Layers of the same kind share one compiled graph: the compile cost is per kind of
module, not per layer.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from megatron_jrt.config import ATTENTION, JRTModelConfig

_LAYER_PARTS = ("mlp",)


def compile_model(model: nn.Module, cfg: JRTModelConfig) -> list[str]:
    """Compile in place the parts of `model` (one pipeline stage of `cfg`) named in the module
    docstring; returns their qualified names. Compilation itself happens at the first step."""
    # megatron's RowParallelLinear warns about a deprecated argument on every call of rank 0;
    # a warning inside a compiled region would split its graph there.
    torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)
    names = []
    for index, layer in enumerate(model.decoder.layers):
        parts = list(_LAYER_PARTS)
        if cfg.layer_pattern[layer.layer_number - 1] == ATTENTION:
            parts.append("self_attention")
        for part in parts:
            layer.get_submodule(part).compile()
            names.append(f"decoder.layers.{index}.{part}")
    return names
