"""From the path a user typed to one verified checkpoint: the one named, or a save_dir's newest.

The jrt-ckpt commands, jrt-convert to-hf and jrt-generate start here, so that they accept the
same paths and verify alike.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

PATH_HELP = "a checkpoint directory, or a save_dir (then its newest complete checkpoint)"


@dataclass(frozen=True)
class VerifiedCheckpoint:
    path: Path
    body: dict  # its checkpoint.json body: step, layout, config, files
    hashes: bool  # whether sha256 was checked, not only sizes


def verified_checkpoint(path: str | Path, *, hashes: bool = True) -> VerifiedCheckpoint:
    """Checkpoint `path`, or the newest complete one in save_dir `path`, once it verifies.

    Newer checkpoints of a save_dir that fail to verify are skipped with one warning each on
    stderr. CheckpointError (naming the file) when nothing verifies.
    """
    from megatron_jrt.checkpoint import (METADATA, CheckpointError, find_latest_complete,
                                         read_metadata, verify_checkpoint)

    path = Path(path)
    verify = partial(verify_checkpoint, hashes=hashes)
    # A checkpoint has checkpoint.json, or at least common.pt when its save did not finish.
    if not path.is_dir() or (path / METADATA).exists() or (path / "common.pt").exists():
        return VerifiedCheckpoint(path, verify(path), hashes)
    found, skipped = find_latest_complete(path, verify=verify)
    for warning in skipped:
        print(f"jrt-ckpt: warning: {warning}", file=sys.stderr)
    if found is None:
        raise CheckpointError(f"{path}: no checkpoint (no {METADATA}, no step_* directory)")
    return VerifiedCheckpoint(found, read_metadata(found), hashes)

