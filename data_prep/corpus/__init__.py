"""The corpus shipped in the repository, so that the demo and the tests need no download."""
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def bundled_corpus_paths() -> list[Path]:
    """Paths of the bundled corpus files (JSON lines, gzip, one document per line, field "text").

    `jrt-prep tokenizer` and `jrt-prep shards` read .jsonl.gz directly, so nothing is unpacked.
    Licence: CC-BY-2.5, see LICENSE.txt in this folder.
    """
    paths = sorted(_HERE.glob("*.jsonl.gz"))
    if not paths:
        raise FileNotFoundError(f"no bundled corpus (*.jsonl.gz) in {_HERE}; was the package installed "
                                "without its package_data?")
    return paths


def prepare_bundled(root: str | Path, vocab_size: int = 4096, shard_size: str | int = "100k",
                    valid_fraction: float = 0.02, workers: int = 2, progress: bool = False) -> dict:
    """Tokenizer + shards of the bundled corpus under `root`, made only if not already there.

    Returns {"tokenizer": root/tok{vocab_size}.model, "data_dir": root/shards{vocab_size}}. About
    5-10 s on 2 cores; for the CPU demo. Shards made with another tokenizer are rebuilt.
    """
    import json

    from data_prep.shards import MANIFEST, write_shards
    from data_prep.tokenizer import load_tokenizer, train_sentencepiece
    from data_prep.documents import iter_all_documents

    root = Path(root)
    tok_path, data_dir = root / f"tok{vocab_size}.model", root / f"shards{vocab_size}"
    if not tok_path.is_file():
        train_sentencepiece(iter_all_documents(bundled_corpus_paths()), tok_path, vocab_size=vocab_size)
    tok_hash = load_tokenizer(str(tok_path)).hash
    manifest = data_dir / MANIFEST
    if not manifest.is_file() or json.loads(manifest.read_text())["tokenizer"]["hash"] != tok_hash:
        write_shards([str(p) for p in bundled_corpus_paths()], str(tok_path), data_dir, shard_size=shard_size,
                     valid_fraction=valid_fraction, workers=workers, overwrite=True, progress=progress,
                     log=lambda s: None)
    return {"tokenizer": str(tok_path), "data_dir": str(data_dir), "tokenizer_hash": tok_hash}
