"""The mixers of the self-attention slot, and the recurrent interface they all share.

Every mixer runs in parallel for training (`forward`, megatron's signature) and recurrently
for decoding (JRT_SPEC.md section 5): `prefill` reads a prompt and returns the state after
its last token, `step` reads one more token per sequence. The state is a small dataclass of
tensors that the mixer alone builds and reads (PLA: kernels.pla's fp32 PLAState; SWA: the
rotated keys/values of the last `window` tokens; full attention: those of every token so far;
BaseConv: the last k-1 conv inputs), so the decoder (megatron_jrt.inference) runs every layer
the same way and knows no mixer's insides.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

MixerOutput = tuple[Tensor, Tensor | None]  # (output, bias), as megatron's forward returns


@runtime_checkable
class RecurrentMixer(Protocol):
    """What megatron_jrt.inference.RecurrentDecoder needs from a mixer.

    `hidden_states` are [s, b, d] (s = 1 in `step`); `rotary_pos_emb` holds the rotary
    frequencies of exactly those positions (megatron's keyword; mixers without positions
    ignore it and may default it to None). `step` may update `state` in place or build a new
    one: callers keep the state it returns and drop the one they passed.
    """

    def prefill(self, hidden_states: Tensor, *, rotary_pos_emb: Tensor
                ) -> tuple[MixerOutput, Any]: ...

    def step(self, hidden_states: Tensor, state: Any, *, rotary_pos_emb: Tensor
             ) -> tuple[MixerOutput, Any]: ...
