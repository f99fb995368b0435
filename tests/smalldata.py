"""A small corpus and tokenizer for tests that need real shards (a few seconds to make)."""
from __future__ import annotations

import gzip
from pathlib import Path


def bundled_excerpt(out: Path, documents: int) -> Path:
    """`out` (.jsonl.gz): the first `documents` documents of the bundled corpus."""
    from data_prep.corpus import bundled_corpus_paths

    with gzip.open(bundled_corpus_paths()[0], "rt") as f, gzip.open(out, "wt") as g:
        for _, line in zip(range(documents), f):
            g.write(line)
    return out


def small_corpus(root: Path, documents: int = 200, vocab_size: int = 1000) -> tuple[Path, Path]:
    """(root/c.jsonl.gz with the first `documents` bundled documents, root/tok.model on it)."""
    from data_prep.documents import iter_all_documents
    from data_prep.tokenizer import train_sentencepiece

    corpus = bundled_excerpt(root / "c.jsonl.gz", documents)
    tok = root / "tok.model"
    train_sentencepiece(iter_all_documents([corpus]), tok, vocab_size=vocab_size)
    return corpus, tok
