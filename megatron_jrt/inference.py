"""Recurrent inference: prefill a prompt in parallel, then decode in O(1) time per token.

Each mixer hands its state from the prefill to the decoder (JRT_SPEC.md section 5): PLA its
(S, z) per head, sliding-window attention the rotated keys/values of the last `window`
tokens, BaseConv the last k-1 conv inputs. The decoder runs megatron-core's own modules
(embedding, norms, MLPs, output layer) and needs the whole model on this rank (no PP; TP ok).
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import Tensor

from megatron_jrt.mixers.swa import SlidingWindowSelfAttention


class RecurrentDecoder:
    """`prefill(prompt)` then `step(token)` repeatedly; both return next-token logits [b, V]."""

    def __init__(self, model, prefix_length: int):
        if not (model.pre_process and model.post_process):
            raise ValueError("recurrent decoding needs the whole model on one rank "
                             "(pipeline_parallel = 1)")
        self.model, self.prefix_length = model, prefix_length
        self.states: list[Any] = []
        self.position = 0

    def _rotary(self, length: int, offset: int) -> Tensor:
        return self.model.rotary_pos_emb(length, offset=offset)

    def _run(self, input_ids: Tensor, mixer_call) -> Tensor:
        """Embed, run every layer with `mixer_call(index, mixer, x)`, return last logits."""
        positions = torch.arange(self.position, self.position + input_ids.shape[1],
                                 device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        hidden = self.model.embedding(input_ids=input_ids, position_ids=positions)
        for index, layer in enumerate(self.model.decoder.layers):
            out, bias = mixer_call(index, layer.self_attention, layer.input_layernorm(hidden))
            hidden = hidden + (out if bias is None else out + bias)
            out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + (out if bias is None else out + bias)
        hidden = self.model.decoder.final_layernorm(hidden[-1:])
        logits, _ = self.model.output_layer(
            hidden, weight=self.model.shared_embedding_or_output_weight())
        return gather_from_tensor_model_parallel_region(logits)[0].float()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Read a [b, n] prompt (n >= prefix length: its first M tokens are the encoder region)."""
        if input_ids.shape[1] < self.prefix_length:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens is shorter than the prefix length "
                f"{self.prefix_length}; pad it first (megatron_jrt.generate.read_twice_pad)")
        self.position, self.states = 0, []
        rotary = self._rotary(input_ids.shape[1], offset=0)

        def prefill_mixer(index, mixer, x):
            if isinstance(mixer, SlidingWindowSelfAttention):  # needs positions for rotary
                output, state = mixer.prefill(x, rotary)
            else:
                output, state = mixer.prefill(x)
            self.states.append(state)
            return output

        logits = self._run(input_ids, prefill_mixer)
        self.position = input_ids.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token_ids: Tensor) -> Tensor:
        """Read one token per sequence ([b]) and return the logits that follow it."""
        if not self.states:
            raise RuntimeError("call prefill() before step()")
        rotary = self._rotary(1, offset=self.position)

        def decode_mixer(index, mixer, x):
            if isinstance(mixer, SlidingWindowSelfAttention):
                return mixer.decode_step(x, self.states[index], rotary)
            return mixer.decode_step(x, self.states[index])

        logits = self._run(token_ids.view(-1, 1), decode_mixer)
        self.position += 1
        return logits
