"""Tokenise documents in worker processes and write webdataset .tar shards plus manifest.json.

Shard layout (webdataset-compatible, plain ustar): one sample per document, member
`{doc_index:09d}.tokens.npy` holding the document's token ids with the end-of-document id
appended, as uint16 (vocab <= 65536) or uint32. Headers carry mtime 0, uid/gid 0 and no user
names, so the same input and tokenizer give byte-identical shards. Each shard is written under
a temporary name, fsynced, and renamed when complete; manifest.json is written last (also
atomically), so a folder with a manifest is a finished one. A run that stops early (an error, Ctrl-C,
SIGTERM) deletes the shard it was writing: what it leaves is complete shards and no manifest. A new run
in a folder without a manifest (or with --overwrite) first deletes all shards there, so that a folder
never mixes shards of two runs.

Split: document i (counted over all inputs, empty ones skipped) goes to "valid" when
ceil((i+1) f) > ceil(i f), f = valid_fraction: evenly spread, the first document always in
valid when f > 0. Validation documents are held in memory (f times the corpus) and written at
the end as `valid_shards` shards of near-equal token counts, so that many readers can share them.
"""
import contextlib
import io
import json
import math
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from data_prep.documents import InputError, ReadStats, expand_inputs, iter_all_documents
from data_prep.encode_workers import EncoderWorkers, encode_documents
from data_prep.layout import MANIFEST, published_shards
from megatron_jrt.fsutil import atomic_write_bytes, commit, fsync_dir, sha256_file, tmp_name
from data_prep.tokenizer import load_tokenizer

FORMAT_VERSION = 1
MTIME = 0


def parse_size(s: str | int) -> int:
    """'64M' -> 64_000_000 tokens (K, M, G are powers of 1000)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(s))
    if not m:
        raise ValueError(f"bad size {s!r}; expected a token count like 500000, 64M or 1G")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()])


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class _ShardWriter:
    """Writes one split's shards: `{split}-{k:06d}.tar`, each closed once it holds >= max_tokens."""

    def __init__(self, out_dir: Path, split: str, max_tokens: int):
        self.out_dir, self.split, self.max_tokens = out_dir, split, max_tokens
        self.entries: list[dict] = []
        self._tmp = self._file = self._tar = None

    def add(self, key: int, arr: np.ndarray) -> None:
        if self._tar is None:
            self._open_shard()
        self._tar.write({"__key__": f"{key:09d}", "tokens.npy": npy_bytes(arr)})
        self._samples += 1
        self._tokens += int(arr.size)
        if self._tokens >= self.max_tokens:
            self.close_shard()

    def _open_shard(self) -> None:
        self._path = self.out_dir / f"{self.split}-{len(self.entries):06d}.tar"
        self._tmp = tmp_name(self._path)  # set first: abort() removes it whenever an interrupt lands
        self._file = open(self._tmp, "wb")
        # Fixed mtime and owner make the shard a function of its content alone.
        self._tar = wds.TarWriter(self._file, user="", group="", mode=0o644, mtime=MTIME,
                                  encoder=False, format=tarfile.USTAR_FORMAT)
        self._samples = self._tokens = 0

    def abort(self) -> None:
        """Delete the shard being written; those already renamed are complete and stay."""
        try:
            if self._tar is not None:
                self._tar.close()  # before the file: collected unclosed, its stream writes to the closed file
        finally:
            if self._file is not None:
                self._file.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)  # missing if the interrupt came right after its rename
            self._tmp = self._file = self._tar = None

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        commit(self._tmp, self._path)
        self.entries.append({"file": self._path.name, "samples": self._samples, "tokens": self._tokens,
                             "bytes": self._path.stat().st_size, "sha256": sha256_file(self._path)})
        self._tmp = self._file = self._tar = None


def _batches(docs, max_docs: int = 64, max_chars: int = 1 << 20):
    batch, chars = [], 0
    for d in docs:
        batch.append(d)
        chars += len(d)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(batches, spec: str, dtype, workers: int) -> Iterator[np.ndarray]:
    """Token arrays in input order, tokenised in this process (workers <= 1) or in `workers` processes
    (data_prep/encode_workers.py: why not multiprocessing.Pool)."""
    if workers <= 1:
        tok = load_tokenizer(spec)
        for batch in batches:
            yield from encode_documents(tok, batch, dtype)
        return
    with EncoderWorkers(spec, dtype, workers) as pool:
        yield from pool.encode(batches)


def is_valid_doc(i: int, fraction: float) -> bool:
    return fraction > 0 and math.ceil((i + 1) * fraction) > math.ceil(i * fraction)


def _check_options(shard_tokens: int, valid_fraction: float, valid_shards: int) -> None:
    if shard_tokens <= 0:
        raise ValueError("--shard-size must be positive")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    if valid_shards < 0:
        raise ValueError(f"--valid-shards {valid_shards} must be 0 or more")
    if valid_shards == 0 and valid_fraction > 0:
        raise ValueError(f"--valid-shards 0 leaves no shard for the validation split of --valid-fraction "
                         f"{valid_fraction}; pass --valid-shards 1 or more, or --valid-fraction 0 for no split")


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Leave `out` with no manifest and no shards: a finished run is replaced only with `overwrite`.

    The manifest goes first, so that from then on the folder reads as unfinished; then every shard
    and temporary file, so that the folder never mixes shards of two runs.
    """
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        if not overwrite:
            raise FileExistsError(f"{manifest_path} exists; pass --overwrite to replace the shards in {out}")
        manifest_path.unlink()
        fsync_dir(out)
    for name in published_shards(out):
        (out / name).unlink()
    for stale in out.glob(".*.tmp-*"):
        stale.unlink()


def _write_train(arrays: Iterator[np.ndarray], train: _ShardWriter, valid_fraction: float,
                 progress: bool) -> tuple[list[tuple[int, np.ndarray]], int]:
    """Train documents into shards as they come; returns the validation documents (held in memory,
    written at the end) and the number of tokens of all documents."""
    from tqdm import tqdm

    valid_docs, n_tokens, t0 = [], 0, time.perf_counter()
    with tqdm(unit="doc", desc="tokenising", disable=not progress, file=sys.stderr, mininterval=1.0) as bar:
        for i, arr in enumerate(arrays):
            if is_valid_doc(i, valid_fraction):
                valid_docs.append((i, arr))
            else:
                train.add(i, arr)
            n_tokens += arr.size
            bar.update(1)
            if i % 256 == 0:
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
    train.close_shard()
    return valid_docs, n_tokens


def _check_split(stats: ReadStats, train: _ShardWriter, paths: list[Path]) -> None:
    if stats.documents == 0:
        raise InputError(f"no documents in {', '.join(map(str, paths))}: the inputs are empty or whitespace only")
    if not train.entries:
        raise InputError(f"all {stats.documents} documents went to the validation split; a .txt file is one "
                         "document: pass --split-text paragraph to make each of its paragraphs one, or add "
                         "input, or lower --valid-fraction")


def _write_valid(valid: _ShardWriter, valid_docs: list[tuple[int, np.ndarray]], n_shards: int) -> None:
    """`valid_docs` as `n_shards` shards of near-equal token counts (one per document if fewer)."""
    n = min(n_shards, len(valid_docs))
    total = sum(a.size for _, a in valid_docs)
    done = 0
    for j, (key, arr) in enumerate(valid_docs):
        valid.add(key, arr)
        done += arr.size
        left_docs, k = len(valid_docs) - j - 1, len(valid.entries) + 1
        # close at the k-th equal-token boundary, keeping one document for each shard still to come
        if k < n and (done >= total * k / n or left_docs <= n - k):
            valid.close_shard()
    valid.close_shard()


def write_shards(inputs: list[str], tokenizer: str, out_dir: str | Path, shard_size: int | str = "64M",
                 valid_fraction: float = 0.01, valid_shards: int = 8, workers: int = 2,
                 text_key: str = "text", strict_utf8: bool = False, overwrite: bool = False,
                 progress: bool = True, log=print, split_text: str = "file") -> dict:
    """Run the whole shard job; returns the manifest (also written to out_dir/manifest.json).

    Stopped early by any exception (KeyboardInterrupt included), it deletes the shard it was writing
    and writes no manifest; the complete shards stay (see the module docstring).
    """
    shard_tokens = parse_size(shard_size)
    _check_options(shard_tokens, valid_fraction, valid_shards)
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)

    stats = ReadStats()
    docs = iter_all_documents(paths, text_key, "strict" if strict_utf8 else "replace", stats, split_text)
    train, valid = _ShardWriter(out, "train", shard_tokens), _ShardWriter(out, "valid", 1 << 62)
    t0 = time.perf_counter()
    try:
        with contextlib.closing(_encoded(_batches(docs), str(tokenizer), dtype, workers)) as arrays:
            valid_docs, n_tokens = _write_train(arrays, train, valid_fraction, progress)
        seconds = time.perf_counter() - t0
        _check_split(stats, train, paths)
        _write_valid(valid, valid_docs, valid_shards)
    except BaseException:
        train.abort()
        valid.abort()
        raise

    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "tokenizer": {"spec": Path(str(tokenizer)).name if not str(tokenizer).startswith("gpt2") else "gpt2",
                      "hash": tok.hash, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
                      "mask_id": tok.mask_id, "pad_id": tok.pad_id},
        "inputs": [p.name for p in paths],
        "valid_fraction": valid_fraction,
        "documents": stats.documents,
        "empty_documents_skipped": stats.empty_documents,
        "files_with_replaced_utf8": [Path(f).name for f in stats.files_with_bad_utf8],
        "splits": {"train": train.entries, "valid": valid.entries},
    }
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())

    for f in stats.files_with_bad_utf8:
        log(f"warning: {f}: bytes that are not UTF-8 were replaced by U+FFFD (use --strict-utf8 to fail instead)")
    if stats.empty_documents:
        log(f"note: skipped {stats.empty_documents} empty documents")
    log(f"{stats.documents} documents, {n_tokens:,} tokens in {seconds:.1f}s "
        f"({stats.documents / seconds:,.0f} docs/s, {n_tokens / seconds:,.0f} tokens/s, {workers} workers); "
        f"{len(train.entries)} train + {len(valid.entries)} valid shards in {out}")
    return manifest
