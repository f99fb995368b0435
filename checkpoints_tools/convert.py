"""jrt-convert: a megatron_jrt checkpoint -> a Hugging Face model directory, on one CPU process.

    jrt-convert to-hf CKPT OUT [--max-shard-size 5GB]

CKPT is a checkpoint (save_dir/step_0000100) saved under any TP/PP layout, or a save_dir (its
newest complete checkpoint). OUT gets config.json (with auto_map), configuration_jrt.py,
modeling_jrt.py, model.safetensors (sharded with an index above --max-shard-size),
generation_config.json, and tokenizer.model when the run's data.tokenizer file exists. Load it
with `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from checkpoints_tools.locate import PATH_HELP, verified_checkpoint
from checkpoints_tools.read_tensors import read_tensors

TOKENIZER_FILE = "tokenizer.model"


def _tokenizer_path(train_config: dict) -> Path | None:
    """The run's SentencePiece model when its config names one that exists here."""
    name = train_config.get("data", {}).get("tokenizer", "")
    return Path(name) if name and Path(name).is_file() else None


def _generation_ids(tokenizer: Path | None) -> dict:
    """eos / pad ids of the run's tokenizer (none for mock-data runs)."""
    if tokenizer is None:
        return {}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    ids = {"eos_token_id": sp.eos_id()}
    if sp.pad_id() >= 0:
        ids["pad_token_id"] = sp.pad_id()
    return ids


def to_hf(checkpoint: str | Path, out: str | Path, *, max_shard_size: str = "5GB") -> Path:
    """Convert checkpoint (or a save_dir's newest) into HF directory `out`; the checkpoint used."""
    from megatron_jrt.hf.configuration_jrt import JRTConfig
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM
    from megatron_jrt.hf.weights import hf_config, megatron_names, megatron_to_hf

    found = verified_checkpoint(checkpoint)
    config = hf_config(found.body["config"]["model"])
    tokenizer = _tokenizer_path(found.body["config"].get("train", {}))
    for key, value in _generation_ids(tokenizer).items():
        setattr(config, key, value)
    state = megatron_to_hf(read_tensors(found.path, megatron_names(config)), config)
    with torch.device("meta"):
        model = JRTForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    JRTConfig.register_for_auto_class()
    JRTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    out = Path(out)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
    return found.path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jrt-convert", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    to_hf_parser = commands.add_parser("to-hf", help="write a Hugging Face model directory")
    to_hf_parser.add_argument("checkpoint", metavar="CKPT", help=PATH_HELP)
    to_hf_parser.add_argument("out", metavar="OUT", help="the Hugging Face directory to write")
    to_hf_parser.add_argument("--max-shard-size", default="5GB",
                              help="split model.safetensors above this size (default 5GB)")
    args = parser.parse_args(argv)
    from megatron_jrt.checkpoint import CheckpointError

    try:
        used = to_hf(args.checkpoint, args.out, max_shard_size=args.max_shard_size)
    except (CheckpointError, ValueError) as exc:
        print(f"jrt-convert: error: {exc}", file=sys.stderr)
        return 1
    print(f"jrt-convert: {used} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
