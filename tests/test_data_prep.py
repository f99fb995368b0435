"""Tokenizer training/adapters, shard writing, input errors (CPU, ~20 s on 2 cores)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main as cli_main
from tests.smalldata import bundled_excerpt
from data_prep.corpus import bundled_corpus_paths
from data_prep.documents import InputError, iter_all_documents
from data_prep.shards import is_valid_doc, write_shards
from data_prep.tokenizer import (GPT2_EOD_ID, GPT2_MASK_ID, GPT2_VOCAB_SIZE, EOD_ID, MASK_ID, PAD_ID,
                                 load_tokenizer, train_sentencepiece)

REPO = Path(__file__).resolve().parents[1]


def _small_corpus(tmp: Path, n_docs: int = 120) -> Path:
    """The first n_docs documents of the bundled corpus as jsonl.gz (keeps tests quick)."""
    return bundled_excerpt(tmp / "small.jsonl.gz", n_docs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    train_sentencepiece(iter_all_documents([corpus]), out, vocab_size=1000)
    return out


def _dir_bytes(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# ---------------------------------------------------------------- tokenizer

def test_bundled_corpus_is_there_and_small():
    paths = bundled_corpus_paths()
    assert paths and all(p.stat().st_size < 8e6 for p in paths)
    assert (paths[0].parent / "LICENSE.txt").is_file()


def test_trained_tokenizer_special_ids(tok_path):
    tok = load_tokenizer(str(tok_path))
    assert (tok.pad_id, tok.eod_id, tok.mask_id) == (PAD_ID, EOD_ID, MASK_ID) == (0, 2, 3)
    assert tok.vocab_size == 1000
    assert tok.hash == hashlib.sha256(tok_path.read_bytes()).hexdigest()
    text = "To be, or not to be: 1611 [MASK] \u00e9\u4e2d"
    ids = tok.encode(text)
    assert MASK_ID not in ids and EOD_ID not in ids  # literal "[MASK]" is text, not the mask id
    assert tok.decode(ids) == text                   # byte_fallback: nothing is lost
    digits = [p for p in ids if tok.decode([p]).strip().isdigit()]
    assert all(len(tok.decode([p]).strip()) == 1 for p in digits)  # split_digits


def test_tokenizer_training_is_deterministic(tmp_path, corpus, tok_path):
    again = train_sentencepiece(iter_all_documents([corpus]), tmp_path / "again.model", vocab_size=1000)
    assert again.read_bytes() == tok_path.read_bytes()


def test_existing_sentencepiece_model_without_mask(tmp_path):
    import sentencepiece as spm

    lines = [f"line {i} of some plain text about kings and queens" for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=60, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "plain.model"))
    assert tok.mask_id == 60 and tok.vocab_size == 61   # reserved one past the vocabulary
    assert tok.eod_id == 2 and tok.pad_id == tok.eod_id  # default spm: no pad -> pad = eod


def test_missing_tokenizer_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(str(tmp_path / "nope.model"))


def test_gpt2_adapter_clear_error_without_files(tmp_path):
    with pytest.raises(ValueError, match="vocab.json and merges.txt"):
        load_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(f"gpt2:{tmp_path}")


def test_gpt2_adapter_clear_error_without_tokenizers_package(tmp_path, monkeypatch):
    (tmp_path / "vocab.json").write_text("{}")
    (tmp_path / "merges.txt").write_text("")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(f"gpt2:{tmp_path}")


def test_gpt2_layout_with_tiny_fake_vocab(tmp_path):
    pytest.importorskip("tokenizers")
    # byte-level symbols for "hi there", merges h+i, t+h; <|endoftext|> at its GPT-2 id
    vocab = {c: i for i, c in enumerate(["h", "i", "t", "e", "r", "\u0120", "hi", "th"])}
    vocab["<|endoftext|>"] = GPT2_EOD_ID
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i\nt h\n")
    tok = load_tokenizer(f"gpt2:{tmp_path}")
    assert (tok.vocab_size, tok.eod_id, tok.pad_id, tok.mask_id) == (50264, 50256, 50256, 50263)
    assert (GPT2_VOCAB_SIZE, GPT2_MASK_ID) == (50264, 50263)
    ids = tok.encode("hi there")
    assert ids[0] == vocab["hi"] and tok.decode(ids) == "hi there"
    # shards through the adapter: uint16 still fits 50264
    (tmp_path / "d.txt").write_text("hi there hi")
    m = write_shards([str(tmp_path / "d.txt")], f"gpt2:{tmp_path}", tmp_path / "sh", valid_fraction=0,
                     workers=1, progress=False, log=lambda s: None)
    assert m["dtype"] == "uint16" and m["tokenizer"]["mask_id"] == 50263


# ---------------------------------------------------------------- shards

def test_shards_byte_identical_and_worker_count_independent(tmp_path, corpus, tok_path):
    kw = dict(shard_size="20k", valid_fraction=0.05, valid_shards=3, progress=False, log=lambda s: None)
    m1 = write_shards([str(corpus)], str(tok_path), tmp_path / "a", workers=2, **kw)
    write_shards([str(corpus)], str(tok_path), tmp_path / "b", workers=2, **kw)
    write_shards([str(corpus)], str(tok_path), tmp_path / "c", workers=1, **kw)
    a = _dir_bytes(tmp_path / "a")
    assert a == _dir_bytes(tmp_path / "b") == _dir_bytes(tmp_path / "c")
    assert len(m1["splits"]["train"]) > 3 and len(m1["splits"]["valid"]) == 3
    for split in m1["splits"].values():
        for e in split:
            assert hashlib.sha256(a[e["file"]]).hexdigest() == e["sha256"]
    assert not [n for n in a if ".tmp" in n]


def test_shards_content_and_webdataset_compatible(tmp_path, corpus, tok_path):
    import webdataset as wds

    m = write_shards([str(corpus)], str(tok_path), tmp_path, shard_size="20k", valid_fraction=0.05,
                     workers=1, progress=False, log=lambda s: None)
    tok = load_tokenizer(str(tok_path))
    docs = list(iter_all_documents([corpus]))
    e = m["splits"]["train"][0]
    samples = list(wds.WebDataset(str(tmp_path / e["file"]), shardshuffle=False).decode())
    assert len(samples) == e["samples"]
    assert sum(s["tokens.npy"].size for s in samples) == e["tokens"]
    for s in samples[:5]:
        arr = s["tokens.npy"]
        i = int(s["__key__"])
        assert arr.dtype == np.uint16 and arr[-1] == tok.eod_id
        assert arr[:-1].tolist() == tok.encode(docs[i])
        assert not is_valid_doc(i, 0.05)
    assert m["documents"] == len(docs)
    n_valid = sum(e["samples"] for e in m["splits"]["valid"])
    assert n_valid == sum(is_valid_doc(i, 0.05) for i in range(len(docs))) == int(np.ceil(len(docs) * 0.05))


def test_existing_manifest_needs_overwrite(tmp_path, corpus, tok_path):
    kw = dict(valid_fraction=0, workers=1, progress=False, log=lambda s: None)
    write_shards([str(corpus)], str(tok_path), tmp_path, shard_size="10k", **kw)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards([str(corpus)], str(tok_path), tmp_path, **kw)
    m = write_shards([str(corpus)], str(tok_path), tmp_path, shard_size="1G", overwrite=True, **kw)
    assert len(m["splits"]["train"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train-000000.tar"]  # stale gone


# ---------------------------------------------------------------- input errors

def test_empty_input(tmp_path, tok_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_text('{"text": "   "}\n\n')
    with pytest.raises(InputError, match="no documents"):
        write_shards([str(tmp_path / "empty.txt"), str(tmp_path / "blank.jsonl")], str(tok_path),
                     tmp_path / "out", workers=1, progress=False, log=lambda s: None)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "ok.txt").write_text("Some words.")
    m = write_shards([str(tmp_path / "*.txt"), str(tmp_path / "blank.jsonl")], str(tok_path), tmp_path / "out2",
                     valid_fraction=0, workers=1, progress=False, log=lambda s: None)
    assert m["documents"] == 1 and m["empty_documents_skipped"] == 2


def test_tokenizer_cli_empty_input(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert cli_main(["tokenizer", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t.model")]) == 2
    assert "empty.txt" in capsys.readouterr().err and not (tmp_path / "t.model").exists()


def test_crash_mid_run_leaves_no_partial_files(tmp_path, tok_path):
    (tmp_path / "a.txt").write_text("Fine text. " * 2000)
    (tmp_path / "b.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(InputError):
        write_shards([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], str(tok_path), tmp_path / "o",
                     shard_size="1M", workers=1, progress=False)
    assert list((tmp_path / "o").iterdir()) == []


def test_non_utf8_replaced_or_strict(tmp_path, tok_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    logs = []
    m = write_shards([str(bad)], str(tok_path), tmp_path / "out", valid_fraction=0, workers=1,
                     progress=False, log=logs.append)
    assert m["files_with_replaced_utf8"] == ["latin1.txt"]
    assert any("latin1.txt" in s and "U+FFFD" in s for s in logs)
    with pytest.raises(InputError, match=r"latin1.txt.*not valid UTF-8 at byte 3"):
        write_shards([str(bad)], str(tok_path), tmp_path / "out2", strict_utf8=True, workers=1,
                     progress=False, log=lambda s: None)


def test_bad_jsonl_names_file_and_line(tmp_path, tok_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: no 'text' field"):
        write_shards([str(f)], str(tok_path), tmp_path / "o", workers=1, progress=False)
    f.write_text('{"text": "fine"}\n\n{"text": "broken\n')
    with pytest.raises(InputError, match=r"bad.jsonl:3: not valid JSON"):
        write_shards([str(f)], str(tok_path), tmp_path / "o", workers=1, progress=False)


def test_missing_input_names_file(tmp_path, tok_path):
    with pytest.raises(InputError, match="missing.jsonl"):
        write_shards([str(tmp_path / "missing.jsonl")], str(tok_path), tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="matches no file"):
        write_shards([str(tmp_path / "*.jsonl")], str(tok_path), tmp_path / "o", progress=False)


# ---------------------------------------------------------------- CLI

def test_cli_module_end_to_end(tmp_path, corpus):
    tok = tmp_path / "t.model"
    r = subprocess.run([sys.executable, "-m", "data_prep.cli", "tokenizer", "--input", str(corpus),
                        "--vocab-size", "600", "--out", str(tok)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pad=0 eod=2 mask=3" in r.stdout
    assert cli_main(["shards", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "s"),
                     "--shard-size", "30k", "--no-progress", "--workers", "1"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["tokenizer"]["hash"] == load_tokenizer(str(tok)).hash
    assert cli_main(["shards", "--input", str(tmp_path / "none.txt"), "--tokenizer", str(tok),
                     "--out", str(tmp_path / "s2")]) == 2


def test_prepare_bundled_is_idempotent(tmp_path):
    from data_prep.corpus import prepare_bundled
    from data_prep.reader import PackedSequenceReader

    a = prepare_bundled(tmp_path, vocab_size=1000)
    mtime = (Path(a["data_dir"]) / "manifest.json").stat().st_mtime_ns
    assert prepare_bundled(tmp_path, vocab_size=1000) == a
    assert (Path(a["data_dir"]) / "manifest.json").stat().st_mtime_ns == mtime  # nothing redone
    r = PackedSequenceReader(a["data_dir"], "valid", 256, 2, tokenizer_hash=a["tokenizer_hash"])
    assert len(r) > 0
