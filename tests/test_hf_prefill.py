"""Chunked prefill of the Hugging Face JRT model (megatron_jrt/hf/modeling_jrt.py, JRTModel):
a cached read of more than config.prefill_chunk_tokens tokens goes through the blocks chunk by
chunk, the recurrent cache carried between chunks, and must compute what one pass computes.

A random tiny model (prefix 16, window 8, kernel 3) in fp32; chunk sizes below, at and above the
prefix and the window, prompts (71 tokens) not divisible by them, left-padded batches whose
encoder regions end in different chunks (JRTModel._encoder_states reads them first).
"""
from __future__ import annotations

import pytest
import torch

from tests.hf_tiny import (PREFIX, VOCAB, WINDOW, greedy, left_pad, random_prompts,
                            returned_cache)
from tests.hf_tiny import tiny_model as _tiny_model

pytest.importorskip("transformers")

CHUNKS = [5, 8, 16, 19, 64]  # < window, = window < prefix, = prefix, > prefix, > prefix and window


def tiny_model(chunk: int | None, pattern: str = "PCSP"):
    return _tiny_model(pattern=pattern, prefill_chunk_tokens=chunk)


def assert_same_generation(chunked, one_pass) -> None:
    assert torch.equal(chunked.sequences, one_pass.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(chunked.logits, one_pass.logits)) <= 1e-4


def assert_same_cache(chunked, one_pass) -> None:
    assert chunked.seq_length == one_pass.seq_length
    assert torch.equal(chunked.token_counts, one_pass.token_counts)
    for mine, theirs in zip(chunked.layers, one_pass.layers):
        for a, b in zip(mine, theirs):
            if a.dtype == torch.bool:
                assert torch.equal(a, b)
            else:
                assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


def prefill(model, ids, mask=None, logits_to_keep: int = 1):
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=True, logits_to_keep=logits_to_keep)


@pytest.mark.parametrize("pattern", ["PCSP", "CSPC"])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_unpadded_chunked_prefill_equals_one_pass(chunk, pattern):
    chunked, one_pass = tiny_model(chunk, pattern), tiny_model(0, pattern)
    ids = torch.stack(random_prompts(71, 71))
    mine, theirs = prefill(chunked, ids), prefill(one_pass, ids)
    assert mine.logits.shape == (2, 1, VOCAB)
    assert (mine.logits - theirs.logits).abs().max() <= 1e-4
    assert_same_cache(returned_cache(mine), returned_cache(theirs))
    assert_same_generation(greedy(chunked, ids, 10), greedy(one_pass, ids, 10))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_left_padded_chunked_prefill_equals_one_pass(chunk):
    chunked, one_pass = tiny_model(chunk), tiny_model(None)
    ids, mask = left_pad(random_prompts(71, 40, 20, 17))  # encoder regions end at 16 ... 70
    mine, theirs = prefill(chunked, ids, mask), prefill(one_pass, ids, mask)
    assert (mine.logits - theirs.logits).abs().max() <= 1e-4
    assert_same_cache(returned_cache(mine), returned_cache(theirs))
    # generate: a 9-token row is read-twice padded (25 columns) inside the 71-wide prompt
    ids, mask = left_pad(random_prompts(71, 40, 9))
    assert_same_generation(greedy(chunked, ids, 10, attention_mask=mask),
                           greedy(one_pass, ids, 10, attention_mask=mask))


@pytest.mark.parametrize("chunk", [5, 19])
def test_all_logits_of_a_chunked_cached_forward_equal_the_uncached_forward(chunk):
    model = tiny_model(chunk)
    ids, mask = left_pad(random_prompts(71, 30, 12))  # 12 < prefix: its encoder is all of it
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        mine = prefill(model, ids, mask, logits_to_keep=0).logits
        last_3 = prefill(model, ids, mask, logits_to_keep=3).logits
    assert mine.shape == full.shape and (mine - full).abs().max() <= 1e-4
    assert (last_3 - full[:, -3:]).abs().max() <= 1e-4


def test_a_long_continuation_of_a_cache_is_chunked_and_exact():
    model = tiny_model(8)
    ids = torch.stack(random_prompts(80, 80))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        first = prefill(model, ids[:, :30], logits_to_keep=0)
        second = model(ids[:, 30:], cache=returned_cache(first), use_cache=True)
    assert (torch.cat([first.logits, second.logits], dim=1) - full).abs().max() <= 1e-4


def test_prefill_activations_are_one_chunk_wide_and_only_the_last_logits_are_computed():
    """The memory shape: every MLP reads at most max(chunk, prefix) columns (the encoder region
    read first is b x prefix), the LM head one column, however long the padded prompt."""
    model = tiny_model(8)
    mlp_widths, head_widths = [], []
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda module, args: mlp_widths.append(args[0].shape[1])) for layer in model.model.layers]
    hooks.append(model.lm_head.register_forward_pre_hook(
        lambda module, args: head_widths.append(args[0].shape[1])))
    ids, mask = left_pad(random_prompts(200, 150, 40))
    greedy(model, ids, 3, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    prefill_widths = mlp_widths[:-2 * len(model.model.layers)]  # less the 2 decode steps
    assert max(prefill_widths) == PREFIX  # the encoder pre-read; the chunks are 8 wide
    assert prefill_widths.count(PREFIX) == 3  # layers 0..2 (P C S) up to the last PLA layer 3
    assert sorted(set(prefill_widths[3:])) == [8] and len(prefill_widths[3:]) == 4 * 25
    assert head_widths == [1, 1, 1]


def test_sliding_window_attention_never_builds_an_n_by_n_score_matrix(monkeypatch):
    import torch.nn.functional as F

    from megatron_jrt.hf import modeling_jrt

    shapes, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        shapes.append((q.shape[2], k.shape[2]))
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(modeling_jrt.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        tiny_model(None)(torch.stack(random_prompts(300)), use_cache=False)
    assert shapes and max(q for q, _ in shapes) <= WINDOW
    assert max(k for _, k in shapes) <= 2 * WINDOW  # a band of the 300 x 300 matrix


def test_config_field_default_validation_and_no_leak_into_transformers_chunking():
    from megatron_jrt.hf.configuration_jrt import JRTConfig

    assert JRTConfig(num_layers=2).prefill_chunk_tokens == 4096
    with pytest.raises(ValueError, match="prefill_chunk_tokens"):
        JRTConfig(num_layers=2, prefill_chunk_tokens=-1)
    model = tiny_model(8)
    assert getattr(model.generation_config, "prefill_chunk_size", None) is None
