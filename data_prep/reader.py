"""The reader the trainer uses: packed sequences of seq_length + 1 tokens from verified shards.

How the stream is defined (all of it computable from manifest.json, nothing from reading):

1. Epoch e orders the split's shards by a permutation drawn from (seed, e) (identity when not
   shuffling, the default for "valid"). Their documents, each ending in end-of-document,
   concatenated in that order form the epoch's token stream of T tokens.
2. The stream is cut into G = T // C sequences, C = seq_length + 1 (packing across documents).
3. Every (rank, worker) slot gets a contiguous run of sequences of the same length: rank r owns
   n = G // world sequences starting at r * n, split in turn into `max(1, num_workers)` runs of
   b * B sequences (B = micro_batch_size, b = batches per worker). The few sequences left over
   (fewer than world * (1 + workers * (B + 1))) are dropped for the epoch; every rank yields
   exactly `batches_per_epoch = b * max(1, num_workers)` batches, so DDP never waits on a rank.
4. A slot reads its run in windows of about `shuffle_window_tokens` tokens; within a window
   the sequence order is a permutation drawn from (seed, epoch, rank, worker, window).
5. A rank's stream interleaves its workers' batches round-robin (what torch's DataLoader does
   with an IterableDataset): batch p of the epoch is batch p // W of worker p % W.

State = (epoch, batches consumed in the epoch). Resuming seeks straight to the window that
holds the next batch: the cost is loading the shard(s) that window lies in and re-reading at
most one window, not the epoch. State is the same on every rank, so saving rank 0's is enough.
The stream depends on (seed, seq_length, micro_batch_size, dp_world_size, num_workers): a
state only loads into a reader built with the same values.

Integrity: a shard is checked against the manifest when a process first opens it (size and
sha256), and its sample and token counts are checked while parsing. A missing or corrupt shard
raises ShardError naming the file; with skip_corrupt=True it is skipped with a warning and
counted in `skipped_shards`, and its place is filled from the following shards, so the number
of sequences (and DDP step count) does not change, only their content.
"""
import bisect
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from webdataset.tariterators import tar_file_iterator

from data_prep.shards import FORMAT_VERSION, MANIFEST

log = logging.getLogger(__name__)

STATE_VERSION = 1


class ManifestError(ValueError):
    """manifest.json missing, unreadable, or not matching the run config (e.g. tokenizer hash)."""


class ShardError(RuntimeError):
    """A shard is missing or does not match the manifest; the message names the file."""


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: {data_dir} holds no finished shard run "
                            "(run `jrt-prep shards ... --out DIR`; the manifest is written last)")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read manifest ({e})") from e
    if m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {m.get('format_version')}, this reader reads {FORMAT_VERSION}")
    return m


# (path, size, mtime_ns) of shards whose sha256 this process has checked
_verified: set = set()


def read_shard(path: Path, entry: dict, dtype: np.dtype) -> np.ndarray:
    """All tokens of one shard (its documents concatenated), checked against its manifest entry."""
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(f"{path}: shard listed in the manifest is missing") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read shard ({e})") from e
    if len(data) != entry["bytes"]:
        raise ShardError(f"{path}: size {len(data)} bytes, manifest says {entry['bytes']}: "
                         "the shard is truncated or was replaced; re-run `jrt-prep shards`")
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        import hashlib

        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ShardError(f"{path}: sha256 does not match the manifest: the shard is corrupt; "
                             "re-run `jrt-prep shards` (or pass skip_corrupt to skip it)")
        _verified.add(key)
    parts = []
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            array = np.load(io.BytesIO(member["data"]), allow_pickle=False)
            if not member["fname"].endswith(".tokens.npy") or array.dtype != dtype:
                raise ShardError(f"{path}: member {member['fname']} is not a {np.dtype(dtype).name} "
                                 ".tokens.npy array")
            parts.append(array)
    except (tarfile.TarError, ValueError, EOFError) as e:
        raise ShardError(f"{path}: unreadable tar member ({e}): corrupt shard") from e
    samples = len(parts)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    if samples != entry["samples"] or tokens.size != entry["tokens"]:
        raise ShardError(f"{path}: read {samples} samples / {tokens.size} tokens, manifest says "
                         f"{entry['samples']} / {entry['tokens']}: corrupt shard")
    return tokens


class _TokenStream:
    """Reads the epoch's token stream (shards in `order`) from any offset, one shard in memory."""

    def __init__(self, plan: "_Plan", order: list[int], skipped: set):
        self.plan, self.order, self.skipped = plan, order, skipped
        sizes = [plan.entries[i]["tokens"] for i in order]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.pos = -1              # stream offset of the next token
        self.k = -1                # index into order of the loaded shard
        self.tokens = None

    def _load(self, k: int) -> bool:
        idx = self.order[k]
        entry = self.plan.entries[idx]
        path = self.plan.data_dir / entry["file"]
        if entry["file"] in self.skipped:
            return False
        try:
            self.tokens = read_shard(path, entry, self.plan.dtype)
        except ShardError as e:
            if not self.plan.skip_corrupt:
                raise
            self.skipped.add(entry["file"])
            log.warning("skipping shard (skip_corrupt=True): %s", e)
            return False
        self.k = k
        return True

    def seek(self, offset: int) -> None:
        if offset == self.pos:
            return
        k = bisect.bisect_right(self.starts, offset) - 1
        if k != self.k and not self._load(k):
            self.k, self.tokens = k, None  # corrupt: read() moves on to the next shard
        self.pos = offset

    def read(self, n: int) -> np.ndarray:
        out, filled, moved = np.empty(n, self.plan.dtype), 0, 0
        while filled < n:
            if self.tokens is not None:
                local = self.pos - self.starts[self.k] if self.pos >= self.starts[self.k] else 0
                take = min(n - filled, self.tokens.size - local)
                if take > 0:
                    out[filled:filled + take] = self.tokens[local:local + take]
                    filled += take
                    self.pos += take
                    continue
            # next shard (cyclically: only reached when corrupt shards were skipped)
            moved += 1
            if moved > 2 * len(self.order) + 1:
                raise ShardError(f"{self.plan.data_dir}: no readable shard left in split {self.plan.split!r}")
            k = (self.k + 1) % len(self.order)
            if not self._load(k):
                self.k, self.tokens = k, None
            elif self.pos < self.starts[k] or self.pos >= self.starts[k + 1]:
                self.pos = self.starts[k]  # filling in for a skipped shard: continue at the next one's start
        return out


class _Plan:
    """Everything about the stream that does not change while reading; picklable to workers."""

    def __init__(self, data_dir, split, seq_length, micro_batch_size, dp_rank, dp_world_size, seed,
                 num_workers, tokenizer_hash, skip_corrupt, shuffle, shuffle_window_tokens):
        self.data_dir = Path(data_dir)
        manifest = load_manifest(self.data_dir)
        if tokenizer_hash is not None and tokenizer_hash != manifest["tokenizer"]["hash"]:
            raise ManifestError(
                f"{self.data_dir / MANIFEST}: shards were tokenised with tokenizer hash "
                f"{manifest['tokenizer']['hash'][:16]}..., the run's tokenizer has {tokenizer_hash[:16]}...; "
                "re-shard with this tokenizer or point the run at the tokenizer the shards were made with")
        if split not in manifest["splits"] or not manifest["splits"][split]:
            raise ManifestError(f"{self.data_dir / MANIFEST}: no shards for split {split!r} "
                                f"(have {sorted(k for k, v in manifest['splits'].items() if v)})")
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_world_size={dp_world_size})")
        self.split, self.entries, self.dtype = split, manifest["splits"][split], np.dtype(manifest["dtype"])
        self.tokenizer = manifest["tokenizer"]
        self.seq_length, self.B, self.seed = seq_length, micro_batch_size, seed
        self.rank, self.world = dp_rank, dp_world_size
        self.nw = max(1, num_workers)
        self.skip_corrupt = skip_corrupt
        self.shuffle = (split == "train") if shuffle is None else shuffle
        C = self.C = seq_length + 1
        self.total_tokens = sum(e["tokens"] for e in self.entries)
        G = self.total_tokens // C
        self.per_rank = G // self.world
        self.per_worker = self.per_rank // self.nw
        self.b = self.per_worker // self.B
        if self.b == 0:
            raise ValueError(
                f"split {split!r} of {self.data_dir} holds {self.total_tokens} tokens = {G} sequences of "
                f"{C}; {self.world} ranks x {self.nw} workers x micro batch {self.B} need at least "
                f"{self.world * self.nw * self.B}: use more data, a larger --valid-fraction, or fewer workers")
        self.batches_per_epoch = self.b * self.nw
        self.dropped_tokens_per_epoch = self.total_tokens - self.batches_per_epoch * self.B * C * self.world
        self.window = max(1, shuffle_window_tokens // (C * self.B)) * self.B  # sequences, multiple of B

    def order(self, epoch: int) -> list[int]:
        n = len(self.entries)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def worker_batches(self, lw: int, epoch: int, j: int) -> Iterator[tuple[torch.Tensor, tuple]]:
        """Batches of logical worker `lw` from batch j of `epoch` on, forever, with skipped files."""
        skipped: set = set()
        B, C = self.B, self.C
        while True:
            if j >= self.b:
                epoch, j = epoch + 1, 0
                continue
            stream = _TokenStream(self, self.order(epoch), skipped)
            first = self.rank * self.per_rank + lw * self.per_worker  # first sequence of this slot
            n_seq = self.b * B
            while j < self.b:
                w0 = (j * B) // self.window * self.window
                wlen = min(self.window, n_seq - w0)
                stream.seek((first + w0) * C)
                seqs = stream.read(wlen * C).reshape(wlen, C)
                if self.shuffle:
                    perm = np.random.default_rng([self.seed, epoch, self.rank, lw, w0]).permutation(wlen)
                else:
                    perm = np.arange(wlen)
                for jb in range((j * B - w0) // B, wlen // B):
                    batch = torch.from_numpy(seqs[perm[jb * B:(jb + 1) * B]].astype(np.int64))
                    yield batch, tuple(sorted(skipped))
                    j += 1
            epoch, j = epoch + 1, 0


class _WorkerDataset(torch.utils.data.IterableDataset):
    """DataLoader worker k plays logical worker (k + p0) % W so that round-robin continues at p0."""

    def __init__(self, plan: _Plan, epoch: int, position: int):
        self.plan, self.epoch, self.position = plan, epoch, position

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k = info.id if info is not None else 0
        nw, p = self.plan.nw, self.position + k
        return self.plan.worker_batches(p % nw, self.epoch, p // nw)


class PackedSequenceReader:
    """Yields int64 tensors [micro_batch_size, seq_length + 1] forever; see the module docstring."""

    def __init__(self, data_dir: str, split: str, seq_length: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_world_size: int = 1, seed: int = 1234, num_workers: int = 0,
                 tokenizer_hash: str | None = None, skip_corrupt: bool = False, *,
                 shuffle: bool | None = None, shuffle_window_tokens: int = 1 << 21):
        self._plan = _Plan(data_dir, split, seq_length, micro_batch_size, dp_rank, dp_world_size, seed,
                           num_workers, tokenizer_hash, skip_corrupt, shuffle, shuffle_window_tokens)
        self.num_workers = num_workers
        self.batches_per_epoch = self._plan.batches_per_epoch
        self.dropped_tokens_per_epoch = self._plan.dropped_tokens_per_epoch
        self.tokenizer_info = self._plan.tokenizer
        self._epoch, self._position = 0, 0
        self._skipped: set = set()
        self._started = False

    @property
    def skipped_shards(self) -> int:
        return len(self._skipped)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._started = True
        p = self._plan
        if self.num_workers == 0:
            it = p.worker_batches(0, self._epoch, self._position)
        else:
            it = iter(torch.utils.data.DataLoader(
                _WorkerDataset(p, self._epoch, self._position), batch_size=None,
                num_workers=self.num_workers, prefetch_factor=4))
        try:
            for batch, skipped in it:
                if skipped:
                    self._skipped.update(skipped)
                self._position += 1
                if self._position == self.batches_per_epoch:
                    self._epoch, self._position = self._epoch + 1, 0
                yield batch
        finally:
            # stop DataLoader workers now, also when an error's traceback keeps this frame alive
            getattr(it, "_shutdown_workers", lambda: None)()

    def _config(self) -> dict:
        p = self._plan
        return {"split": p.split, "seed": p.seed, "seq_length": p.seq_length, "micro_batch_size": p.B,
                "dp_world_size": p.world, "num_workers": p.nw, "shuffle": p.shuffle,
                "window": p.window, "tokenizer_hash": p.tokenizer["hash"]}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self._epoch, "position": self._position, **self._config()}

    def load_state_dict(self, state: dict) -> None:
        if self._started:
            raise RuntimeError("load_state_dict must be called before iterating the reader")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"reader state version {state.get('version')}, expected {STATE_VERSION}")
        diff = {k: (state.get(k), v) for k, v in self._config().items() if state.get(k) != v}
        if diff:
            raise ValueError("reader state was saved with a different data config, so the stream would not "
                             "continue where it stopped: " + ", ".join(f"{k}: saved {a!r}, now {b!r}"
                                                                      for k, (a, b) in diff.items()))
        if not 0 <= state["position"] < self.batches_per_epoch:
            raise ValueError(f"reader state position {state['position']} not in [0, {self.batches_per_epoch})")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])
