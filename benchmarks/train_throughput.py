"""Training throughput of the stack against a plain compiled PyTorch Transformer++, per length.

    python benchmarks/train_throughput.py --presets jrt-360m,transformer-360m \\
        --lengths 2048,8192,32768 --variants off@2048,fast,fused@2048 --json out.json
    python benchmarks/train_throughput.py --tiny --variants off --plain eager   # CPU, seconds

For every variant, length and preset: `--steps` timed steps (after `--warmup` untimed ones) of
the real `jrt-train` step, `megatron_jrt.train.train` in this process (megatron-core DDP +
distributed optimizer, or DeepSpeed ZeRO in the `zero*` variants; bf16 with fp32 main weights
on GPU, fp32 on CPU) on mock tokens of a 50,264-token vocabulary; and, at every length, the
same for a plain PyTorch Transformer++ of each preset's size (benchmarks/plain_transformer.py).
Printed and in `--json`: tokens/s (one GPU), model TFLOP/s and MFU (megatron_jrt.flops,
docs/METRICS.md), peak memory, and each stack row's tokens/s over the plain model's of the
same size, length and batch.

Variants of the stack (`training.*` switches): `fast` fusions + compile, `fused` fusions only,
`off` neither (the plain path). For the memory table (peak GPU memory against tokens/s), each
with fusions and without compile, so compare them with `fused`: `offload` megatron-core's
optimizer CPU offload (`optimizer.cpu_offload=true`: Adam states and fp32 main weights in host
memory; needs CUDA, a CPU run prints it as that row's error), `zero2` DeepSpeed ZeRO-2
(`training.engine=deepspeed`, `training.zero_stage=2`), `zero3-offload` DeepSpeed ZeRO-3 with
optimizer state and parameters offloaded to CPU (`training.offload=optimizer+params`); the
DeepSpeed rows need the extra (`pip install -e ".[deepspeed]"`) and run in this process like
the others. `mem GiB` is the peak GPU memory (torch's allocator); host memory is not counted.
The issue's table, 1.3B on one H200:

    python benchmarks/train_throughput.py --presets jrt-1.3b --lengths 2048 --batches 8 \
        --plain none --variants fused,offload,zero2,zero3-offload --halve-on-oom --json mem.json

`name@L1+L2` runs a variant at those lengths only. Rows run in the order of `--variants`, then
of `--lengths`. Every row is isolated: an out-of-memory (or any other error) is printed as that
row's status and the table goes on; memory and compile caches are cleared between rows.
`--json` is rewritten after every row, so a run cut short keeps what it measured.

`--rounds N` measures the whole plan N times, round after round (so a drift of the device
over the run spreads over every row alike), takes each stack row's ratio against the plain
model of its own round, and ends with the median of each row over the rounds and the range
of its tokens/s: an H200 lent here drifted by up to 8% between runs of the same code.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import statistics
import sys
import tempfile
import traceback
from contextlib import redirect_stdout
from pathlib import Path
from typing import Callable, Iterator

import torch

VOCAB = 50264  # GPT-2's 50,257 ids padded to a multiple of 8 (mock ids 0..50262, 50263 [MASK])
TOKENS_PER_STEP = 16384  # default batch per length: 8 x 2k, 2 x 8k, 1 x 32k
VARIANTS = {
    "fast": ["training.fusions=true", "training.compile=true"],
    "fused": ["training.fusions=true", "training.compile=false"],
    "off": ["training.fusions=false", "training.compile=false"],
    # memory: megatron-core's optimizer CPU offload, and DeepSpeed ZeRO (each with fusions)
    "offload": ["training.fusions=true", "training.compile=false", "optimizer.cpu_offload=true"],
    "zero2": ["training.fusions=true", "training.compile=false", "training.engine=deepspeed",
              "training.zero_stage=2"],
    "zero3-offload": ["training.fusions=true", "training.compile=false",
                      "training.engine=deepspeed", "training.zero_stage=3",
                      "training.offload=optimizer+params"],
}
PLAIN_MODES = ("compiled", "eager")
TINY = dict(presets="jrt-tiny,transformer-tiny", lengths="64", batches="2", steps=2, warmup=1,
            vocab=512)


@dataclasses.dataclass
class Row:
    """One measured configuration (a line of the table, an entry of the JSON rows)."""

    model: str  # a preset, or "plain d<hidden> x <layers>" for the plain Transformer++
    kind: str  # "stack" | "plain"
    variant: str  # stack: a VARIANTS key; plain: "compiled" | "eager"
    seq_length: int
    batch: int  # sequences per optimizer step
    micro_batch: int
    status: str = "ok"  # "ok", "OOM", or "error: ..."
    step_ms: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    memory_gib: float | None = None
    loss: float | None = None
    vs_plain_compiled: float | None = None  # stack rows: tokens/s over the plain model's
    vs_plain_eager: float | None = None
    round: int = 1  # --rounds: the pass over the plan that measured it; medians: how many


def summary(step_times: list[float], *, tokens_per_step: int, flops_per_token: float) -> dict:
    """Median step time -> step_ms, tokens_per_s, tflops, mfu (None without a known peak) and
    the peak memory since the last reset (None on CPU)."""
    from megatron_jrt.flops import peak_flops_per_device

    cuda = torch.cuda.is_available()
    step = statistics.median(step_times)
    tokens_per_s = tokens_per_step / step
    model_flops = flops_per_token * tokens_per_s
    peak = peak_flops_per_device("bf16" if cuda else "fp32")
    return dict(step_ms=step * 1e3, tokens_per_s=tokens_per_s, tflops=model_flops / 1e12,
                mfu=None if peak is None else model_flops / peak,
                memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def measure_stack(preset: str, *, seq_length: int, batch: int, micro_batch: int, steps: int,
                  warmup: int, run_dir: str, overrides: list[str] = (), vocab: int = VOCAB,
                  profile: bool = False) -> dict:
    """`megatron_jrt.train.train` for `warmup` + `steps` steps of `preset` on mock tokens ->
    `summary` of the timed steps plus the last loss. `overrides` are `--set` strings; the
    model is seeded the same way every call (`init_distributed`), so repeated calls start from
    the same weights. The trainer's console output goes to `run_dir`/console.txt. `profile`
    prints the top device kernels (torch.profiler)."""
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.flops import flops_per_token
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    total = warmup + steps
    _reset_peak_memory()
    cfg = load_config(None, [
        f"model.preset={preset}", "data.mock_data=true", f"data.mock_vocab_size={vocab - 1}",
        f"data.seq_length={seq_length}", f"data.micro_batch_size={micro_batch}",
        f"data.global_batch_size={batch}", "data.num_workers=0",
        f"training.train_steps={total}", "training.eval_steps=0", f"training.log_interval={total}",
        "optimizer.warmup_steps=1", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
        "logging.progress_bar=false", *_long_enough(preset, seq_length), *overrides])
    init_distributed(seed=cfg.training.seed)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(run_dir) / "console.txt", "w") as console, redirect_stdout(console):
        _deepspeed_logs_to(console)
        try:
            result = _profiled(train, cfg) if profile else train(cfg)
        finally:
            _deepspeed_logs_to(sys.__stdout__)
    model_cfg = cfg.model_config().replace(vocab_size=vocab)
    return dict(summary(result.step_times[warmup:], tokens_per_step=batch * seq_length,
                        flops_per_token=flops_per_token(model_cfg, seq_length)),
                loss=result.losses[-1])


def _deepspeed_logs_to(stream) -> None:
    """Point DeepSpeed's logger at `stream`. It writes to the sys.stdout of its import, which is
    the console file of the first DeepSpeed row, closed when that row ends."""
    import logging

    if "deepspeed" not in sys.modules:
        return  # imported (by the DeepSpeed engine) while this row's console is sys.stdout
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(stream)


def _long_enough(preset: str, seq_length: int) -> list[str]:
    """The override that lets `preset` take `seq_length` tokens (rotary has no hard limit)."""
    from megatron_jrt.config import preset as get_preset

    if seq_length <= get_preset(preset).max_sequence_length:
        return []
    return [f"model.overrides.max_sequence_length={seq_length}"]


def _profiled(train, cfg):
    """Run `train(cfg)` under torch.profiler and print the most expensive device kernels (to
    the real stdout)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    with profile(activities=activities) as prof:
        result = train(cfg)
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60),
          file=sys.__stdout__, flush=True)
    return result


def measure_plain_row(preset: str, *, seq_length: int, batch: int, micro_batch: int,
                      steps: int, warmup: int, compiled: bool, vocab: int = VOCAB) -> dict:
    """benchmarks/plain_transformer.py at `preset`'s size, as a `summary` plus the last loss."""
    from megatron_jrt.flops import flops_per_token
    from plain_transformer import measure_plain  # a sibling: benchmarks/ is on sys.path

    cfg = plain_size(preset, vocab)
    _reset_peak_memory()
    measured = measure_plain(cfg, seq_length=seq_length, batch=batch, micro_batch=micro_batch,
                             steps=steps, warmup=warmup, compiled=compiled)
    return dict(summary(measured["step_times"], tokens_per_step=batch * seq_length,
                        flops_per_token=flops_per_token(cfg, seq_length)),
                loss=measured["loss"])


def plain_size(preset: str, vocab: int = VOCAB):
    """`preset` as a Transformer++ of its size: every layer full attention, no prefix."""
    from megatron_jrt.config import ATTENTION
    from megatron_jrt.config import preset as get_preset

    cfg = get_preset(preset)
    return cfg.replace(layer_pattern=ATTENTION * cfg.num_layers, prefix_length=0,
                       vocab_size=vocab)


def isolated(row: Row, measure: Callable[[int], dict], halve_on_oom: bool) -> Row:
    """Fill `row` from `measure(micro_batch)`; an OOM or error becomes the row's status (with
    `halve_on_oom`, an OOM retries at half the micro batch, same batch). Memory and torch.compile
    caches are cleared afterwards, so one row's leftovers cannot slow or break the next."""
    while True:
        oom = False
        try:
            row.status = "ok"
            for key, value in measure(row.micro_batch).items():
                setattr(row, key, value)
        except torch.OutOfMemoryError:
            oom, row.status = True, "OOM"
        except Exception as error:  # noqa: BLE001 - the table goes on; the status says why
            traceback.print_exc()
            row.status = f"error: {type(error).__name__}: {error}".splitlines()[0][:200]
        finally:
            _free()
        if not (oom and halve_on_oom and row.micro_batch > 1 and row.micro_batch % 2 == 0):
            return row
        row.micro_batch //= 2
        print(f"  OOM: retrying at micro batch {row.micro_batch}", flush=True)


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _free() -> None:
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def parse_variants(text: str) -> list[tuple[str, set[int] | None]]:
    """"fast,off@2048+8192" -> [("fast", None), ("off", {2048, 8192})] (None: every length)."""
    variants = []
    for item in text.split(","):
        name, _, only = item.partition("@")
        if name not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {name!r}; use {', '.join(VARIANTS)}")
        variants.append((name, {int(x) for x in only.split("+")} if only else None))
    return variants


def parse_settings(lengths: str, batches: str | None, micro_batches: str | None
                   ) -> list[tuple[int, int, int]]:
    """Aligned comma lists (a single batch or micro batch applies to every length; a length may
    repeat, e.g. with two batches) -> [(length, batch, micro batch)]. Default batch: 16k tokens
    per step; default micro batch: the batch (no accumulation)."""
    lengths_ = [int(x) for x in lengths.split(",")]

    def aligned(text: str | None, default: list[int], flag: str) -> list[int]:
        if text is None:
            return default
        values = [int(x) for x in text.split(",")]
        if len(values) == 1:
            values *= len(lengths_)
        if len(values) != len(lengths_):
            raise SystemExit(f"{flag}: give one value per length ({len(lengths_)}) or one")
        return values

    batches_ = aligned(batches, [max(1, TOKENS_PER_STEP // n) for n in lengths_], "--batches")
    micro = aligned(micro_batches, batches_, "--micro-batches")
    for length, batch, mb in zip(lengths_, batches_, micro):
        if batch % mb:
            raise SystemExit(f"--micro-batches: {mb} does not divide the batch {batch} at {length}")
    return list(zip(lengths_, batches_, micro))


def plan(args: argparse.Namespace, tmp: str, round_: int = 1
         ) -> Iterator[tuple[Row, Callable[[int], dict]]]:
    """The rows of one round, in order, each with its measure(micro_batch) function: variant
    by variant, setting by setting; at each setting the plain model(s) of each size first
    (once)."""
    plain_modes = [] if args.plain == "none" else args.plain.split(",")
    if set(plain_modes) - set(PLAIN_MODES):
        raise SystemExit(f"--plain: use {', '.join(PLAIN_MODES)} or none")
    common = dict(steps=args.steps, warmup=args.warmup, vocab=args.vocab)
    settings = parse_settings(args.lengths, args.batches, args.micro_batches)
    plain_done = set()
    for variant, only in parse_variants(args.variants):
        for length, batch, micro_batch in settings:
            if only is not None and length not in only:
                continue
            for preset in args.presets.split(","):
                for mode in plain_modes:
                    key = (plain_name(preset), length, batch, mode)
                    if key not in plain_done:
                        plain_done.add(key)
                        yield (Row(key[0], "plain", mode, length, batch, micro_batch,
                                   round=round_),
                               functools.partial(_plain, preset, length, batch,
                                                 mode == "compiled", common))
                yield (Row(preset, "stack", variant, length, batch, micro_batch, round=round_),
                       functools.partial(_stack, preset, length, batch, variant,
                                         f"{tmp}/{preset}-{variant}-{length}-{batch}", common))


def _plain(preset, length, batch, compiled, common, micro_batch) -> dict:
    return measure_plain_row(preset, seq_length=length, batch=batch, micro_batch=micro_batch,
                             compiled=compiled, **common)


def _stack(preset, length, batch, variant, run_dir, common, micro_batch) -> dict:
    return measure_stack(preset, seq_length=length, batch=batch, micro_batch=micro_batch,
                         run_dir=f"{run_dir}-{micro_batch}", overrides=VARIANTS[variant],
                         **common)


def with_ratios(rows: list[Row]) -> list[Row]:
    """Set each stack row's tokens/s over the plain model's (same size, length, batch and
    round; per plain mode)."""
    plain = {(r.model, r.seq_length, r.batch, r.variant, r.round): r.tokens_per_s for r in rows
             if r.kind == "plain" and r.status == "ok"}
    for row in rows:
        if row.kind != "stack" or row.status != "ok":
            continue
        for mode in PLAIN_MODES:
            base = plain.get((plain_name(row.model), row.seq_length, row.batch, mode, row.round))
            setattr(row, f"vs_plain_{mode}", None if base is None else row.tokens_per_s / base)
    return rows


_MEDIAN_FIELDS = ("step_ms", "tokens_per_s", "tflops", "mfu", "memory_gib", "vs_plain_compiled",
                  "vs_plain_eager")


def medians(rows: list[Row]) -> list[Row]:
    """One row per configuration (model, kind, variant, length, batch), in first-seen order:
    the median of each number over its rounds that ran (`round`: how many), the range of
    tokens/s in `status`. Call after `with_ratios`."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault((row.model, row.kind, row.variant, row.seq_length, row.batch),
                          []).append(row)
    out = []
    for (model, kind, variant, length, batch), group in groups.items():
        ok = [row for row in group if row.status == "ok"]
        if not ok:
            out.append(dataclasses.replace(group[-1], round=0))
            continue
        values = {name: [getattr(row, name) for row in ok if getattr(row, name) is not None]
                  for name in _MEDIAN_FIELDS}
        speeds = values["tokens_per_s"]
        out.append(Row(model, kind, variant, length, batch, ok[-1].micro_batch,
                       status="ok" if len(ok) == 1 else
                       f"ok; tokens/s {min(speeds):,.0f}-{max(speeds):,.0f}",
                       round=len(ok), **{name: statistics.median(v) if v else None
                                         for name, v in values.items()}))
    return out


def plain_name(preset: str) -> str:
    cfg = plain_size(preset)
    return f"plain d{cfg.hidden_size} x {cfg.num_layers}"


def format_row(row: Row) -> str:
    def show(value, fmt):
        return "-" if value is None else format(value, fmt)

    ratio = row.vs_plain_compiled if row.vs_plain_compiled is not None else row.vs_plain_eager
    status = "" if row.status == "ok" else row.status
    return (f"{row.model:<22}{row.variant:<14}{row.seq_length:>7}{row.batch:>4}x"
            f"{row.micro_batch:<3}{show(row.step_ms, '.1f'):>10}{show(row.tokens_per_s, ',.0f'):>11}"
            f"{show(row.tflops, '.1f'):>9}{show(row.mfu, '.1%'):>8}{show(row.memory_gib, '.1f'):>9}"
            f"{'-' if ratio is None else f'{ratio:.2f}x':>10}  {status}")


HEADER = (f"{'model':<22}{'variant':<14}{'length':>7}{'batch':>8}{'step ms':>10}"
          f"{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>8}{'mem GiB':>9}{'vs plain':>10}")


def write_json(path: str, rows: list[Row], args: argparse.Namespace) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows = with_ratios(rows)
    Path(path).write_text(json.dumps({
        "device": device, "torch": torch.__version__, "command": sys.argv,
        "steps": args.steps, "warmup": args.warmup, "vocab": args.vocab, "rounds": args.rounds,
        "rows": [dataclasses.asdict(row) for row in rows],
        "medians": [dataclasses.asdict(row) for row in medians(rows)]}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", help="comma list (default jrt-360m,transformer-360m)")
    parser.add_argument("--lengths", help="comma list of sequence lengths, may repeat "
                                          "(default 2048,8192,32768)")
    parser.add_argument("--batches", help="sequences per step, one per length or one for all "
                                          f"(default {TOKENS_PER_STEP} tokens / length)")
    parser.add_argument("--micro-batches", help="micro batch, one per length or one for all "
                                                "(default: the batch, no accumulation)")
    parser.add_argument("--variants", default="fast",
                        help=f"stack variants, name[@L1+L2] ({', '.join(VARIANTS)})")
    parser.add_argument("--plain", default="compiled",
                        help="plain Transformer++ modes: compiled,eager or none")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--halve-on-oom", action="store_true",
                        help="retry a row that runs out of memory at half the micro batch")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny presets at length 64, 2 steps: a CPU smoke run")
    parser.add_argument("--vocab", type=int, help=f"vocabulary size (default {VOCAB})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the whole plan this many times, then take medians")
    parser.add_argument("--json", help="write the rows here (rewritten after every row)")
    args = parser.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds: {args.rounds}; give 1 or more")
    defaults = dict(TINY) if args.tiny else dict(
        presets="jrt-360m,transformer-360m", lengths="2048,8192,32768", batches=None,
        steps=10, warmup=3, vocab=VOCAB)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from megatron_jrt.distributed import destroy_distributed
    from megatron_jrt.quiet import silence_megatron_noise

    silence_megatron_noise()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{device}, torch {torch.__version__}; {args.steps} timed steps after {args.warmup}; "
          f"vocabulary {args.vocab}\n{HEADER}", flush=True)

    rows: list[Row] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(1, args.rounds + 1):
                for row, measure in plan(args, tmp, round_):
                    rows.append(isolated(row, measure, args.halve_on_oom))
                    print(format_row(row), flush=True)
                    if args.json:
                        write_json(args.json, rows, args)
    finally:
        destroy_distributed()
    print(f"\nsummary (vs plain: tokens/s over the plain Transformer++ of the same size, "
          f"length and batch; compiled where measured, else eager)\n{HEADER}")
    for row in with_ratios(rows):
        print(format_row(row))
    if args.rounds > 1:
        print(f"\nmedians over {args.rounds} rounds (vs plain: the median of the per-round "
              f"ratios)\n{HEADER}")
        for row in medians(rows):
            print(format_row(row))
    return 1 if any(row.status.startswith("error") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
