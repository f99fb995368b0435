"""A tiny random HF JRT model, prompt helpers and a jrt-generate runner shared by the HF
generation tests."""
from __future__ import annotations

import json
from pathlib import Path

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


def returned_cache(output):
    """The cache a forward or generate() returned: the field is `cache` from transformers 5.24,
    `past_key_values` before."""
    fields = type(output).__dataclass_fields__
    return output.cache if "cache" in fields else output.past_key_values


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


PROMPTS = ["The history of the city", "A", "In the year of the great flood, the river rose",
           "The old road ran north past the mill, over the bridge and up the hill to the church "
           "where the bells rang every evening"]  # from 1 token to past a prefix of 16


def run_cli(model: Path, tmp_path: Path, *options: str) -> list[dict]:
    """jrt-generate MODEL over PROMPTS (8 new tokens, batches of 2): its --out records."""
    from megatron_jrt.generate_cli import main

    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main([str(model), "--file", str(prompts), "--max-new-tokens", "8",
                 "--batch-size", "2", "--out", str(out), *options]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]
