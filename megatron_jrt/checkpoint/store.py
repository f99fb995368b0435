"""The on-disk checkpoint store: layout, completeness marker, verification, publication, retention.

A checkpoint is one directory ``save_dir/step_0000100/``:

    __0_0.distcp ... .metadata   model + optimizer tensors (dist_checkpointing, torch_dist)
    common.pt                    scheduler, step, consumed samples (dist_checkpointing common)
    metadata.json                dist_checkpointing's own (backend, version)
    rank_state/rank_00003.pt     per-rank RNG states and data-reader state
    checkpoint.json              written last: step, layout, config, size + sha256 of every file

How a save stays crash-safe: every file is written into ``save_dir/.tmp_step_0000100/``;
``checkpoint.json`` is written last inside it, then the directory is renamed to its final name
(one atomic ``os.rename``) and fsynced, and only then ``save_dir/latest`` (a one-line text file,
written tmp + rename) is updated. A save killed at any moment leaves at most a ``.tmp_*``
directory, which is never read and is removed at the next start-up; the previous checkpoint is
untouched. Retention (keep the last K, plus every N-th step) deletes only after publication.

Which checkpoint is the newest: the one published last. Every checkpoint.json holds a
``sequence`` number one above the highest in the folder when it was published, so after an
explicit resume from an older step the new branch's saves are newer than the abandoned
branch's higher steps; ``latest`` names the same checkpoint for people and scripts.

Nothing here is collective: these functions run on one process (rank 0, or a tool).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from megatron_jrt.fsutil import atomic_write_bytes, fsync_dir, sha256_file

FORMAT_VERSION = 2  # 2: LR schedule counted in optimizer steps, consumed tokens, sequence
METADATA = "checkpoint.json"  # ours; dist_checkpointing owns "metadata.json"
LATEST = "latest"
RANK_STATE_DIR = "rank_state"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")
_TMP_PREFIX = ".tmp_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or incompatible; the message says which."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def tmp_dir(save_dir: Path, step: int) -> Path:
    """Where the files of `step` are written before publication."""
    return save_dir / f"{_TMP_PREFIX}{step_dir_name(step)}"


def list_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory except the completeness marker, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != METADATA)


# -------------------------------------------------------------------- completeness marker

def _metadata_text(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True)
    return json.dumps({"sha256": hashlib.sha256(canonical.encode()).hexdigest(), "body": body},
                      indent=1, sort_keys=True) + "\n"


def write_metadata(directory: Path, body: dict) -> None:
    """checkpoint.json, the completeness marker: the last file written into a checkpoint."""
    with open(directory / METADATA, "w") as handle:
        handle.write(_metadata_text(body))
        handle.flush()
        os.fsync(handle.fileno())


def read_metadata(path: str | Path) -> dict:
    """The metadata body of checkpoint `path`; CheckpointError if absent or damaged."""
    file = Path(path) / METADATA
    if not file.is_file():
        raise CheckpointError(f"{path}: no {METADATA}; the checkpoint is incomplete (its save "
                              "did not finish) or this is not a checkpoint directory")
    try:
        raw = json.loads(file.read_text())
        body, digest = raw["body"], raw["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: damaged ({exc.__class__.__name__}: {exc})") from None
    if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != digest:
        raise CheckpointError(f"{file}: damaged (its content does not match its sha256)")
    if body.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {body.get('format_version')}, this code "
                              f"reads {FORMAT_VERSION}; resume it with the megatron-jrt "
                              "version that wrote it")
    return body


def verify_checkpoint(path: str | Path, *, hashes: bool = True, shard: tuple[int, int] = (0, 1)
                      ) -> dict:
    """Check every file of checkpoint `path` against checkpoint.json; return the metadata body.

    Raises CheckpointError naming the first missing, truncated or altered file (size first,
    then sha256 unless `hashes=False`). `shard=(i, n)` hashes only every n-th file from i
    (for splitting the work between ranks); sizes are always checked for all files.
    """
    path = Path(path)
    body = read_metadata(path)
    files = body["files"]
    for index, name in enumerate(sorted(files)):
        expected = files[name]
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing (listed in {METADATA})") from None
        if size != expected["size"]:
            raise CheckpointError(f"{file}: {size} bytes, {METADATA} says {expected['size']}; "
                                  "the file is truncated or was rewritten")
        if hashes and index % shard[1] == shard[0] and sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from {METADATA}; the file is corrupted")
    return body


def checkpoint_size(body: dict) -> int:
    """Bytes of all files of a checkpoint, from its metadata body."""
    return sum(f["size"] for f in body["files"].values())


# ------------------------------------------------------------------------ finding them

def list_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """Published step directories (complete or not), by step, oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _sequence(path: Path) -> int:
    """The publication number of a checkpoint (0 when unreadable: sorts it by step alone)."""
    try:
        return int(read_metadata(path).get("sequence", 0))
    except CheckpointError:
        return 0


def in_publication_order(save_dir: str | Path) -> list[Path]:
    """Published step directories, the one published first first (ties: by step)."""
    return [path for _, _, path in sorted((_sequence(p), step, p)
                                          for step, p in list_checkpoints(save_dir))]


def next_sequence(save_dir: Path) -> int:
    """The publication number for the next checkpoint saved into `save_dir`."""
    return max((_sequence(p) for _, p in list_checkpoints(save_dir)), default=0) + 1


def find_latest_complete(save_dir: str | Path, *, verify=None) -> tuple[Path | None, list[str]]:
    """(the checkpoint published last that verifies, warnings about later ones that did not).

    (None, []) when `save_dir` holds no step directory at all; CheckpointError when it holds
    some but none verifies (never a silent restart from scratch). `verify(path)` defaults to
    `verify_checkpoint`.
    """
    verify = verify or verify_checkpoint
    found = in_publication_order(save_dir)
    problems: list[str] = []
    for path in reversed(found):
        try:
            verify(path)
            return path, problems
        except CheckpointError as exc:
            problems.append(f"skipping checkpoint {path}: {exc}")
    if found:
        raise CheckpointError(f"{save_dir}: no complete checkpoint; " + "; ".join(problems))
    return None, []


# --------------------------------------------------------------- publication, retention

def publish(tmp: Path, final: Path, body: dict, *, keep_last: int, keep_every: int) -> None:
    """Mark `tmp` complete, rename it to `final`, point `latest` at it, apply retention."""
    save_dir = final.parent
    write_metadata(tmp, body)
    fsync_dir(tmp)
    if final.exists():  # a checkpoint of this step already exists: replace it
        trash = save_dir / f".trash_{final.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        shutil.rmtree(trash)
    os.rename(tmp, final)
    fsync_dir(save_dir)
    atomic_write_bytes(save_dir / LATEST, (final.name + "\n").encode())
    if keep_last > 0:
        apply_retention(save_dir, keep_last, keep_every)


def apply_retention(save_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete checkpoints except the last `keep_last` published and every `keep_every`-th step."""
    found = in_publication_order(save_dir)
    keep = set(found[-keep_last:])
    if keep_every > 0:
        keep |= {p for step, p in list_checkpoints(save_dir) if step % keep_every == 0}
    for path in found:
        if path not in keep:
            trash = save_dir / f".trash_{path.name}"
            os.rename(path, trash)  # never leave a half-deleted step_* directory behind
            shutil.rmtree(trash, ignore_errors=True)


def remove_stale_tmp(save_dir: Path) -> list[str]:
    """Delete `.tmp_*` / `.trash_*` leftovers of killed saves; return their names.

    Call only while holding the save_dir lock: another run's save in progress also looks
    like this.
    """
    removed = []
    if save_dir.is_dir():
        for path in sorted(save_dir.iterdir()):
            if path.is_dir() and path.name.startswith((_TMP_PREFIX, ".trash_")):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


def saved_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def previous_size(save_dir: Path) -> int:
    """Bytes of the checkpoint published last (0 when there is none readable)."""
    found = in_publication_order(save_dir)
    for path in reversed(found):
        try:
            return checkpoint_size(read_metadata(path))
        except CheckpointError:
            continue
    return 0


def check_free_space(save_dir: Path, needed: int) -> None:
    """CheckpointError when the file system of `save_dir` has less than `needed` bytes free."""
    free = shutil.disk_usage(save_dir).free
    if free < needed:
        raise CheckpointError(
            f"checkpoint.save_dir {save_dir}: {free / 1e9:.2f} GB free, a checkpoint needs about "
            f"{needed / 1e9:.2f} GB (the size of the previous one); free space or lower "
            "checkpoint.keep_last")
