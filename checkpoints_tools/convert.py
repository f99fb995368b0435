"""jrt-convert: a megatron_jrt checkpoint -> a Hugging Face model directory, on one CPU process.

    jrt-convert to-hf CKPT OUT [--max-shard-size 5GB] [--tokenizer TOK]
    jrt-convert from-hf HF_DIR SAVE_DIR [--make-vocab-size-divisible-by 8]

to-hf: CKPT is a checkpoint (save_dir/step_0000100) saved under any TP/PP layout, or a save_dir
(its newest complete checkpoint). OUT gets config.json (with auto_map), configuration_jrt.py,
modeling_jrt.py, model.safetensors (sharded with an index above --max-shard-size),
generation_config.json, and, when the run's data.tokenizer exists here or --tokenizer names
one, tokenizer.json + tokenizer_config.json (and tokenizer.model for SentencePiece). Load it
with `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(OUT)`.

from-hf: the inverse; SAVE_DIR/step_0000000 is a model-only checkpoint (no optimizer state)
that jrt-train loads under any TP/PP layout.

    jrt-convert from-authors DIR OUT [--megatron]

from-authors: an authors' release (hazyresearch/JRT-360M-30B, JRT-1B-50B: config.json +
pytorch_model.bin, JRT_SPEC.md section 7) -> our HF directory, or with --megatron a model-only
checkpoint OUT/step_0000000. Their tokenizer is GPT-2's: add it with `to-hf --tokenizer gpt2:DIR`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from megatron_jrt.startup_interrupt import end_of_start_up, exit_on_ctrl_c_during_imports

exit_on_ctrl_c_during_imports("jrt-convert", __name__)  # before torch and megatron

from checkpoints_tools.hf_dir import read_hf_dir, write_hf_dir  # noqa: E402 - after the start-up SIGINT handler
from checkpoints_tools.locate import PATH_HELP

SENTENCEPIECE_FILE = "tokenizer.model"  # also copied: tools that read SentencePiece directly


def to_hf(checkpoint: str | Path, out: str | Path, *, max_shard_size: str = "5GB",
          tokenizer: str | None = None) -> Path:
    """Convert checkpoint (or a save_dir's newest) into HF directory `out`; the checkpoint used.

    `tokenizer` (a SentencePiece .model or "gpt2:/dir") replaces the run's data.tokenizer."""
    from checkpoints_tools.hf_tokenizer import hf_tokenizer
    from checkpoints_tools.read_as_hf import read_as_hf
    from data_prep.tokenizer import SentencePieceTokenizer

    found = read_as_hf(checkpoint, tokenizer=tokenizer)
    converted = None if found.tokenizer is None else hf_tokenizer(found.tokenizer)  # or refuse
    out = Path(out)
    write_hf_dir(found.state, found.config, out, max_shard_size=max_shard_size)
    if converted is not None:
        converted.save_pretrained(out)
    if isinstance(found.tokenizer, SentencePieceTokenizer):
        shutil.copyfile(found.tokenizer.path, out / SENTENCEPIECE_FILE)
    return found.path


def _write_megatron(config, state: dict, save_dir: str | Path, source: str | Path,
                    make_vocab_size_divisible_by: int) -> Path:
    """HF `state` of a model of `config` as model-only checkpoint save_dir/step_0000000."""
    from checkpoints_tools.write_checkpoint import write_model_checkpoint
    from megatron_jrt.config import JRTModelConfig
    from megatron_jrt.hf.weights import hf_to_megatron, megatron_model_config

    model_config = megatron_model_config(config, make_vocab_size_divisible_by)
    padded = JRTModelConfig(**model_config).padded_vocab_size()
    try:
        tensors = hf_to_megatron(state, config, padded)
    except KeyError as exc:
        raise ValueError(f"{source}: no tensor {exc.args[0]!r} for the model of its "
                         "config.json; was it written by `jrt-convert to-hf`?") from None
    return write_model_checkpoint(tensors, model_config, save_dir)


def from_hf(hf_dir: str | Path, save_dir: str | Path, *,
            make_vocab_size_divisible_by: int = 8) -> Path:
    """Write HF directory `hf_dir` (to-hf's output) as checkpoint `save_dir/step_0000000`
    (model only, any TP/PP layout can load it); the checkpoint's path."""
    config, state = read_hf_dir(hf_dir)
    return _write_megatron(config, state, save_dir, hf_dir, make_vocab_size_divisible_by)


def from_authors(release: str | Path, out: str | Path, *, megatron: bool = False,
                 max_shard_size: str = "5GB") -> Path:
    """The authors' release directory (config.json + pytorch_model.bin) as our HF directory
    `out`, or with `megatron` as checkpoint out/step_0000000; what was written."""
    import torch

    from megatron_jrt.hf.authors import authors_config, authors_to_hf, clean_state

    release = Path(release)
    files = [release / "config.json", release / "pytorch_model.bin"]
    if missing := [str(f) for f in files if not f.is_file()]:
        raise ValueError(f"{missing[0]}: missing; give the folder of an authors' release "
                         "(hazyresearch/JRT-360M-30B: config.json and pytorch_model.bin)")
    state = clean_state(torch.load(files[1], map_location="cpu", weights_only=True))
    config = authors_config(json.loads(files[0].read_text()), state)
    hf_state = authors_to_hf(state, config)
    if megatron:
        return _write_megatron(config, hf_state, out, release, 8)
    write_hf_dir(hf_state, config, out, max_shard_size=max_shard_size)
    return Path(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jrt-convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    to_hf_parser = commands.add_parser("to-hf", help="write a Hugging Face model directory")
    to_hf_parser.add_argument("checkpoint", metavar="CKPT", help=PATH_HELP)
    to_hf_parser.add_argument("out", metavar="OUT", help="the Hugging Face directory to write")
    to_hf_parser.add_argument("--max-shard-size", default="5GB",
                              help="split model.safetensors above this size (default 5GB)")
    to_hf_parser.add_argument("--tokenizer", metavar="TOKENIZER",
                              help="a SentencePiece .model or gpt2:/dir to write as the HF "
                                   "tokenizer (default: the run's data.tokenizer, if present)")
    from_hf_parser = commands.add_parser(
        "from-hf", help="write a model-only megatron checkpoint from a to-hf directory")
    from_hf_parser.add_argument("hf_dir", metavar="HF_DIR", help="a directory written by to-hf")
    from_hf_parser.add_argument("save_dir", metavar="SAVE_DIR",
                                help="new or empty directory; gets step_0000000 and latest")
    from_hf_parser.add_argument("--make-vocab-size-divisible-by", type=int, default=8,
                                help="pad the embedding to a multiple of this (default 8, "
                                     "as model.make_vocab_size_divisible_by)")
    authors = commands.add_parser(
        "from-authors", help="convert an authors' release (JRT_SPEC.md section 7)")
    authors.add_argument("release", metavar="DIR", help="config.json + pytorch_model.bin")
    authors.add_argument("out", metavar="OUT", help="the HF directory (or save_dir) to write")
    authors.add_argument("--megatron", action="store_true",
                         help="write a model-only megatron checkpoint OUT/step_0000000 instead")
    authors.add_argument("--max-shard-size", default="5GB",
                         help="split model.safetensors above this size (default 5GB)")
    return parser


def _convert(args: argparse.Namespace) -> tuple[Path | str, Path | str]:
    """(what was read, what was written) for the parsed command."""
    if args.command == "to-hf":
        return to_hf(args.checkpoint, args.out, max_shard_size=args.max_shard_size,
                     tokenizer=args.tokenizer), args.out
    if args.command == "from-authors":
        return args.release, from_authors(args.release, args.out, megatron=args.megatron,
                                          max_shard_size=args.max_shard_size)
    return args.hf_dir, from_hf(args.hf_dir, args.save_dir,
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_jrt.checkpoint import CheckpointError  # megatron: still start-up

    end_of_start_up()  # from here the command's own SIGINT handling

    try:
        source, target = _convert(args)
    except (CheckpointError, ValueError) as exc:
        print(f"jrt-convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"jrt-convert: {source} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
