"""generate() on the Hugging Face JRT model (megatron_jrt/hf/modeling_jrt.py): the recurrent
cache against full recomputation, left-padded batches, beam search, continuing from a returned
cache, read-twice padding of short prompts; and the `jrt-generate` command.

A random tiny model (prefix 16, window 8, two PLA layers) with weights spread enough that greedy
tokens vary; prompts cross the prefix, the window and PLA's 64-token chunk.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.hf_tiny import (PREFIX, PROMPTS, greedy, left_pad, random_prompts, returned_cache,
                            run_cli, tiny_model)

pytest.importorskip("transformers")


def count_fed_tokens(model) -> tuple[list[int], object]:
    """(list that fills with the width of every forward, hook handle to remove)."""
    fed: list[int] = []
    hook = model.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    return fed, hook


def max_step_difference(step_logits, reference: torch.Tensor) -> float:
    """Largest |generate's logits at step t - reference[:, t]| over the steps."""
    return max((step - reference[:, t]).abs().max().item() for t, step in enumerate(step_logits))


def test_64_cached_steps_equal_a_full_forward_of_the_final_sequence():
    model, (prompt,) = tiny_model(), random_prompts(24)
    fed, hook = count_fed_tokens(model)
    out = greedy(model, prompt[None], 64, output_scores=True)
    hook.remove()
    assert fed == [24] + [1] * 63 and out.sequences.shape == (1, 88)
    with torch.no_grad():
        full = model(out.sequences, use_cache=False).logits[:, 23:-1]
    assert max_step_difference(out.logits, full) <= 1e-4
    assert max_step_difference(out.scores, full) <= 1e-4  # greedy: no processor changes them
    assert len(set(out.sequences[0, 24:].tolist())) > 1


def test_padded_forward_equals_each_row_alone():
    model, prompts = tiny_model(), random_prompts(70, 90, 30)
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=False).logits[0]
            assert (batched[row, -len(prompt):] - alone).abs().max() <= 1e-4


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model, prompts = tiny_model(), random_prompts(20, 33, 7)  # 7 < prefix: read-twice padded
    ids, mask = left_pad(prompts)
    batched = greedy(model, ids, 12, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], 12)
        assert torch.equal(batched.sequences[row, ids.shape[1]:], alone.sequences[0, len(prompt):])
        assert max(abs(b[row] - a[0]).max().item()
                   for b, a in zip(batched.logits, alone.logits)) <= 1e-4


def test_beam_search_equals_uncached_beam_search_and_recomputed_scores():
    model, prompts = tiny_model(), random_prompts(20, 25)
    ids, mask = left_pad(prompts)
    beams = {use_cache: greedy(model, ids, 10, attention_mask=mask, num_beams=3,
                               output_scores=True, use_cache=use_cache)
             for use_cache in (True, False)}
    assert torch.equal(beams[True].sequences, beams[False].sequences)
    best = beams[True]
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(best.sequences, attention_mask=full_mask, use_cache=False).logits
    log_probs = logits.log_softmax(-1)
    new_tokens = best.sequences[:, ids.shape[1]:]
    chosen = log_probs[:, ids.shape[1] - 1:-1].gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    # sequences_scores: the summed log-probabilities over length ** length_penalty (1.0)
    assert (best.sequences_scores - chosen.sum(dim=1) / 10).abs().max() <= 1e-4


@pytest.mark.parametrize("cache_argument", ["cache", "past_key_values"])
def test_continuing_from_a_returned_cache_equals_one_long_generation(cache_argument):
    model, prompts = tiny_model(), random_prompts(20, 26)
    ids, mask = left_pad(prompts)
    whole = greedy(model, ids, 16, attention_mask=mask).sequences
    first = greedy(model, ids, 8, attention_mask=mask)
    fed, hook = count_fed_tokens(model)
    second = greedy(model, first.sequences, 8, **{cache_argument: returned_cache(first)},
                    attention_mask=torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], dim=1))
    hook.remove()
    assert fed == [1] * 8  # only the token the first call generated but did not read
    assert torch.equal(second.sequences, whole)


def test_a_short_prompt_is_read_twice_padded_or_refused():
    from megatron_jrt.generate import read_twice_pad

    model, (prompt,) = tiny_model(), random_prompts(5)
    out = greedy(model, prompt[None], 6).sequences[0]
    assert torch.equal(out[:5], prompt)  # the caller's prompt, not the padded one
    sequence = torch.tensor([read_twice_pad(prompt.tolist(), PREFIX)])
    with torch.no_grad():
        for _ in range(6):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert out[5:].tolist() == sequence[0, -6:].tolist()
    model.config.read_twice_short_prompts = False
    with pytest.raises(ValueError, match=f"prefix_length={PREFIX}.*read-twice"):
        greedy(model, prompt[None], 6)


# ------------------------------------------------------------------------------ jrt-generate

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model over a SentencePiece vocabulary, with tokenizer.model beside it."""
    from data_prep.tokenizer import load_tokenizer
    from tests.smalldata import small_corpus

    root = tmp_path_factory.mktemp("jrt_generate")
    _, tokenizer_file = small_corpus(root, documents=50, vocab_size=400)
    model = tiny_model(vocab_size=load_tokenizer(str(tokenizer_file)).vocab_size)
    model.save_pretrained(root / "hf")
    shutil.copy(tokenizer_file, root / "hf" / "tokenizer.model")
    return root / "hf"


def test_cli_greedy_completions_equal_generate_of_each_prompt_alone(model_dir, tmp_path, capsys):
    from data_prep.tokenizer import load_tokenizer
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    records = run_cli(model_dir, tmp_path)
    assert [r["prompt"] for r in records] == PROMPTS
    assert records == run_cli(model_dir, tmp_path)  # deterministic
    printed = capsys.readouterr()
    assert "tokens/s" in printed.err.splitlines()[-1]
    tokenizer = load_tokenizer(str(model_dir / "tokenizer.model"))
    model = JRTForCausalLM.from_pretrained(model_dir).eval()
    for record in records:
        prompt = torch.tensor([tokenizer.encode(record["prompt"])])
        out = greedy(model, prompt, 8, eos_token_id=tokenizer.eod_id).sequences
        new_ids = out[0, prompt.shape[1]:].tolist()
        if tokenizer.eod_id in new_ids:
            new_ids = new_ids[:new_ids.index(tokenizer.eod_id)]
        assert record["completion"] == tokenizer.decode(new_ids)
        assert record["completion"] in printed.out


def test_cli_sampling_is_reproducible_with_a_seed(model_dir, tmp_path):
    sample = ("--temperature", "1.0", "--top-p", "0.95")
    first = run_cli(model_dir, tmp_path, *sample, "--seed", "3")
    assert first == run_cli(model_dir, tmp_path, *sample, "--seed", "3")
    assert first != run_cli(model_dir, tmp_path, *sample, "--seed", "4")


def test_cli_jrt_prompt_template_from_jsonl(model_dir, tmp_path):
    from megatron_jrt.generate import jrt_prompt_qa
    from megatron_jrt.generate_cli import main

    record = {"question": "Who?", "context": "Ann met Bob.", "cloze": "Answer:", "id": 7}
    (tmp_path / "in.jsonl").write_text(json.dumps(record) + "\n")
    assert main([str(model_dir), "--jsonl", str(tmp_path / "in.jsonl"), "--jrt-prompt", "qa",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "out.jsonl")]) == 0
    (written,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written["prompt"] == jrt_prompt_qa("Who?", "Ann met Bob.", "Answer:")
    assert written["id"] == 7 and isinstance(written["completion"], str)


@pytest.mark.parametrize("problem", ["missing dir", "empty prompt file", "template field missing"])
def test_cli_errors_are_one_line_with_exit_status_2(problem, model_dir, tmp_path, capsys):
    from megatron_jrt.generate_cli import main

    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "bad.jsonl").write_text('{"question": "Who?"}\n')
    argv = {"missing dir": [str(tmp_path / "nowhere"), "--prompt", "Hi"],
            "empty prompt file": [str(model_dir), "--file", str(tmp_path / "empty.txt")],
            "template field missing": [str(model_dir), "--jsonl", str(tmp_path / "bad.jsonl"),
                                       "--jrt-prompt", "qa"]}[problem]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("jrt-generate: error:") and error.count("\n") == 1
