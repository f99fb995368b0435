"""Synthetic recall tasks: the formats of the paper's code, answer-only loss masks, seeded
samples that do not depend on the data-parallel layout, and config errors that name the key."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_jrt.config import ConfigError
from megatron_jrt.evals.tasks import SetDisjointness, build_task, check_prefix
from megatron_jrt.evals.tasks.sample import PAD, labelled_batch

SD = {"task": "set_disjointness", "vocab_size": 64, "pairs": [[3, 9], [9, 3], [5, 5]]}


def _sets(task: SetDisjointness, tokens: np.ndarray) -> tuple[list[int], list[int]]:
    context = tokens[:task.context_length]
    body = context[context != PAD].tolist()
    assert body[0] == 1 and body.count(2) == 1, body
    cut = body.index(2)
    return body[1:cut], body[cut + 1:]


def test_set_disjointness_is_one_two_three_with_one_shared_token():
    task = build_task(SD, 23)
    for index in range(60):
        sample = task.sample(7, "train", index)
        tokens = sample.tokens
        assert len(tokens) == 24 and tokens.dtype == np.int64
        a, b = _sets(task, tokens)
        assert (len(a), len(b)) == tuple(SD["pairs"][index % 3])
        # PAD in front, the sets right before the query token, the answer last
        assert tokens[task.context_length] == 3
        assert tokens[task.context_length - len(a) - len(b) - 2] == 1
        assert (tokens[:task.context_length - len(a) - len(b) - 2] == PAD).all()
        assert len(set(a)) == len(a) and len(set(b)) == len(b)
        assert set(a) & set(b) == {tokens[-1]}  # exactly one shared token: the label
        assert min(a + b) >= 4 and max(a + b) < 64
        assert sample.answers.tolist() == [task.context_length]


def test_set_disjointness_draws_a_and_b_from_two_halves_of_a_shuffled_vocabulary():
    """A has V/2 candidates, B the other V/2 - 4: over many samples A's tokens cover more of
    the vocabulary than any half, and within one sample A and B share only the answer."""
    task = build_task({**SD, "pairs": [[30, 26]]}, 59)
    for index in range(20):
        a, b = _sets(task, task.sample(1, "train", index).tokens)
        assert len(set(a) | set(b)) == 55  # 30 + 26 - 1: the halves are disjoint
    seen = set()
    for index in range(50):
        seen |= set(_sets(task, task.sample(1, "train", index).tokens)[0])
    assert len(seen) > 40  # the halves are reshuffled per sample


def test_mqar_context_queries_and_answers():
    task = build_task({"task": "mqar", "vocab_size": 128, "kv_pairs": [2, 5]}, 40)
    assert task.context_length == 10
    for index in range(40):
        sample = task.sample(3, "valid", index)
        tokens, n = sample.tokens, (2, 5)[index % 2]
        context = tokens[:10]
        assert (context[:10 - 2 * n] == PAD).all()
        keys, values = context[10 - 2 * n::2], context[11 - 2 * n::2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert keys.min() >= 1 and keys.max() < 64 and values.min() >= 64 and values.max() < 128
        # every key asked once, at an even offset of the query region, its value right after
        assert len(sample.answers) == n and ((sample.answers - 10) % 2 == 0).all()
        assert sorted(tokens[sample.answers].tolist()) == sorted(keys.tolist())
        mapping = dict(zip(keys.tolist(), values.tolist()))
        assert [mapping[tokens[p]] for p in sample.answers] == tokens[sample.answers + 1].tolist()


def test_mqar_query_gaps_follow_the_power_law():
    """power_a 0.01: the first query slot is far likelier than the last (uniform would not be)."""
    task = build_task({"task": "mqar", "vocab_size": 512, "kv_pairs": [1]}, 42)
    gaps = np.array([(task.sample(0, "train", i).answers[0] - 2) // 2 for i in range(2000)])
    counts = np.bincount(gaps, minlength=20)
    assert counts[0] > 4 * counts[-5:].mean() and counts[:3].sum() > 0.35 * len(gaps)


def test_jrt_prompt_repeats_the_key_value_context_before_the_queries():
    plain = build_task({"task": "mqar", "vocab_size": 128, "kv_pairs": [3]}, 20)
    prompt = build_task({"task": "mqar", "vocab_size": 128, "kv_pairs": [3], "jrt_prompt": True},
                        26)
    assert (plain.context_length, prompt.context_length) == (6, 12)
    tokens = prompt.sample(0, "train", 4).tokens
    assert (tokens[:6] == tokens[6:12]).all() and (tokens[:6] != PAD).all()
    # a cell is named by the plain seq len, so prompted and plain runs report the same cells
    assert plain.cells() == prompt.cells() == [(20, 3)]


def test_samples_are_a_function_of_seed_split_and_index():
    task = build_task(SD, 23)
    same = [task.sample(5, "train", 11).tokens for _ in range(2)]
    assert (same[0] == same[1]).all()
    others = [task.sample(6, "train", 11), task.sample(5, "valid", 11), task.sample(5, "test", 11),
              task.sample(5, "train", 14)]  # 14: same cell (14 % 3 == 11 % 3), other sample
    assert all(not np.array_equal(o.tokens, same[0]) for o in others)


def test_labelled_batch_counts_only_the_answers_and_has_no_mlm_term():
    task = build_task({"task": "mqar", "vocab_size": 128, "kv_pairs": [2, 4]}, 24)
    samples = [task.sample(0, "train", i) for i in range(4)]
    batch = labelled_batch(samples)
    assert batch.input_ids.shape == batch.labels.shape == batch.ntp_mask.shape == (4, 24)
    assert torch.equal(batch.labels[:, :-1], batch.input_ids[:, 1:])
    for row, sample in enumerate(samples):
        assert batch.ntp_mask[row].nonzero().flatten().tolist() == sample.answers.tolist()
    assert batch.mlm_mask.sum() == 0 and not batch.has_mlm


def test_for_cell_grows_the_layout_for_longer_sets_and_more_pairs():
    sd = build_task(SD, 23)
    assert sd.for_cell((3, 9)).seq_length == 23  # fits the training layout
    longer = sd.for_cell((20, 30))
    assert (longer.seq_length, longer.context_length, longer.pairs) == (53, 52, ((20, 30),))
    mqar = build_task({"task": "mqar", "vocab_size": 256, "kv_pairs": [2, 4], "jrt_prompt": True},
                      40)  # context 2 x 8, queries 24
    unseen = mqar.for_cell((48, 8))
    assert (unseen.context_length, unseen.query_length) == (32, 32)
    assert unseen.cells() == [(48, 8)] and unseen.problem() is None
    assert mqar.for_cell((20, 8)).problem()[0] == "seq_length"  # no room for 8 queries


@pytest.mark.parametrize("params, seq_length, message", [
    ({"task": "parity"}, 16, r"^data.synthetic.task: 'parity' is not one of mqar"),
    ({"task": "mqar", "kv_pair": [2]}, 16, r"^data.synthetic.kv_pair: .*did you mean 'kv_pairs'"),
    ({"task": "mqar", "kv_pairs": [2, "x"]}, 16, r"^data.synthetic.kv_pairs: expected a list"),
    ({"task": "mqar", "jrt_prompt": "yes"}, 16, r"^data.synthetic.jrt_prompt: expected true"),
    ({"task": "mqar", "kv_pairs": [4]}, 12, r"^data.seq_length: 12 is too short.*=16"),
    ({"task": "mqar", "kv_pairs": [4], "vocab_size": 8}, 16, r"^data.synthetic.vocab_size"),
    ({"task": "set_disjointness", "pairs": [[4, 4]]}, 8, r"^data.seq_length: .*=11"),
    ({"task": "set_disjointness", "pairs": [[3]]}, 8, r"^data.synthetic.pairs: expected a list"),
    ({"task": "set_disjointness", "vocab_size": 16, "pairs": [[2, 6]]}, 12,
     r"^data.synthetic.pairs: \[2, 6\]: A draws from 8 tokens and B from 4"),
])
def test_bad_task_parameters_name_their_key(params, seq_length, message):
    with pytest.raises(ConfigError, match=message):
        build_task(params, seq_length)


def test_the_prefix_must_be_the_context_region_or_nothing():
    task = build_task(SD, 23)
    check_prefix(task, 0)
    check_prefix(task, 22)
    for wrong in (5, 23):
        with pytest.raises(ConfigError, match=r"^model.prefix_length: .*prefix_length=22"):
            check_prefix(task, wrong)


def _config(*extra: str):
    from megatron_jrt.train_config import load_config

    return load_config(None, [
        "model.preset=jrt-tiny", "model.overrides.prefix_length=22", "data.seq_length=23",
        "data.synthetic={task: set_disjointness, vocab_size: 64, pairs: [[3, 9], [9, 3]]}",
        "data.micro_batch_size=2", "data.global_batch_size=4", "optimizer.warmup_steps=1",
        *extra])


def test_the_run_config_validates_data_synthetic():
    assert _config().data.synthetic["task"] == "set_disjointness"
    for extra, message in [
        (["model.overrides.prefix_length=16"], r"^model.prefix_length: 16, but the "
                                               r"set_disjointness task's context region is 22"),
        (["data.mock_data=true"], r"^data.mock_data: true, but data.synthetic is set too"),
        (["data.tokenizer=tok.model"], r"^data.tokenizer: 'tok.model', but data.synthetic"),
        (["data.synthetic={task: mqar, kv_pairs: [64]}"], r"^data.seq_length: 23 is too short"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(*extra)


def test_synthetic_samples_do_not_depend_on_the_data_parallel_layout_or_a_resume():
    """A global batch of 4 read by one rank, or by two ranks of 2, is the same 4 samples; a
    source restored from a state continues with what the original would have read."""
    from megatron_jrt.data import JRTBatches, build_token_source, generated_vocab_size

    data = _config().data
    assert generated_vocab_size(data) == 64

    def steps(dp_rank: int, dp_world: int, count: int, state: dict | None = None):
        source = build_token_source(data, "train", dp_rank=dp_rank, dp_world_size=dp_world,
                                    seed=3, tokenizer_hash=None)
        if state is not None:
            source.load_state_dict(state)
        batches = JRTBatches(source, prefix_length=22, mask_id=64, seed=3, global_batch_size=4,
                             dp_rank=dp_rank, dp_world_size=dp_world)
        micro = 4 // (2 * dp_world)
        out = [torch.cat([b.input_ids for b in batches.step(4 * s, micro, "cpu")])
               for s in range(count)]
        return out, source.state_dict(), batches

    one, state, batches = steps(0, 1, 3)
    two = [torch.cat(pair) for pair in zip(steps(0, 2, 3)[0], steps(1, 2, 3)[0])]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    first, state_after_one, _ = steps(0, 1, 1)
    resumed = steps(0, 1, 2, state=state_after_one)[0]
    assert all(torch.equal(a, b) for a, b in zip(one[1:], resumed))
    # the trainer gets the task's masks, not the NTP + MLM objective's
    batch = batches.step(0, 2, "cpu")[0]
    assert batch.ntp_mask.sum() == 2 and batch.mlm_mask.sum() == 0
    assert (batch.ntp_mask[:, 22] == 1).all()


def test_worker_processes_make_the_same_stream_in_the_same_order():
    from megatron_jrt.data import build_token_source

    def stream(workers: int, state: dict | None = None) -> list[torch.Tensor]:
        data = _config(f"data.num_workers={workers}").data
        source = build_token_source(data, "valid", dp_rank=1, dp_world_size=2, seed=9,
                                    tokenizer_hash=None)
        if state is not None:
            source.load_state_dict(state)
        batches = iter(source)
        out = [next(batches).input_ids for _ in range(5)]
        return out, source.state_dict()

    alone, state = stream(0)
    together, state_with_workers = stream(2)
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert state == state_with_workers  # the position counts what was handed out, not made
    assert torch.equal(stream(2, state)[0][0], stream(0, state)[0][0])


def test_state_size_is_the_papers():
    from megatron_jrt.config import preset
    from megatron_jrt.evals.state_size import state_size

    cfg = preset("jrt-tiny", layer_pattern="CPCP", num_heads=2, hidden_size=64, feature_dim=16)
    conv = 2 * 2 * 64  # kernel 3 keeps 2 inputs of 2d channels
    linear = 2 * (1 + 16 + 256) * (32 + 1)  # heads x features x (head dim + normaliser)
    assert state_size(cfg, 100) == state_size(cfg, 1000) == 2 * conv + 2 * linear
    attention = cfg.replace(layer_pattern="CACA", prefix_length=0)
    assert state_size(attention, 100) == 2 * conv + 2 * (2 * 100 * 64)  # the KV cache grows
    assert state_size(cfg.replace(feature_dim=4), 100) < state_size(cfg, 100)
