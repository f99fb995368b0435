"""Hugging Face config of a JRT-RNN model (JRT_SPEC.md section 3), loadable as custom code.

Plain transformers, no megatron import: this file is copied next to the weights.
"""
from __future__ import annotations

from transformers import PretrainedConfig

MIXER_LETTERS = "PSC"  # P prefix linear attention, S sliding-window attention, C BaseConv


class JRTConfig(PretrainedConfig):
    """Architecture of a JRT-RNN model; field names follow megatron_jrt.config.JRTModelConfig."""

    model_type = "jrt"

    def __init__(self, vocab_size: int = 50257, hidden_size: int = 1024, num_layers: int = 26,
                 num_heads: int = 16, layer_pattern: str = "", feature_dim: int = 16,
                 prefix_length: int = 1024, swa_window: int = 128, conv_kernel: int = 3,
                 rotary_base: float = 10000.0, norm_eps: float = 1e-5,
                 max_sequence_length: int = 2048, initializer_range: float = 0.02,
                 use_cache: bool = True, tie_word_embeddings: bool = True,
                 prefill_chunk_tokens: int | None = 4096, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.layer_pattern = layer_pattern or "C" * num_layers
        self.feature_dim = feature_dim
        self.prefix_length = prefix_length
        self.swa_window = swa_window
        self.conv_kernel = conv_kernel
        self.rotary_base = rotary_base
        self.norm_eps = norm_eps
        self.max_sequence_length = max_sequence_length
        self.initializer_range = initializer_range
        self.use_cache = use_cache  # transformers 5.x no longer defines it for us
        # A cached read (generate's prefill) goes through the blocks this many columns at a time,
        # the recurrent cache carried between chunks; 0 or None: one pass (modeling_jrt.JRTModel).
        # Not named prefill_chunk_size: GenerationConfig.from_model_config would copy that into
        # transformers' own chunked prefill, which splits the prompt before read-twice padding
        # and the encoder region (and needs a cache generate does not create for this model).
        self.prefill_chunk_tokens = prefill_chunk_tokens
        if prefill_chunk_tokens is not None and (not isinstance(prefill_chunk_tokens, int)
                                                 or prefill_chunk_tokens < 0):
            raise ValueError(f"config.json: prefill_chunk_tokens {prefill_chunk_tokens!r} must "
                             "be a non-negative int or null (0 or null: read a prompt in one pass)")
        if len(self.layer_pattern) != num_layers or set(self.layer_pattern) - set(MIXER_LETTERS):
            raise ValueError(f"config.json: layer_pattern {self.layer_pattern!r} must have "
                             f"num_layers={num_layers} letters from {MIXER_LETTERS!r}")
        if hidden_size % num_heads:
            raise ValueError(f"config.json: hidden_size {hidden_size} is not divisible by "
                             f"num_heads {num_heads}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
