"""jrt-ckpt: look into a checkpoint, or check that it is intact, without a GPU or a process group.

    jrt-ckpt inspect DIR [--no-hash] [--tensors N]   what it holds, then "verified: ok"
    jrt-ckpt verify DIR                              sizes and sha256 of every file; one line

DIR is a checkpoint (save_dir/step_0000100) or a save_dir (its newest complete checkpoint;
newer ones that fail to verify are named on stderr). Exit status 0 when it verifies, 1 when
not, with the damaged file named. Also `python -m checkpoints_tools.cli ...`.
"""
from __future__ import annotations

import argparse
import sys

from checkpoints_tools import inspect_checkpoint
from checkpoints_tools.locate import PATH_HELP, verified_checkpoint
from megatron_jrt.quiet import silence_megatron_noise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jrt-ckpt", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect_checkpoint.add_arguments(commands.add_parser(
        "inspect", help="print step, consumed samples, layout, config and tensors; verify",
        description=inspect_checkpoint.__doc__.split("\n")[0]))
    verify = commands.add_parser("verify", help="check sizes and sha256 of every file",
                                 description="Check sizes and sha256 of every file against "
                                             "checkpoint.json; print one result line.")
    verify.add_argument("path", metavar="DIR", help=PATH_HELP)
    args = parser.parse_args(argv)
    silence_megatron_noise()
    return inspect_checkpoint.run(args) if args.command == "inspect" else _verify(args.path)


def _verify(path: str) -> int:
    from megatron_jrt.checkpoint import CheckpointError

    try:
        checkpoint = verified_checkpoint(path)
    except CheckpointError as exc:
        print(f"verified: FAILED: {exc}")
        return 1
    files = checkpoint.body["files"]
    print(f"verified: ok (sizes and sha256): {checkpoint.path}, step {checkpoint.body['step']}, "
          f"{len(files)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
