"""The state a model must keep per sequence to go on generating: the x axis of the recall plots.

Counted as the papers (Based, JRT; zoology's `state_size`) count it, in numbers per sequence:
- PLA / Taylor linear attention (P): per head the numerator S, (1 + f + f^2) x head_dim, and the
  denominator z, (1 + f + f^2); JRT-RNN and Based have the same state (JRT's encoder reads
  the prefix *into* it), so the feature dim f and the width move it, the prefix does not.
- BaseConv (C): the last kernel-1 inputs of its 2d conv channels.
- sliding-window attention (S): keys and values of the last min(window, n) tokens.
- full attention (A): the KV cache, keys and values of all n tokens: it grows with the
  sequence, so a Transformer's "state" is given at a sequence length n.
"""
from __future__ import annotations

from megatron_jrt.config import ATTENTION, BASECONV, PLA, SWA, JRTModelConfig


def state_size(cfg: JRTModelConfig, seq_length: int) -> int:
    """Numbers a decoder keeps per sequence after reading `seq_length` tokens, all layers."""
    d, heads = cfg.hidden_size, cfg.num_heads
    features = 1 + cfg.feature_dim + cfg.feature_dim ** 2
    per_layer = {
        PLA: heads * features * (cfg.head_dim + 1),
        BASECONV: (cfg.conv_kernel - 1) * 2 * d,
        SWA: 2 * min(cfg.swa_window, seq_length) * d,
        ATTENTION: 2 * seq_length * d,
    }
    return sum(per_layer[letter] for letter in cfg.layer_pattern)
