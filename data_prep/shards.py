"""Tokenise documents in worker processes and write webdataset .tar shards plus manifest.json.

Shard layout (webdataset-compatible, plain ustar): one sample per document, member
`{doc_index:09d}.tokens.npy` holding the document's token ids with the end-of-document id
appended, as uint16 (vocab <= 65536) or uint32. Headers carry mtime 0, uid/gid 0 and no user
names, so the same input and tokenizer give byte-identical shards. Each shard is written under
a temporary name, fsynced, and renamed when complete; manifest.json is written last (also
atomically), so a folder with a manifest is a finished one.

Split: document i (counted over all inputs, empty ones skipped) goes to "valid" when
ceil((i+1) f) > ceil(i f), f = valid_fraction: evenly spread, the first document always in
valid when f > 0. Validation documents are held in memory (f times the corpus) and written at
the end as `valid_shards` shards of near-equal token counts, so that many readers can share them.
"""
import collections
import io
import json
import math
import multiprocessing as mp
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

from data_prep.documents import InputError, ReadStats, expand_inputs, iter_all_documents
from megatron_jrt.fsutil import atomic_write_bytes, commit, fsync_dir, sha256_file, tmp_name
from data_prep.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SHARD_RE = re.compile(r"^(train|valid)-\d{6}\.tar$")
MTIME = 0

_worker_tok = None


def _init_worker(spec: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(spec)


def _encode_batch(args):
    docs, dtype = args
    ids = _worker_tok.encode_batch(docs) if hasattr(_worker_tok, "encode_batch") else [_worker_tok.encode(d) for d in docs]
    eod = _worker_tok.eod_id
    return [np.array(x + [eod], dtype=dtype) for x in ids]


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
        self._tar = None

    def add(self, key: int, arr: np.ndarray) -> None:
        if self._tar is None:
            self._path = self.out_dir / f"{self.split}-{len(self.entries):06d}.tar"
            self._tmp = tmp_name(self._path)
            self._file = open(self._tmp, "wb")
            # Fixed mtime and owner make the shard a function of its content alone.
            self._tar = wds.TarWriter(self._file, user="", group="", mode=0o644, mtime=MTIME,
                                      encoder=False, format=tarfile.USTAR_FORMAT)
            self._samples = self._tokens = 0
        self._tar.write({"__key__": f"{key:09d}", "tokens.npy": npy_bytes(arr)})
        self._samples += 1
        self._tokens += int(arr.size)
        if self._tokens >= self.max_tokens:
            self.close_shard()

    def abort(self) -> None:
        if self._tar is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        commit(self._tmp, self._path)
        self.entries.append({"file": self._path.name, "samples": self._samples, "tokens": self._tokens,
                             "bytes": self._path.stat().st_size, "sha256": sha256_file(self._path)})
        self._tar = None


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


def _encoded(batches, spec: str, dtype, workers: int):
    """Token arrays in input order; `workers` processes, at most 2 batches each in flight."""
    if workers <= 1:
        _init_worker(spec)
        for b in batches:
            yield from _encode_batch((b, dtype))
        return
    # Not "fork": the caller may hold threads (torch, tqdm, a trainer), and a forked worker can inherit
    # a lock held by one of them and hang (seen: Pool.terminate waiting on a worker stuck in its queue).
    ctx = mp.get_context("forkserver" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec,)) as pool:
        pending = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(_encode_batch, ((b, dtype),)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def is_valid_doc(i: int, fraction: float) -> bool:
    return fraction > 0 and math.ceil((i + 1) * fraction) > math.ceil(i * fraction)


def write_shards(inputs: list[str], tokenizer: str, out_dir: str | Path, shard_size: int | str = "64M",
                 valid_fraction: float = 0.01, valid_shards: int = 8, workers: int = 2,
                 text_key: str = "text", strict_utf8: bool = False, overwrite: bool = False,
                 progress: bool = True, log=print) -> dict:
    """Run the whole shard job; returns the manifest (also written to out_dir/manifest.json)."""
    shard_tokens = parse_size(shard_size)
    if shard_tokens <= 0:
        raise ValueError("--shard-size must be positive")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        if not overwrite:
            raise FileExistsError(f"{manifest_path} exists; pass --overwrite to replace the shards in {out}")
        manifest_path.unlink()  # from here on the folder reads as unfinished until the new manifest lands
        fsync_dir(out)
    for stale in out.glob(".*.tmp-*"):
        stale.unlink()

    stats = ReadStats()
    docs = iter_all_documents(paths, text_key, "strict" if strict_utf8 else "replace", stats)
    train = _ShardWriter(out, "train", shard_tokens)
    valid_docs: list[tuple[int, np.ndarray]] = []
    n_tokens, t0 = 0, time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(unit="doc", desc="tokenising", disable=not progress, file=sys.stderr, mininterval=1.0)
    try:
        for i, arr in enumerate(_encoded(_batches(docs), str(tokenizer), dtype, workers)):
            if is_valid_doc(i, valid_fraction):
                valid_docs.append((i, arr))
            else:
                train.add(i, arr)
            n_tokens += arr.size
            bar.update(1)
            if i % 256 == 0:
                bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tokens/s")
        train.close_shard()
    except BaseException:
        train.abort()  # no half-written shard left behind; the folder has no manifest, so reads as unfinished
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if stats.documents == 0:
        raise InputError(f"no documents in {', '.join(map(str, paths))}: the inputs are empty or whitespace only")
    if not train.entries:
        raise InputError(f"all {stats.documents} documents went to the validation split; "
                         "lower --valid-fraction or add input")

    valid = _ShardWriter(out, "valid", 1 << 62)
    if valid_docs:
        n = min(valid_shards, len(valid_docs))
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
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    keep = {e["file"] for s in manifest["splits"].values() for e in s}
    for f in out.iterdir():
        if SHARD_RE.match(f.name) and f.name not in keep:
            f.unlink()  # shards of an earlier, larger run in the same folder

    for f in stats.files_with_bad_utf8:
        log(f"warning: {f}: bytes that are not UTF-8 were replaced by U+FFFD (use --strict-utf8 to fail instead)")
    if stats.empty_documents:
        log(f"note: skipped {stats.empty_documents} empty documents")
    log(f"{stats.documents} documents, {n_tokens:,} tokens in {seconds:.1f}s "
        f"({stats.documents / seconds:,.0f} docs/s, {n_tokens / seconds:,.0f} tokens/s, {workers} workers); "
        f"{len(train.entries)} train + {len(valid.entries)} valid shards in {out}")
    return manifest
