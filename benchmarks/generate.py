"""Generation speed of the Hugging Face JRT model beside a same-size Transformer with a KV cache.

    python benchmarks/generate.py --prompt-lengths 2048,32768 --batch-sizes 1,64 --new-tokens 256

Both models are random-initialised at the 360M preset's width and depth (bf16 on CUDA): the
JRT-RNN of `jrt-convert to-hf` (megatron_jrt/hf, plain-torch mixers) and transformers'
`LlamaForCausalLM` (SDPA attention, tied embeddings, the same MLP width). For each prompt
length and batch size, in one process: prefill time (generate with one new token), decode
tokens/s over the remaining new tokens (greedy, forced to full length), peak memory, and the
JRT / Transformer decode ratio. A configuration that runs out of memory prints "OOM".
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch


def _models(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_jrt.config import preset
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM
    from megatron_jrt.hf.weights import hf_config

    jrt_config = hf_config(dataclasses.asdict(preset("jrt-360m", vocab_size=vocab,
                                                     max_sequence_length=65536)))
    jrt = JRTForCausalLM(jrt_config)
    ffn = jrt.model.layers[0].mlp.up_proj.out_features
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=jrt_config.hidden_size, intermediate_size=ffn,
        num_hidden_layers=jrt_config.num_layers, num_attention_heads=jrt_config.num_heads,
        max_position_embeddings=65536, tie_word_embeddings=True, attn_implementation="sdpa"))
    return {"JRT-RNN": jrt, "Transformer": llama}


def _timed_generate(model, prompt: torch.Tensor, new_tokens: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _measure(model, batch: int, length: int, new_tokens: int, vocab: int) -> dict:
    prompt = torch.randint(0, vocab, (batch, length), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        prefill = _timed_generate(model, prompt, 1)
        total = _timed_generate(model, prompt, new_tokens)
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"oom": False, "prefill_s": prefill,
            "decode_tokens_per_s": batch * (new_tokens - 1) / max(total - prefill, 1e-9),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-lengths", default="2048,32768")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50264)
    args = parser.parse_args()
    models = {name: model.to("cuda", torch.bfloat16).eval()
              for name, model in _models(args.vocab).items()}
    print(f"360M width/depth, bf16, {torch.cuda.get_device_name()}, {args.new_tokens} new tokens")
    print(f"{'model':12} {'batch':>5} {'prompt':>7} {'prefill s':>10} {'decode tok/s':>13} "
          f"{'peak GiB':>9} {'JRT/Transformer':>16}")
    for length in map(int, args.prompt_lengths.split(",")):
        for batch in map(int, args.batch_sizes.split(",")):
            rows = {name: _measure(model, batch, length, args.new_tokens, args.vocab)
                    for name, model in models.items()}
            base = rows["Transformer"]
            for name, row in rows.items():
                if row["oom"]:
                    print(f"{name:12} {batch:>5} {length:>7} {'OOM':>10}")
                    continue
                ratio = ("" if base["oom"] or name == "Transformer" else
                         f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x")
                print(f"{name:12} {batch:>5} {length:>7} {row['prefill_s']:>10.2f} "
                      f"{row['decode_tokens_per_s']:>13,.0f} {row['peak_gib']:>9.1f} {ratio:>16}",
                      flush=True)


if __name__ == "__main__":
    main()
