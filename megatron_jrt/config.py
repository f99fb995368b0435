"""JRT-RNN model hyper-parameters, the paper's presets, and their translation to megatron-core.

The spec (`JRT_SPEC.md` section 3) fixes the architecture; this module is the one place that
turns a preset name or a user override into a validated `JRTModelConfig`, and that into the
`TransformerConfig` megatron-core's layers read.

The paper's two baselines are presets of the same config, so they share data, trainer,
checkpoints and decoder with JRT-RNN: Based is the JRT layer pattern with `prefix_length` 0
(its PLA layers then are causal Taylor linear attention, no MLM term), Transformer++ is every
layer full causal attention (`A`) with `prefix_length` 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# One letter per layer in `layer_pattern`.
PLA, SWA, BASECONV, ATTENTION = "P", "S", "C", "A"
MIXER_NAMES = {PLA: "prefix linear attention", SWA: "sliding-window attention",
               BASECONV: "BaseConv", ATTENTION: "full causal attention"}


def pattern_from_indices(num_layers: int, pla_layers: list[int], swa_layers: list[int]) -> str:
    """Pattern string with PLA/SWA at the given 0-based indices and BaseConv elsewhere."""
    pattern = [BASECONV] * num_layers
    for i in pla_layers:
        pattern[i] = PLA
    for i in swa_layers:
        pattern[i] = SWA
    return "".join(pattern)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what to do."""


@dataclass
class JRTModelConfig:
    """Architecture of one JRT-RNN (or baseline) model; defaults are the spec's."""

    hidden_size: int
    num_layers: int
    num_heads: int
    layer_pattern: str
    vocab_size: int = 50264
    feature_dim: int = 16  # Taylor feature map input dim f (per head) of PLA
    # M: tokens read non-causally by the PLA encoder and trained with MLM. 0: no encoder, a
    # causal model trained with next-token prediction only (the Based and Transformer baselines).
    prefix_length: int = 1024
    swa_window: int = 128  # keys before the query that sliding-window attention sees
    conv_kernel: int = 3
    rotary_base: int = 10000
    norm_eps: float = 1e-5
    init_std: float = 0.02
    max_sequence_length: int = 2048
    # Round the embedding table up to a multiple of this. Unlike Megatron-LM the padding does
    # not grow with the TP size, so one checkpoint loads under any TP layout.
    make_vocab_size_divisible_by: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> None:
        """Raise ConfigError naming the offending key when the architecture cannot be built."""
        def fail(key: str, message: str) -> None:
            raise ConfigError(f"model.{key}: {message}")

        for key in ("hidden_size", "num_layers", "num_heads", "vocab_size", "feature_dim",
                    "swa_window", "conv_kernel", "max_sequence_length"):
            if getattr(self, key) <= 0:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if self.prefix_length < 0:
            fail("prefix_length", f"must be >= 0 (0: a causal model without encoder), got "
                                  f"{self.prefix_length}")
        if self.hidden_size % self.num_heads:
            fail("num_heads", f"hidden_size {self.hidden_size} is not divisible by num_heads "
                              f"{self.num_heads}")
        if len(self.layer_pattern) != self.num_layers:
            fail("layer_pattern", f"has {len(self.layer_pattern)} letters but num_layers is "
                                  f"{self.num_layers}; give one of {sorted(MIXER_NAMES)} per layer")
        unknown = set(self.layer_pattern) - set(MIXER_NAMES)
        if unknown:
            known = ", ".join(f"{letter} ({name})" for letter, name in MIXER_NAMES.items())
            fail("layer_pattern", f"unknown letters {sorted(unknown)}; use {known}")
        if self.prefix_length and PLA not in self.layer_pattern:
            # Only PLA reads the prefix non-causally; without it the MLM term would train a
            # causal model to fill in tokens it cannot see around.
            fail("prefix_length", f"{self.prefix_length}, but layer_pattern has no {PLA} layer to "
                                  "read a prefix; set prefix_length 0 (causal, next-token only)")
        if self.prefix_length > self.max_sequence_length:
            fail("prefix_length", f"{self.prefix_length} is longer than max_sequence_length "
                                  f"{self.max_sequence_length}")
        if self.num_heads % tensor_parallel:
            fail("num_heads", f"{self.num_heads} heads cannot be split over tensor_parallel="
                              f"{tensor_parallel}; choose a TP size that divides it")
        if self.padded_vocab_size() % tensor_parallel:
            fail("make_vocab_size_divisible_by", f"the padded vocabulary ({self.padded_vocab_size()}) "
                 f"cannot be split over tensor_parallel={tensor_parallel}; use a multiple of it")
        if self.num_layers % pipeline_parallel:
            fail("num_layers", f"{self.num_layers} layers cannot be split evenly over "
                               f"pipeline_parallel={pipeline_parallel}")

    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // multiple) * multiple

    def to_transformer_config(
        self,
        *,
        tensor_parallel: int = 1,
        pipeline_parallel: int = 1,
        params_dtype: torch.dtype = torch.float32,
        bf16: bool = False,
        recompute_granularity: str | None = None,
        fusions: bool = False,
        **overrides,
    ):
        """The megatron-core TransformerConfig shared by every layer of the model.

        `fusions` turns on megatron's fused kernels that need neither apex nor Transformer
        Engine (torch.compile'd, `megatron.core.jit`): the SwiGLU of every MLP (forward and
        backward one kernel each, only its input saved); the residual add with a mixer's
        output bias (BaseConv's out_proj: output + bias + residual in one kernel, not two
        passes); and, in bf16, megatron's native cross-entropy fusion flag, which JRTModel
        answers with kernels/cross_entropy's Triton kernels (one read of the bf16 logits
        forward, one read and an in-place gradient write backward; megatron's own would make
        fp32 copies). The others do not apply: no masked softmax, and the RoPE and norm fusions
        need TE or apex.
        """
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.validate(tensor_parallel, pipeline_parallel)
        fused = {}
        if fusions:
            fused.update(bias_activation_fusion=True, bias_dropout_fusion=True)
            if bf16:
                fused.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
        recompute = {}
        if recompute_granularity == "full":
            recompute = dict(recompute_granularity="full", recompute_method="uniform",
                             recompute_num_layers=1)
        elif recompute_granularity is not None:
            raise ConfigError(f"recompute_granularity: {recompute_granularity!r} is not one of "
                              "None, 'full'")
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_heads,
            kv_channels=self.head_dim,
            ffn_hidden_size=2 * self.hidden_size,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_eps,
            init_method_std=self.init_std,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            apply_rope_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            pipeline_dtype=params_dtype,
            params_dtype=params_dtype,
            bf16=bf16,
            use_cpu_initialization=not torch.cuda.is_available(),
            **recompute,
            **{**fused, **overrides},
        )

    def replace(self, **changes) -> "JRTModelConfig":
        return dataclasses.replace(self, **changes)


def _preset(hidden: int, layers: int, heads: int, pla: list[int], swa: list[int], **kw) -> JRTModelConfig:
    return JRTModelConfig(hidden_size=hidden, num_layers=layers, num_heads=heads,
                          layer_pattern=pattern_from_indices(layers, pla, swa), **kw)


PRESETS: dict[str, JRTModelConfig] = {
    # The paper's models (JRT_SPEC.md section 3).
    "jrt-360m": _preset(1024, 26, 16, [1, 6, 11, 16, 21], [2, 7, 12, 17, 22]),
    "jrt-1.3b": _preset(1792, 36, 16, [1, 6, 11, 16, 21, 27, 33], [2, 7, 12, 17, 22, 28, 34]),
    # Not the paper's: the 360M's layout (PLA, SWA, three BaseConv, repeated) at GPT-2 small's
    # width, for a minutes-long comparison at equal tokens (evals/experiments/lm_quality.py).
    # 130,411,776 parameters with a 32000 vocabulary (Transformer++ 118,973,184).
    "jrt-125m": _preset(768, 16, 12, [1, 6, 11], [2, 7, 12]),
    # Small models with every mixer, for the CPU demo and the tests.
    "jrt-demo": _preset(256, 6, 4, [1, 4], [2, 5], prefix_length=128, swa_window=64,
                        max_sequence_length=256),
    "jrt-tiny": _preset(64, 4, 4, [1], [2], prefix_length=16, swa_window=8,
                        max_sequence_length=64),
}


def _baselines(jrt_presets: dict[str, JRTModelConfig]) -> dict[str, JRTModelConfig]:
    """The paper's baselines of every JRT preset, equal in width, depth, heads, MLP and vocab:
    `based-*` (the JRT pattern, causal) and `transformer-*` (every layer full attention)."""
    baselines = {}
    for name, jrt in jrt_presets.items():
        size = name.removeprefix("jrt-")
        baselines[f"based-{size}"] = jrt.replace(prefix_length=0)
        baselines[f"transformer-{size}"] = jrt.replace(
            prefix_length=0, layer_pattern=ATTENTION * jrt.num_layers)
    return baselines


PRESETS.update(_baselines(PRESETS))


def preset(name: str, **overrides) -> JRTModelConfig:
    """A copy of the named preset with `overrides` applied."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


__all__ = ["JRTModelConfig", "ConfigError", "PRESETS", "preset", "pattern_from_indices",
           "PLA", "SWA", "BASECONV", "ATTENTION"]
