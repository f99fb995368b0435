"""jrt-generate: completions for prompts from a megatron_jrt checkpoint or an HF JRT directory.

MODEL is an HF directory (jrt-convert to-hf's output: it has config.json), a checkpoint, or a
save_dir (its newest checkpoint that verifies). A checkpoint becomes the HF model in memory, read
and mapped as `jrt-convert to-hf` reads it (checkpoints_tools.read_as_hf: any TP/PP layout, one
process, no process group, nothing written), with the tokenizer its run recorded
(data.tokenizer). --tokenizer replaces either model's tokenizer.

Prompts come from --prompt, --file (one per line) or --jsonl (a "prompt" field, or the fields a
--jrt-prompt template needs). They run in left-padded batches through the HF model's generate()
(padding is invisible to it; prompts shorter than the prefix are read-twice padded). Completions
go to stdout, records to --out as JSONL, throughput to stderr. Errors are one line, exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import torch

if TYPE_CHECKING:
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

# the JSONL fields each JRT-Prompt template reads, in the template function's argument order
TEMPLATE_FIELDS = {"qa": ("question", "context", "cloze"), "extraction": ("key", "document")}


class UsageError(ValueError):
    """Bad input named in the user's terms: printed as one line, exit status 2."""


class Codec(Protocol):
    eod_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class AutoTokenizerCodec:
    """A transformers tokenizer seen as a Codec: no special tokens added to prompts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eod_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jrt-generate", description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, metavar="MODEL",
                        help="a Hugging Face JRT directory (jrt-convert to-hf), a checkpoint, or "
                        "a save_dir (its newest checkpoint)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--file", type=Path, help="prompts, one per line (blank lines skipped)")
    source.add_argument("--jsonl", type=Path,
                        help='records with a "prompt" field, or the fields of --jrt-prompt: '
                        "qa question/context/cloze, extraction key/document")
    parser.add_argument("--jrt-prompt", choices=sorted(TEMPLATE_FIELDS),
                        help="build each prompt with a JRT-Prompt template (needs --jsonl)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--out", type=Path, help="write one JSON record per prompt here")
    parser.add_argument("--tokenizer", metavar="TOKENIZER",
                        help="a SentencePiece .model or gpt2:/dir (default: the HF directory's "
                        "tokenizer, or the data.tokenizer the checkpoint's run recorded)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def read_records(args: argparse.Namespace) -> list[dict]:
    """One dict per prompt, its text under "prompt" (JSONL records keep their other fields)."""
    if args.jrt_prompt and args.jsonl is None:
        raise UsageError("--jrt-prompt needs --jsonl records with the template's fields")
    if args.prompt is not None:
        records = [{"prompt": args.prompt}]
    elif args.file is not None:
        records = [{"prompt": line} for line in _read_text(args.file).splitlines() if line.strip()]
    else:
        records = [_parse_record(line, args.jsonl, number, args.jrt_prompt)
                   for number, line in enumerate(_read_text(args.jsonl).splitlines(), 1)
                   if line.strip()]
    if not records:
        raise UsageError(f"{args.file or args.jsonl}: no prompts in the file")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the prompts ({exc.strerror})") from exc


def _parse_record(line: str, path: Path, number: int, template: str | None) -> dict:
    """A JSONL line as a record whose "prompt" is its own or the template's rendering."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{number}: not JSON ({exc.msg})") from exc
    needed = TEMPLATE_FIELDS[template] if template else ("prompt",)
    if not isinstance(record, dict):
        record = {}
    missing = [name for name in needed if not isinstance(record.get(name), str)]
    if missing:
        raise UsageError(f"{path}:{number}: needs the string field(s) {', '.join(missing)}")
    if template:
        record["prompt"] = render_template(template, record)
    return record


def render_template(template: str, record: dict) -> str:
    from megatron_jrt.generate import jrt_prompt_extraction, jrt_prompt_qa

    build = {"qa": jrt_prompt_qa, "extraction": jrt_prompt_extraction}[template]
    return build(*(record[name] for name in TEMPLATE_FIELDS[template]))


def load_codec(model_dir: Path) -> Codec:
    """AutoTokenizer when the directory has a tokenizer config, else its tokenizer.model.

    AutoTokenizer gets the directory's config from us: left to read config.json itself, it
    would ask on the terminal whether to run the directory's custom code (auto_map)."""
    if (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from megatron_jrt.hf.configuration_jrt import JRTConfig

        config = JRTConfig.from_pretrained(model_dir)
        return AutoTokenizerCodec(AutoTokenizer.from_pretrained(model_dir, config=config))
    if (model_dir / "tokenizer.model").is_file():
        from data_prep.tokenizer import load_tokenizer

        return load_tokenizer(str(model_dir / "tokenizer.model"))
    raise UsageError(f"{model_dir}: no tokenizer (tokenizer_config.json or tokenizer.model); "
                     "pass --tokenizer PATH (a SentencePiece .model or gpt2:/dir)")


def load_tokenizer_spec(spec: str) -> Codec:
    """The --tokenizer the user named (a SentencePiece .model or gpt2:/dir)."""
    from data_prep.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except (OSError, ValueError, ImportError) as exc:
        raise UsageError(f"--tokenizer {spec}: {exc}") from exc


def load_model(path: Path, tokenizer: str | None, device: str
               ) -> tuple[JRTForCausalLM, Codec]:
    """(the HF model in eval mode on `device`, its codec) for MODEL `path`."""
    if (path / "config.json").is_file():
        from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

        model = JRTForCausalLM.from_pretrained(path)
        codec = load_tokenizer_spec(tokenizer) if tokenizer else load_codec(path)
    elif path.exists():
        model, codec = load_checkpoint(path, tokenizer)
    else:
        raise UsageError(f"{path}: no such directory; give a Hugging Face JRT directory "
                         "(jrt-convert to-hf), a checkpoint or a save_dir")
    return model.to(device).eval(), codec


def load_checkpoint(path: Path, tokenizer: str | None) -> tuple[JRTForCausalLM, Codec]:
    """The HF model built in memory from checkpoint (or save_dir) `path`, and its tokenizer."""
    from checkpoints_tools.hf_dir import model_from_state
    from checkpoints_tools.read_as_hf import read_as_hf
    from megatron_jrt.checkpoint import CheckpointError

    try:
        found = read_as_hf(path, tokenizer=tokenizer)
    except CheckpointError as exc:
        raise UsageError(f"{path} is no Hugging Face JRT directory (no config.json) and no "
                         f"checkpoint: {exc}") from exc
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if found.tokenizer is None:
        recorded = (f"its run's data.tokenizer {found.recorded_tokenizer} is not on this machine"
                    if found.recorded_tokenizer else "its run recorded no data.tokenizer")
        raise UsageError(f"{found.path}: no tokenizer ({recorded}); pass --tokenizer PATH (a "
                         "SentencePiece .model or gpt2:/dir)")
    return model_from_state(found.state, found.config), found.tokenizer


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [b, longest], attention_mask): prompts right-aligned, as generate() expects."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def generate_batch(model, codec: Codec, prompts: list[list[int]],
                   args: argparse.Namespace) -> list[list[int]]:
    """New token ids per prompt, cut before the first end-of-document."""
    ids, mask = left_pad(prompts, codec.pad_id)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} \
        if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(ids.to(args.device), attention_mask=mask.to(args.device),
                             max_new_tokens=args.max_new_tokens, pad_token_id=codec.pad_id,
                             eos_token_id=codec.eod_id, **sampling)
    completions = []
    for row in out[:, ids.shape[1]:].tolist():
        completions.append(row[:row.index(codec.eod_id)] if codec.eod_id in row else row)
    return completions


def encode_prompts(codec: Codec, records: list[dict]) -> list[list[int]]:
    encoded = [codec.encode(record["prompt"]) for record in records]
    if empty := [n for n, ids in enumerate(encoded, 1) if not ids]:
        raise UsageError(f"prompt {empty[0]} encodes to no tokens")
    return encoded


def run(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UsageError("--max-new-tokens and --batch-size must be at least 1")
    records = read_records(args)
    model, codec = load_model(args.model, args.tokenizer, args.device)
    prompts = encode_prompts(codec, records)
    torch.manual_seed(args.seed)
    started, new_tokens = time.perf_counter(), 0
    with open(args.out, "w", encoding="utf-8") if args.out else nullcontext() as out:
        for start in range(0, len(prompts), args.batch_size):
            batch = generate_batch(model, codec, prompts[start:start + args.batch_size], args)
            for record, completion_ids in zip(records[start:], batch):
                completion = codec.decode(completion_ids)
                new_tokens += len(completion_ids)
                print(completion, flush=True)
                if out is not None:
                    out.write(json.dumps({**record, "completion": completion}) + "\n")
    seconds = time.perf_counter() - started
    print(f"jrt-generate: {len(prompts)} prompts, {new_tokens} new tokens in {seconds:.2f} s "
          f"({new_tokens / seconds:.1f} tokens/s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as exc:
        print(f"jrt-generate: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
