"""Recurrent inference: prefill a prompt in parallel, then decode in O(1) time per token.

Every mixer implements megatron_jrt.mixers.RecurrentMixer: `prefill` returns its state after
the prompt and `step` advances it by one token (JRT_SPEC.md section 5: PLA its (S, z) per
head, sliding-window attention the rotated keys/values of the last `window` tokens, BaseConv
the last k-1 conv inputs). The decoder runs every layer the same way and knows nothing of
what a state holds; around the mixers it runs megatron-core's own modules (embedding, norms,
MLPs, output layer) and needs the whole model on this rank (no PP; TP ok).
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from torch import Tensor

from megatron_jrt.mixers import RecurrentMixer


class RecurrentDecoder:
    """`prefill(prompt)` then `step(token)` repeatedly; both return next-token logits [b, V].

    The per-layer states live here, in a list in layer order, and pass explicitly through
    each mixer's `prefill` / `step`; megatron's Mamba pattern (state in
    `inference_context.key_value_memory_dict` keyed by layer number, reset when
    `sequence_len_offset == 0`) is not used. It would pay off if decoding ran through
    megatron's own `GPTModel.forward`, but that path also brings static batch and sequence
    sizes and a rotary table of the maximum length that nothing here needs. Explicit states
    keep each mixer a function of (input, state) that is tested on its own, and whole decoder
    states easy to copy or reorder.
    """

    def __init__(self, model, prefix_length: int):
        if not (model.pre_process and model.post_process):
            raise ValueError("recurrent decoding needs the whole model on one rank "
                             "(pipeline_parallel = 1)")
        for layer in model.decoder.layers:
            if not isinstance(layer.self_attention, RecurrentMixer):
                raise TypeError(f"layer {layer.layer_number}: "
                                f"{type(layer.self_attention).__name__} has no recurrent form "
                                "(megatron_jrt.mixers.RecurrentMixer: prefill and step)")
        self.model, self.prefix_length = model, prefix_length
        self.states: list[Any] = []  # one per layer, as its mixer's prefill/step returned it
        self.position = 0  # tokens read so far

    def _run(self, input_ids: Tensor, mixer_call) -> Tensor:
        """Embed `input_ids` ([b, s]) at the next positions, run every layer with
        `mixer_call(index, mixer, x, rotary_pos_emb) -> (output, bias)`, return last logits."""
        length = input_ids.shape[1]
        positions = torch.arange(self.position, self.position + length,
                                 device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        rotary = self.model.rotary_pos_emb(length, offset=self.position)
        hidden = self.model.embedding(input_ids=input_ids, position_ids=positions)
        for index, layer in enumerate(self.model.decoder.layers):
            out, bias = mixer_call(index, layer.self_attention, layer.input_layernorm(hidden),
                                   rotary)
            hidden = hidden + (out if bias is None else out + bias)
            out, bias = layer.mlp(layer.pre_mlp_layernorm(hidden))
            hidden = hidden + (out if bias is None else out + bias)
        hidden = self.model.decoder.final_layernorm(hidden[-1:])
        logits, _ = self.model.output_layer(
            hidden, weight=self.model.shared_embedding_or_output_weight())
        self.position += length
        return gather_from_tensor_model_parallel_region(logits)[0].float()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> Tensor:
        """Read a [b, n] prompt (n >= prefix length: its first M tokens are the encoder region)."""
        if input_ids.shape[1] < self.prefix_length:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens is shorter than the prefix length "
                f"{self.prefix_length}; pad it first (megatron_jrt.generate.read_twice_pad)")
        self.position, self.states, states = 0, [], []

        def prefill_mixer(index: int, mixer: RecurrentMixer, x: Tensor, rotary: Tensor):
            output, state = mixer.prefill(x, rotary_pos_emb=rotary)
            states.append(state)
            return output

        logits = self._run(input_ids, prefill_mixer)
        self.states = states  # only a finished prefill can be stepped from
        return logits

    @torch.no_grad()
    def step(self, token_ids: Tensor) -> Tensor:
        """Read one token per sequence ([b]) and return the logits that follow it."""
        if not self.states:
            raise RuntimeError("call prefill() before step()")

        def step_mixer(index: int, mixer: RecurrentMixer, x: Tensor, rotary: Tensor):
            output, self.states[index] = mixer.step(x, self.states[index], rotary_pos_emb=rotary)
            return output

        return self._run(token_ids.view(-1, 1), step_mixer)
