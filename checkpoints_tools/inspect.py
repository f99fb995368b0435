"""Print what a checkpoint holds and check that it is intact.

    python -m checkpoints_tools.inspect runs/x/ckpt/step_0000100 [--no-hash] [--tensors N]
    python -m checkpoints_tools.inspect runs/x/ckpt            # the newest complete checkpoint

Prints the step, consumed samples, parallel layout (TP/PP/DP) it was saved with, the run
config, every tensor (name, global shape, dtype), the total size, and "verified: ok" once every
file matched checkpoint.json (size and sha256) and dist_checkpointing read its metadata.
Exit status 1 with the problem (naming the file) when it does not verify. Needs no GPU and no
process group.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _flatten(f"{prefix}.{i}", sub, out)
    else:
        out[prefix] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="checkpoints_tools.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="a checkpoint directory, or a save_dir holding step_* ones")
    parser.add_argument("--no-hash", action="store_true", help="check sizes only (fast)")
    parser.add_argument("--tensors", type=int, default=0,
                        help="print at most N tensors (0: all)")
    args = parser.parse_args(argv)

    from megatron_jrt.checkpointing import (METADATA, CheckpointError, find_latest_complete,
                                            verify_checkpoint)

    path = Path(args.path)
    try:
        if not (path / METADATA).exists() and path.is_dir() and not (path / "common.pt").exists():
            found, problems = find_latest_complete(path)
            for problem in problems:
                print(f"WARNING: {problem}")
            if found is None:
                raise CheckpointError(f"{path}: no checkpoint (no {METADATA}, no step_* directory)")
            path = found
        body = verify_checkpoint(path, hashes=not args.no_hash)
        tensors = _tensors(path)
    except CheckpointError as exc:
        print(f"verified: FAILED: {exc}")
        return 1

    layout = body["layout"]
    print(f"checkpoint: {path}")
    print(f"step: {body['step']}")
    print(f"consumed samples: {body['consumed_samples']}")
    print(f"layout: TP={layout['tp']} PP={layout['pp']} DP={layout['dp']} "
          f"(world size {layout['world']})")
    print(f"optimizer sharding: {body.get('optimizer_sharding')}")
    print(f"saved at: {body.get('saved_at')}")
    flat: dict = {}
    _flatten("", body["config"], flat)
    print("config:")
    for key, value in flat.items():
        print(f"  {key}: {value}")
    shown = tensors if not args.tensors else tensors[: args.tensors]
    print(f"tensors: {len(tensors)}")
    for name, shape, dtype in shown:
        print(f"  {name} {list(shape)} {dtype}")
    if len(shown) < len(tensors):
        print(f"  ... {len(tensors) - len(shown)} more (--tensors 0 lists all)")
    total = sum(f["size"] for f in body["files"].values())
    print(f"files: {len(body['files'])}, total size: {total / 1e6:.2f} MB")
    print("verified: ok" + (" (sizes only)" if args.no_hash else " (sizes and sha256)"))
    return 0


def _tensors(path: Path) -> list[tuple[str, tuple, str]]:
    """(key, global shape, dtype) of every sharded tensor, from dist_checkpointing's metadata."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_jrt.checkpointing import CheckpointError

    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(path))
        dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - reported as a verification failure
        raise CheckpointError(f"{path}: dist_checkpointing cannot read its metadata "
                              f"({exc.__class__.__name__}: {exc})") from exc
    out = []
    for key, value in sorted(metadata.items()):
        if isinstance(value, ShardedTensor):
            out.append((key, tuple(value.global_shape), str(value.dtype).replace("torch.", "")))
    return out


if __name__ == "__main__":
    sys.exit(main())
