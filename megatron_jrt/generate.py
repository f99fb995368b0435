"""Greedy text generation by re-running the parallel forward (a quick look at a model).

Prompts shorter than the prefix use JRT_SPEC.md's "read-2x pad": the encoder region is the
prompt repeated to M tokens, then the prompt is read again causally, then generation starts
(positions before M are trained with MLM only, so they cannot start generation themselves).
Recurrent O(1)-per-token decoding is a separate path; this one is O(N) per token.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


def read_twice_pad(prompt: list[int], prefix_length: int) -> list[int]:
    """The prompt repeated to fill the M-token encoder region, followed by the prompt itself."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) >= prefix_length:
        return list(prompt)
    repeats = -(-prefix_length // len(prompt))
    return (list(prompt) * repeats)[-prefix_length:] + list(prompt)


@torch.no_grad()
def greedy_generate(model, prompt: list[int], *, prefix_length: int, max_new_tokens: int,
                    max_length: int, eod_id: int | None = None) -> list[int]:
    """New token ids after `prompt` (tensor parallel ok; needs the whole model on this rank)."""
    tokens = read_twice_pad(prompt, prefix_length)
    start = len(tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = tokens[-max_length:]
            ids = torch.tensor([window], device=device)
            positions = torch.arange(len(window), device=device).unsqueeze(0)
            logits = gather_from_tensor_model_parallel_region(model(ids, positions, None))
            next_id = int(logits[0, -1].float().argmax())
            tokens.append(next_id)
            if next_id == eod_id:
                break
    finally:
        model.train(was_training)
    return tokens[start:]
