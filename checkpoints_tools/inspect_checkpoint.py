"""Print what a checkpoint holds, after checking that it is intact: `jrt-ckpt inspect`.

    jrt-ckpt inspect runs/x/ckpt/step_0000100 [--no-hash] [--tensors N]
    jrt-ckpt inspect runs/x/ckpt               # the newest complete checkpoint

Prints the step, consumed samples (and tokens), the engine that wrote it, the parallel layout
(TP/PP/DP) it was saved with, the run config, every tensor (name, global shape, dtype), the
total size, and "verified: ok" once every file matched checkpoint.json (size and sha256) and
its metadata read (dist_checkpointing's, or the DeepSpeed model states: the model's fp32
parameters, as `jrt-convert to-hf` consolidates them). Exit status 1 with the problem (naming
the file) when it does not verify. Needs no GPU and no process group.
"""
from __future__ import annotations

import argparse
import sys

from checkpoints_tools.locate import PATH_HELP, VerifiedCheckpoint, verified_checkpoint
from megatron_jrt.quiet import silence_megatron_noise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="DIR", help=PATH_HELP)
    parser.add_argument("--no-hash", action="store_true", help="check sizes only (fast)")
    parser.add_argument("--tensors", type=int, default=0, metavar="N",
                        help="print at most N tensors (0: all)")


def run(args: argparse.Namespace) -> int:
    from megatron_jrt.checkpoint import CheckpointError

    try:
        checkpoint = verified_checkpoint(args.path, hashes=not args.no_hash)
        tensors = _tensors(checkpoint)
    except CheckpointError as exc:
        print(f"verified: FAILED: {exc}")
        return 1
    _print_report(checkpoint, tensors, args.tensors)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`jrt-ckpt inspect` on its own: `python -m checkpoints_tools.inspect_checkpoint DIR`."""
    parser = argparse.ArgumentParser(prog="jrt-ckpt inspect", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    silence_megatron_noise()
    return run(args)


def _print_report(checkpoint: VerifiedCheckpoint, tensors: list[tuple[str, tuple, str]],
                  limit: int) -> None:
    body, layout = checkpoint.body, checkpoint.body["layout"]
    print(f"checkpoint: {checkpoint.path}")
    print(f"step: {body['step']}")
    print(f"consumed samples: {body['consumed_samples']}")
    if "consumed_tokens" in body:
        print(f"consumed tokens: {body['consumed_tokens']}")
    engine = body.get("engine", "megatron")
    print(f"engine: {engine}" + (f" (ZeRO stage {body.get('zero_stage')})"
                                 if engine == "deepspeed" else ""))
    print(f"layout: TP={layout['tp']} PP={layout['pp']} DP={layout['dp']} "
          f"(world size {layout['world']})")
    print(f"optimizer sharding: {body.get('optimizer_sharding')}")
    print(f"saved at: {body.get('saved_at')}")
    flat: dict = {}
    _flatten("", body["config"], flat)
    print("config:")
    for key, value in flat.items():
        print(f"  {key}: {value}")
    shown = tensors[:limit] if limit else tensors
    print(f"tensors: {len(tensors)}")
    for name, shape, dtype in shown:
        print(f"  {name} {list(shape)} {dtype}")
    if len(shown) < len(tensors):
        print(f"  ... {len(tensors) - len(shown)} more (--tensors 0 lists all)")
    total = sum(f["size"] for f in body["files"].values())
    print(f"files: {len(body['files'])}, total size: {total / 1e6:.2f} MB")
    print("verified: ok" + (" (sizes and sha256)" if checkpoint.hashes else " (sizes only)"))


def _flatten(prefix: str, value, out: dict) -> None:
    """{"a.b.0": leaf} for nested dicts and lists: one config line per value."""
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _flatten(f"{prefix}.{i}", sub, out)
    else:
        out[prefix] = value


def _tensors(checkpoint: VerifiedCheckpoint) -> list[tuple[str, tuple, str]]:
    """(key, global shape, dtype) of every sharded tensor, from dist_checkpointing's metadata,
    or of every parameter of a DeepSpeed checkpoint (fp32: ZeRO's master weights)."""
    from checkpoints_tools.read_tensors import checkpoint_engine
    from megatron_jrt.checkpoint import CheckpointError

    path = checkpoint.path
    if checkpoint_engine(checkpoint) == "deepspeed":
        from megatron_jrt.training.engines.deepspeed_checkpoint import weight_shapes

        try:
            shapes = weight_shapes(path)
        except (OSError, RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: cannot read its DeepSpeed model states "
                                  f"({exc.__class__.__name__}: {exc})") from exc
        return [(name, shape, "float32") for name, shape in sorted(shapes.items())]

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(path))
        dist_checkpointing.load_common_state_dict(str(path))
    except Exception as exc:  # noqa: BLE001 - reported as a verification failure
        raise CheckpointError(f"{path}: dist_checkpointing cannot read its metadata "
                              f"({exc.__class__.__name__}: {exc})") from exc
    return [(key, tuple(value.global_shape), str(value.dtype).replace("torch.", ""))
            for key, value in sorted(metadata.items()) if isinstance(value, ShardedTensor)]


if __name__ == "__main__":
    sys.exit(main())
