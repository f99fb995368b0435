"""The models the recall harness can run, each as (codec, generate: prompts -> completions).

- A megatron_jrt checkpoint (or save_dir): greedy decoding with the recurrent decoder
  (megatron_jrt.generate.greedy_generate: parallel prefill, then O(1) steps; prompts shorter
  than a JRT prefix are read-twice padded), one prompt at a time; the tokenizer is the run's
  `data.tokenizer` unless one is given.
- A Hugging Face directory (jrt-convert's, or any causal LM): `AutoModelForCausalLM`
  with `trust_remote_code=True` and its AutoTokenizer, greedy `generate()` on left-padded
  batches (jrt-generate's batching).
Both stop at end-of-document or after `MAX_NEW_TOKENS`, the recurrent decoder also after a token
holding a newline; the harness cuts at the newline.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from data_prep.tokenizer import Tokenizer
from megatron_jrt.evals.recall import MAX_NEW_TOKENS, Generate
from megatron_jrt.evals.recall_prompts import Codec


def is_hf_directory(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def megatron_generator(checkpoint: str | Path, tokenizer: str | None = None
                       ) -> tuple[Codec, Generate]:
    """Greedy completions from a megatron_jrt checkpoint (init_distributed first)."""
    from data_prep.tokenizer import load_tokenizer
    from megatron_jrt.evals.trained_model import load_trained_model
    from megatron_jrt.generate import greedy_generate

    trained = load_trained_model(checkpoint)
    spec = tokenizer or trained.train_config.get("data", {}).get("tokenizer", "")
    if not spec:
        raise ValueError(f"--model {checkpoint}: its run has no data.tokenizer (mock or "
                         "synthetic data); give --tokenizer")
    codec = load_tokenizer(spec)
    if codec.vocab_size > trained.config.vocab_size:
        raise ValueError(f"--tokenizer {spec}: {codec.vocab_size} ids, the model has "
                         f"{trained.config.vocab_size}; give the tokenizer it was trained with")

    stops = newline_ids(codec)

    def generate(prompts: list[str]) -> list[str]:
        completions = []
        for prompt in prompts:
            new_ids = greedy_generate(trained.model, codec.encode(prompt),
                                      prefix_length=trained.config.prefix_length,
                                      max_new_tokens=MAX_NEW_TOKENS, eod_id=codec.eod_id,
                                      stop_ids=stops)
            completions.append(codec.decode([i for i in new_ids if i != codec.eod_id]))
        return completions

    return codec, generate


def newline_ids(codec: Tokenizer) -> frozenset[int]:
    """The ids whose text holds a newline: the recurrent decoder stops after one (the harness
    keeps the output up to the first newline, so the tokens after it are never scored)."""
    return frozenset(i for i in range(codec.vocab_size) if "\n" in codec.decode([i]))


def hf_generator(directory: str | Path, device: str) -> tuple[Codec, Generate]:
    """Greedy completions from a Hugging Face directory, a batch of prompts per call."""
    from transformers import AutoModelForCausalLM

    from megatron_jrt.generate_cli import generate_batch, load_codec

    codec = load_codec(Path(directory))
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    model = model.to(device).eval()
    greedy = argparse.Namespace(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, top_p=1.0,
                                device=device)

    def generate(prompts: list[str]) -> list[str]:
        new_ids = generate_batch(model, codec, [codec.encode(p) for p in prompts], greedy)
        return [codec.decode(ids) for ids in new_ids]

    return codec, generate


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
