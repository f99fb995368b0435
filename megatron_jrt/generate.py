"""Greedy generation with the recurrent decoder, and the JRT-Prompt templates.

Prompts shorter than the prefix use JRT_SPEC.md's "read-2x pad" (the paper's best option):
the encoder region is the prompt repeated to M tokens, then the prompt is read again
causally, then generation starts (positions before M are trained with MLM only, so they
cannot start generation themselves).
"""
from __future__ import annotations

from typing import Collection

import torch

from megatron_jrt.inference import RecurrentDecoder


def read_twice_pad(prompt: list[int], prefix_length: int) -> list[int]:
    """The prompt repeated to fill the M-token encoder region, followed by the prompt itself."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= prefix_length:
        return list(prompt)
    repeats = -(-prefix_length // len(prompt))
    return (list(prompt) * repeats)[-prefix_length:] + list(prompt)


def jrt_prompt_qa(question: str, context: str, cloze: str) -> str:
    """JRT-Prompt for document QA: the context is read twice, the question first."""
    return f"{question} {context}\n{context} {cloze}"


def jrt_prompt_extraction(key: str, document: str) -> str:
    """JRT-Prompt for key-value extraction ("Information about {key}. ...")."""
    return f"Information about {key}. {document}\n{document} {key}:"


@torch.no_grad()
def greedy_generate(model, prompt: list[int], *, prefix_length: int, max_new_tokens: int,
                    eod_id: int | None = None, stop_ids: Collection[int] = ()) -> list[int]:
    """New token ids after `prompt`, one recurrent step per token (no PP; TP ok); they end
    with `eod_id` or one of `stop_ids` when generated."""
    device = next(model.parameters()).device
    decoder = RecurrentDecoder(model, prefix_length)
    was_training = model.training
    model.eval()
    try:
        logits = decoder.prefill(torch.tensor([read_twice_pad(prompt, prefix_length)],
                                              device=device))
        new_ids: list[int] = []
        for _ in range(max_new_tokens):
            next_id = int(logits[0].argmax())
            new_ids.append(next_id)
            if next_id == eod_id or next_id in stop_ids or len(new_ids) == max_new_tokens:
                break
            logits = decoder.step(torch.tensor([next_id], device=device))
    finally:
        model.train(was_training)
    return new_ids
