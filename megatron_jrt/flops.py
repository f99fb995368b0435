"""Model FLOPs of JRT-RNN (and its baselines) per token, counted layer by layer as the layers
compute them.

The count feeds TFLOP/s and MFU in the training log (`metrics.py`); the full formula with every
term is written out in docs/METRICS.md. Conventions:

- 2 FLOPs per multiply-add; an elementwise product (gating) or add (state z) is 1 FLOP.
- Counted: every matmul / contraction, the depthwise conv, the gating products, the PLA feature
  map (the f^2 outer product) and state arithmetic. Not counted: norms, activations, softmax,
  rotary, residual adds, biases, the embedding lookup (as in Megatron-LM's and PaLM's MFU).
- Training = 3 x forward (backward = 2 x forward); activation recomputation is *not* counted,
  so MFU stays comparable between runs with and without `training.recompute`.
- PLA is counted as the recurrent algorithm computes it (state update and readout per token,
  plus the encoder reduction over the prefix). The chunked kernel trades some of that for an
  intra-chunk quadratic term; docs/METRICS.md gives that variant too, but it is not what we count.
- Softmax attention (SWA and full) counts the keys each query sees: full causal attention the
  causal half, (L + 1) / 2 keys on average, which is what FlashAttention's causal kernels
  compute (they skip the blocks above the diagonal).
- The LM head runs against the padded vocabulary (rows that exist and are multiplied).
"""
from __future__ import annotations

from megatron_jrt.config import ATTENTION, BASECONV, PLA, SWA, JRTModelConfig


def swa_mean_keys(seq_length: int, window: int) -> float:
    """Mean over positions 0..L-1 of the keys a query sees: min(window + 1, position + 1)."""
    band = min(seq_length, window + 1)
    total = band * (band + 1) // 2 + (seq_length - band) * (window + 1)
    return total / seq_length


def mlp_flops(cfg: JRTModelConfig) -> float:
    d = cfg.hidden_size
    return 2 * d * 4 * d + 2 * d + 2 * 2 * d * d  # fc1, silu(gate) * value, fc2


def pla_flops(cfg: JRTModelConfig, seq_length: int) -> float:
    d, h, f, dv = cfg.hidden_size, cfg.num_heads, cfg.feature_dim, cfg.head_dim
    D = 1 + f + f * f  # Taylor feature dimension
    prefix_share = min(cfg.prefix_length, seq_length) / seq_length  # encoder runs on M tokens
    projections = (2 * d * h * (2 * f + dv)  # q, k, v
                   + prefix_share * 2 * d * h * (f + dv)  # k_enc, v_enc on the prefix only
                   + 2 * d * d)  # output projection
    per_head = (2 * f * f  # phi(q), phi(k): the outer products
                + 2 * D * dv + D  # S += phi(k) v^T, z += phi(k)
                + 2 * D * dv + 2 * D + dv  # phi(q) S, phi(q).z, the division
                + prefix_share * (f * f + 2 * D * dv + D))  # encoder: phi(k_e), S_e, z_e
    return projections + h * per_head


def softmax_attention_flops(cfg: JRTModelConfig, mean_keys: float) -> float:
    """qkv, output projection, and QK^T and AV over `mean_keys` keys per query."""
    d = cfg.hidden_size
    return 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * mean_keys


def swa_flops(cfg: JRTModelConfig, seq_length: int) -> float:
    return softmax_attention_flops(cfg, swa_mean_keys(seq_length, cfg.swa_window))


def attention_flops(cfg: JRTModelConfig, seq_length: int) -> float:
    """Full causal attention: query i sees i + 1 keys, (L + 1) / 2 on average."""
    return softmax_attention_flops(cfg, (seq_length + 1) / 2)


def baseconv_flops(cfg: JRTModelConfig) -> float:
    d = cfg.hidden_size
    return (2 * d * 4 * d  # in_proj
            + 2 * 2 * d * cfg.conv_kernel  # depthwise conv on u1 (2d channels)
            + 2 * d  # silu(conv(u1)) * u2
            + 2 * 2 * d * d)  # out_proj


def lm_head_flops(cfg: JRTModelConfig) -> float:
    return 2 * cfg.hidden_size * cfg.padded_vocab_size()


def flops_per_token(cfg: JRTModelConfig, seq_length: int, *, training: bool = True) -> float:
    """Model FLOPs per token of a length-`seq_length` sequence (x3 when `training`)."""
    if seq_length <= 0:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    mixer = {PLA: pla_flops(cfg, seq_length), SWA: swa_flops(cfg, seq_length),
             BASECONV: baseconv_flops(cfg), ATTENTION: attention_flops(cfg, seq_length)}
    forward = sum(mixer[letter] + mlp_flops(cfg) for letter in cfg.layer_pattern)
    forward += lm_head_flops(cfg)
    return 3.0 * forward if training else float(forward)


# Dense (no sparsity) tensor-core peaks, FLOP/s, per device: (name fragments, bf16/fp16, tf32).
_PEAKS = [
    (("H100", "PCIE"), 756e12, 378e12),
    (("H100", "NVL"), 835e12, 418e12),
    (("H100",), 989e12, 494.5e12),  # SXM
    (("H200",), 989e12, 494.5e12),
    (("GH200",), 989e12, 494.5e12),
    (("A100",), 312e12, 156e12),
]


def peak_flops_per_device(dtype: str) -> float | None:
    """The current CUDA device's dense peak for `dtype` ("bf16", "fp16", "tf32"/"fp32"), or None.

    None (unknown GPU, CPU, other dtype) makes MFU show as "n/a" rather than a guess.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().upper()
    dtype = dtype.lower()
    for fragments, half, tf32 in _PEAKS:
        if all(fragment in name for fragment in fragments):
            if dtype in ("bf16", "bfloat16", "fp16", "float16"):
                return half
            if dtype in ("tf32", "fp32", "float32"):
                return tf32
            return None
    return None


__all__ = ["flops_per_token", "peak_flops_per_device", "swa_mean_keys", "mlp_flops",
           "pla_flops", "swa_flops", "attention_flops", "softmax_attention_flops",
           "baseconv_flops", "lm_head_flops"]
