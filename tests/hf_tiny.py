"""A tiny random HF JRT model and prompt helpers shared by the HF generation tests."""
from __future__ import annotations

import torch

VOCAB = 257
PREFIX, WINDOW = 16, 8


def tiny_model(vocab_size: int = VOCAB, pattern: str = "PCSP", **config):
    """A random JRTForCausalLM (width 64, 4 heads, prefix 16, window 8) in eval mode; `config`
    overrides JRTConfig fields (e.g. prefill_chunk_tokens)."""
    from megatron_jrt.hf.configuration_jrt import JRTConfig
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    torch.manual_seed(0)
    return JRTForCausalLM(JRTConfig(
        vocab_size=vocab_size, hidden_size=64, num_layers=len(pattern), num_heads=4,
        layer_pattern=pattern, prefix_length=PREFIX, swa_window=WINDOW, initializer_range=0.3,
        **config)).eval()


def random_prompts(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) with every prompt right-aligned, pad id 0."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    return ids, mask


def greedy(model, ids: torch.Tensor, new_tokens: int, **kwargs):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True, **kwargs)
