"""Single-process checks of the model's pieces: configs, sliding-window attention, loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_jrt.config import ConfigError, preset
from megatron_jrt.batch import make_jrt_batch
from megatron_jrt.loss import MLM_WEIGHT, jrt_loss
from megatron_jrt.mixers.swa import sliding_window_attention


# ---- configuration errors -------------------------------------------------------------------

@pytest.mark.parametrize("changes, tp, pp, key", [
    (dict(num_heads=3), 1, 1, "model.num_heads"),  # 64 not divisible by 3
    (dict(), 3, 1, "model.num_heads"),  # 4 heads over TP=3
    (dict(layer_pattern="CPSCC"), 1, 1, "model.layer_pattern"),  # longer than num_layers
    (dict(layer_pattern="CPXC"), 1, 1, "model.layer_pattern"),  # unknown mixer letter
    (dict(prefix_length=128, max_sequence_length=64), 1, 1, "model.prefix_length"),
    (dict(), 1, 3, "model.num_layers"),  # 4 layers over PP=3
    (dict(vocab_size=50264, num_heads=8), 16, 1, "model.num_heads"),
    (dict(hidden_size=0), 1, 1, "model.hidden_size"),
])
def test_bad_config_names_the_key(changes, tp, pp, key):
    cfg = preset("jrt-tiny", **changes)
    with pytest.raises(ConfigError, match=key):
        cfg.validate(tensor_parallel=tp, pipeline_parallel=pp)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="jrt-360m"):
        preset("jrt-7b")


def test_paper_presets_follow_the_spec_table():
    small, large = preset("jrt-360m"), preset("jrt-1.3b")
    assert [i for i, c in enumerate(small.layer_pattern) if c == "P"] == [1, 6, 11, 16, 21]
    assert [i for i, c in enumerate(small.layer_pattern) if c == "S"] == [2, 7, 12, 17, 22]
    assert small.layer_pattern.count("C") == 16 and small.head_dim == 64
    assert [i for i, c in enumerate(large.layer_pattern) if c == "S"] == [2, 7, 12, 17, 22, 28, 34]
    assert large.layer_pattern.count("C") == 22 and large.head_dim == 112


def test_vocab_padding_does_not_depend_on_tp():
    cfg = preset("jrt-360m", vocab_size=50257)
    assert cfg.padded_vocab_size() == 50264  # the reference checkpoints' table
    cfg.validate(tensor_parallel=8)
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by"):
        cfg.validate(tensor_parallel=16)


# ---- sliding-window attention ---------------------------------------------------------------

def naive_sliding_window(q, k, v, window):
    n = q.shape[2]
    i = torch.arange(n).view(n, 1)
    j = torch.arange(n).view(1, n)
    allowed = (j <= i) & (j >= i - window)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("n, window", [(1, 4), (7, 4), (8, 4), (33, 8), (20, 32)])
def test_sliding_window_matches_banded_softmax(n, window):
    g = torch.Generator().manual_seed(n * 100 + window)
    q, k, v = (torch.randn(2, 3, n, 5, generator=g, dtype=torch.float64) for _ in range(3))
    out = sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(out, naive_sliding_window(q, k, v, window), rtol=1e-10, atol=1e-10)


def test_sliding_window_does_not_see_the_future_or_far_past():
    q, k, v = (torch.randn(1, 1, 12, 4, dtype=torch.float64) for _ in range(3))
    base = sliding_window_attention(q, k, v, 3)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 11], v2[:, :, 11] = 5.0, 5.0  # a future key for queries < 11
    k2[:, :, 0], v2[:, :, 0] = 7.0, 7.0  # outside the window of queries >= 4
    moved = sliding_window_attention(q, k2, v2, 3)
    torch.testing.assert_close(moved[:, :, 4:11], base[:, :, 4:11])
    assert not torch.allclose(moved[:, :, 11], base[:, :, 11])


# ---- the NTP + MLM objective ----------------------------------------------------------------

def test_masking_is_per_sample_and_reproducible():
    tokens = torch.randint(1, 50, (4, 65))
    whole = make_jrt_batch(tokens, prefix_length=32, mask_id=99, seed=7, first_sample_index=10)
    # The same samples read as two micro-batches (or by two DP ranks) get the same masks.
    first = make_jrt_batch(tokens[:2], prefix_length=32, mask_id=99, seed=7, first_sample_index=10)
    second = make_jrt_batch(tokens[2:], prefix_length=32, mask_id=99, seed=7, first_sample_index=12)
    assert torch.equal(whole.input_ids, torch.cat([first.input_ids, second.input_ids]))
    other_seed = make_jrt_batch(tokens, prefix_length=32, mask_id=99, seed=8, first_sample_index=10)
    assert not torch.equal(whole.mlm_mask, other_seed.mlm_mask)


def test_masking_targets_and_positions():
    tokens = torch.arange(1, 4 * 401 + 1).view(4, 401) % 97 + 1  # no mask id, no zeros
    batch = make_jrt_batch(tokens, prefix_length=300, mask_id=0, seed=3, first_sample_index=0)
    masked = batch.mlm_mask.bool()
    assert not masked[:, 300:].any(), "masking must stay inside the prefix"
    rate = masked[:, :300].float().mean().item()
    assert 0.10 < rate < 0.20, rate
    assert torch.equal(batch.input_ids[masked], torch.zeros(int(masked.sum()), dtype=torch.long))
    assert torch.equal(batch.labels[masked], tokens[:, :-1][masked])  # MLM: the original token
    assert batch.ntp_mask[:, :300].sum() == 0 and batch.ntp_mask[:, 300:].all()
    assert torch.equal(batch.labels[:, 300:], tokens[:, 301:])  # NTP: the next token
    # Token id 0 is a real token here: it must be maskable (the reference drops it).
    zeros = torch.zeros(2, 301, dtype=torch.long)
    assert make_jrt_batch(zeros, prefix_length=300, mask_id=5, seed=1,
                          first_sample_index=0).mlm_mask.sum() > 0


def test_loss_is_ntp_plus_quarter_mlm():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (3, 41))
    batch = make_jrt_batch(tokens, prefix_length=20, mask_id=10, seed=0, first_sample_index=0)
    logits = torch.randn(3, 40, 11)
    per_token = F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
    loss, parts = jrt_loss(per_token, batch)
    ntp = F.cross_entropy(logits[:, 20:].reshape(-1, 11), tokens[:, 21:].reshape(-1))
    m = batch.mlm_mask.bool()
    mlm = F.cross_entropy(logits[m], tokens[:, :-1][m])
    torch.testing.assert_close(parts["lm loss"][0] / parts["lm loss"][1], ntp)
    torch.testing.assert_close(parts["mlm loss"][0] / parts["mlm loss"][1], mlm)
    torch.testing.assert_close(loss, ntp + MLM_WEIGHT * mlm)


def test_bad_token_shape_is_rejected():
    with pytest.raises(ValueError, match="batch, L\\+1"):
        make_jrt_batch(torch.zeros(5, dtype=torch.long), prefix_length=2, mask_id=1, seed=0,
                       first_sample_index=0)
