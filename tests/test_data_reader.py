"""PackedSequenceReader: packing, equal counts per rank, resume equivalence, integrity errors."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch

from data_prep.reader import ManifestError, PackedSequenceReader, ShardError, read_shard
from data_prep.shards import write_shards
from data_prep.tokenizer import load_tokenizer
from tests.smalldata import small_corpus

L, B = 128, 4
WINDOW = 4096  # tokens: ~7 sequences, so windows, shards and epochs all get crossed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """~200 bundled documents, vocab 1000, 10k-token shards: ~30 train shards."""
    root = tmp_path_factory.mktemp("data")
    corpus, tok = small_corpus(root)
    write_shards([str(corpus)], str(tok), root / "shards", shard_size="10k", valid_fraction=0.05,
                 valid_shards=4, workers=2, progress=False, log=lambda s: None)
    return root


def reader(data, **kw):
    args = dict(data_dir=str(data / "shards"), split="train", seq_length=L, micro_batch_size=B,
                shuffle_window_tokens=WINDOW)
    args.update(kw)
    return PackedSequenceReader(**args)


def take(r, n):
    it = iter(r)
    return [next(it) for _ in range(n)]


def global_stream(data, split="train"):
    m = json.loads((data / "shards" / "manifest.json").read_text())
    return np.concatenate([read_shard(data / "shards" / e["file"], e, np.dtype(m["dtype"]))
                           for e in m["splits"][split]])


def test_batch_shape_dtype_and_ids(data):
    r = reader(data)
    b = take(r, 3)[-1]
    assert b.shape == (B, L + 1) and b.dtype == torch.int64
    assert 0 <= int(b.min()) and int(b.max()) < load_tokenizer(str(data / "tok.model")).vocab_size
    assert r.skipped_shards == 0
    json.dumps(r.state_dict())


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 0)])
def test_unshuffled_stream_is_packed_contiguous_runs(data, world, workers):
    """Every (rank, worker) gets an equal contiguous run of the packed global stream."""
    g = global_stream(data)
    C = L + 1
    runs = []
    for rank in range(world):
        r = reader(data, dp_rank=rank, dp_world_size=world, num_workers=workers, shuffle=False)
        nw = max(1, workers)
        batches = take(r, len(r))
        assert r.state_dict()["epoch"] == 1 and r.state_dict()["position"] == 0
        for w in range(nw):
            seqs = torch.cat(batches[w::nw]).numpy()
            runs.append(seqs)
    n = runs[0].shape[0]
    assert all(x.shape[0] == n for x in runs)
    per_rank = (g.size // C) // world
    for i, seqs in enumerate(runs):
        rank, w = divmod(i, max(1, workers))
        start = (rank * per_rank + w * (per_rank // max(1, workers))) * C
        assert np.array_equal(seqs.reshape(-1), g[start:start + n * C])


def test_equal_batches_per_rank(data):
    for world in (1, 2, 3, 5):
        lens = {len(reader(data, dp_rank=r, dp_world_size=world, num_workers=2)) for r in range(world)}
        assert len(lens) == 1
    r0, r1 = reader(data, dp_rank=0, dp_world_size=2), reader(data, dp_rank=1, dp_world_size=2)
    a, b = take(r0, len(r0)), take(r1, len(r1))
    seqs0 = {tuple(s.tolist()) for x in a for s in x}
    seqs1 = {tuple(s.tolist()) for x in b for s in x}
    assert not seqs0 & seqs1  # ranks read disjoint data within an epoch


def test_workers_match_round_robin_definition(data):
    """The DataLoader path yields exactly the documented interleave of the logical workers."""
    r = reader(data, num_workers=2, dp_rank=1, dp_world_size=2)
    got = take(r, 2 * len(r) + 3)
    plan = r._plan
    w0, w1 = plan.worker_batches(0, 0, 0), plan.worker_batches(1, 0, 0)
    want = [next(w0 if i % 2 == 0 else w1)[0] for i in range(len(got))]
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_epochs_reshuffle_train_but_not_valid(data):
    r = reader(data)
    n = len(r)
    b = take(r, 2 * n)
    assert not torch.equal(b[0], b[n])
    assert [x[0, :8].tolist() for x in b[:n]] != [x[0, :8].tolist() for x in b[n:]]
    v = reader(data, split="valid", micro_batch_size=1)
    vb = take(v, 2 * len(v))
    assert all(torch.equal(x, y) for x, y in zip(vb[:len(v)], vb[len(v):]))
    assert all(torch.equal(x, y) for x, y in zip(vb, take(reader(data, split="valid", micro_batch_size=1), len(vb))))


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_resume_equivalence(data, world, workers):
    for rank in range(world):
        r = reader(data, dp_rank=rank, dp_world_size=world, num_workers=workers, seed=7)
        n = len(r)
        total = n + 9  # crosses an epoch boundary
        cuts = sorted({1, 3, 5, n - 1, n, n + 2})
        ref, states, it = [], {}, iter(r)
        for i in range(total):
            ref.append(next(it))
            if i + 1 in cuts:
                states[i + 1] = json.loads(json.dumps(r.state_dict()))  # as the checkpoint stores it
        for k, state in states.items():
            r2 = reader(data, dp_rank=rank, dp_world_size=world, num_workers=workers, seed=7)
            r2.load_state_dict(state)
            rest = take(r2, total - k)
            assert all(torch.equal(x, y) for x, y in zip(rest, ref[k:])), (rank, k)


def test_state_checks(data):
    r = reader(data, num_workers=2)
    st = r.state_dict()
    with pytest.raises(ValueError, match="num_workers: saved 2, now 1"):
        reader(data).load_state_dict(st)
    with pytest.raises(ValueError, match="seq_length"):
        reader(data, num_workers=2, seq_length=64).load_state_dict(st)
    take(r, 1)
    with pytest.raises(RuntimeError, match="before iterating"):
        r.load_state_dict(st)


# ---------------------------------------------------------------- integrity

def _copy(data, tmp_path):
    d = tmp_path / "shards"
    shutil.copytree(data / "shards", d)
    m = json.loads((d / "manifest.json").read_text())
    return d, m


@pytest.mark.parametrize("cut", [100, 512, 700, 5000, -10240, -1])
def test_truncated_shard_is_caught(data, tmp_path, cut):
    d, m = _copy(data, tmp_path)
    f = d / m["splits"]["train"][0]["file"]
    raw = f.read_bytes()
    f.write_bytes(raw[:cut])
    r = PackedSequenceReader(str(d), "train", L, B, shuffle=False)
    with pytest.raises(ShardError, match=rf"{f.name}.*truncated"):
        take(r, 1)


@pytest.mark.parametrize("workers", [0, 2])
def test_flipped_byte_is_caught(data, tmp_path, workers):
    d, m = _copy(data, tmp_path)
    f = d / m["splits"]["train"][0]["file"]
    raw = bytearray(f.read_bytes())
    raw[2000] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=rf"{f.name}: sha256 does not match"):  # also from a DataLoader worker
        take(PackedSequenceReader(str(d), "train", L, B, shuffle=False, num_workers=workers), 1)


def test_counts_checked_while_reading(data, tmp_path):
    """A manifest whose sha256 matches but counts do not (hand-edited) is still caught."""
    d, m = _copy(data, tmp_path)
    m["splits"]["train"][0]["samples"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="samples.*manifest says"):
        take(PackedSequenceReader(str(d), "train", L, B, shuffle=False), 1)


def test_missing_shard_and_manifest(data, tmp_path):
    d, m = _copy(data, tmp_path)
    f = d / m["splits"]["train"][0]["file"]
    f.unlink()
    with pytest.raises(ShardError, match=rf"{f.name}: shard listed in the manifest is missing"):
        take(PackedSequenceReader(str(d), "train", L, B, shuffle=False), 1)
    (d / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json not found"):
        PackedSequenceReader(str(d), "train", L, B)


def test_wrong_tokenizer_hash(data):
    with pytest.raises(ManifestError, match="tokenizer hash"):
        reader(data, tokenizer_hash="0" * 64)
    good = load_tokenizer(str(data / "tok.model")).hash
    reader(data, tokenizer_hash=good)


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_corrupt_keeps_counts(data, tmp_path, caplog, workers):
    d, m = _copy(data, tmp_path)
    bad = m["splits"]["train"][1]["file"]
    (d / bad).write_bytes((d / bad).read_bytes()[:3000])
    clean = reader(data, num_workers=workers)
    r = PackedSequenceReader(str(d), "train", L, B, num_workers=workers, skip_corrupt=True,
                             shuffle_window_tokens=WINDOW)
    assert len(r) == len(clean)
    with caplog.at_level(logging.WARNING, logger="data_prep.reader"):
        got = take(r, 2 * len(r))
    assert len(got) == 2 * len(r) and r.state_dict()["epoch"] == 2
    assert r.skipped_shards == 1
    if workers == 0:
        assert bad in caplog.text


def test_cli_verify(data, tmp_path, capsys):
    from data_prep.cli import main

    assert main(["verify", "--data", str(data / "shards")]) == 0
    d, m = _copy(data, tmp_path)
    f = d / m["splits"]["valid"][0]["file"]
    f.write_bytes(f.read_bytes()[:-512])
    assert main(["verify", "--data", str(d)]) == 1
    assert f.name in capsys.readouterr().err
    assert main(["verify", "--data", str(tmp_path / "nowhere")]) == 2
