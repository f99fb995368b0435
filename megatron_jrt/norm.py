"""The layers' RMSNorm: torch.nn.RMSNorm's parameter and init, kernels/rms_norm's kernels.

In the layer specs in place of megatron-core's `WrappedTorchNorm` (which builds a
torch.nn.RMSNorm): the weight keeps its name, shape and init, so checkpoints and the Hugging
Face converter see the same tensors, while forward and backward are one fused kernel each on
CUDA instead of torch's three.
"""
from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig
from torch import Tensor

from kernels.rms_norm import rms_norm
from megatron_jrt.config import ConfigError


def _refuse_unsupported(config: TransformerConfig, persist_layer_norm: bool,
                        zero_centered_gamma: bool, normalization: str | None) -> None:
    """The settings megatron's torch-norm wrapper refuses, refused here by name."""
    unsupported = {
        "layernorm_zero_centered_gamma": (config.layernorm_zero_centered_gamma
                                          or zero_centered_gamma),
        "persist_layer_norm": config.persist_layer_norm or persist_layer_norm,
        "sequence_parallel": config.sequence_parallel,
        "memory_efficient_layer_norm": config.memory_efficient_layer_norm,
    }
    for key, on in unsupported.items():
        if on:
            raise ConfigError(f"{key}: not supported by megatron_jrt.norm.RMSNorm; set it to False")
    for kind in (config.normalization, normalization):
        if kind not in (None, "RMSNorm"):
            raise ConfigError(f"normalization: {kind!r} is not supported by "
                              "megatron_jrt.norm.RMSNorm; use 'RMSNorm'")


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm over the last `hidden_size` features, built the way megatron builds
    norms (`cls(config=..., hidden_size=..., eps=...)`, with the wrapper's optional keywords)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: str | None = None):
        _refuse_unsupported(config, persist_layer_norm, zero_centered_gamma, normalization)
        super().__init__(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
