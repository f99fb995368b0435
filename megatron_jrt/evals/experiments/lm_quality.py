"""LM quality at equal tokens: JRT-RNN vs Based vs Transformer++ (~125M) on one real corpus.

    python -m megatron_jrt.evals.experiments.lm_quality --out results/lm.json
    python -m megatron_jrt.evals.experiments.lm_quality --parallel 3 --out results/lm.json
    python -m megatron_jrt.evals.experiments.lm_quality --tiny --out /tmp/lm.json   # CPU, seconds

1. Data: without `--data-dir`, the `.py/.md/.rst/.txt` files under `--corpus-dirs` (default:
   this Python's standard library and site-packages) become a corpus, tokenised (SentencePiece)
   and sharded by jrt-prep with a held-out validation split, cached under `--work-dir`
   (megatron_jrt.evals.experiments.lm_corpus).
2. Training: each family's preset (`jrt-125m`, `based-125m`, `transformer-125m`: one width,
   depth, heads, MLP and vocabulary) through `megatron_jrt.train.train`, on the same windows in
   the same order (one seed), `--tokens` each, with a checkpoint at the end (`resume: auto`: a
   rerun of the same settings trains nothing more).
3. Scores, from the reloaded checkpoint: the next-token loss and perplexity on the held-out
   windows at the positions after JRT's prefix (positions M..L-1, the ones every family
   predicts from the past only; a JRT model reads positions < M non-causally), the causal
   families' loss over all positions too, and `jrt-eval recall`'s accuracy on the shipped
   Debian set with the default and the JRT-Prompt templates. The trainer's own validation
   (`lm loss` every quarter of the run) is kept as a curve; it is not comparable across families
   (JRT's excludes the prefix and sees 15% of it masked, the others' covers every position).

One JSON (`--out`, rewritten after each model; rows of other families from a run with the
same settings are kept) and a markdown table on stdout. `--parallel N` trains N families at
once, each a child process on its own GPU. docs/RESULTS.md section 4 has the command.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_jrt.evals.experiments.children import Child, visible_gpus
from megatron_jrt.evals.recall_prompts import TEMPLATES
from megatron_jrt.fsutil import atomic_write_bytes
from megatron_jrt.runlog import LOSSES_FILE, read_losses  # ("default", "jrt"): JRT-Prompt

FAMILIES = ("jrt", "based", "transformer")


@dataclass(frozen=True)
class Setup:
    """What one run trains and scores; GPU below, and a --tiny CPU one."""

    size: str  # the presets' suffix: jrt-<size>, based-<size>, transformer-<size>
    tokens: int  # trained per model
    seq_length: int
    global_batch_size: int
    micro_batch_size: int
    lr: float
    corpus_mb: float  # text read from --corpus-dirs
    vocab_size: int
    valid_fraction: float
    eval_windows: int  # held-out windows scored per model
    recall_limit: int | None  # the first N documents of the recall set (None: all 250)
    max_context_tokens: int | None  # recall contexts cut to this many tokens around the answer
    tokenizer_sentences: int = 500_000  # lines SentencePiece trains on (bounds its time)
    seed: int = 1234
    warmup_fraction: float = 0.05

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.global_batch_size * self.seq_length))


# ~100M tokens per model: at the ~300k tokens/s expected of a 125M on one H200 (2.5x the
# 360M's 120k, docs/PERFORMANCE.md) about 5.5 minutes of training for JRT (the Transformer
# is faster at 2k), so the three at once (`--parallel 3`) fit one 10-minute command.
GPU = Setup(size="125m", tokens=100_000_000, seq_length=2048, global_batch_size=64,
            micro_batch_size=16, lr=1e-3, corpus_mb=400, vocab_size=32000,
            valid_fraction=0.005, eval_windows=256, recall_limit=None, max_context_tokens=None)
TINY = Setup(size="tiny", tokens=8 * 8 * 64, seq_length=64, global_batch_size=8,
             micro_batch_size=8, lr=3e-3, corpus_mb=0.3, vocab_size=512, valid_fraction=0.05,
             eval_windows=16, recall_limit=3, max_context_tokens=24,
             tokenizer_sentences=20_000)


def train_and_score(family: str, setup: Setup, data, *, work_dir: Path, data_workers: int
                    ) -> dict:
    """Train `family` on `data` (lm_corpus.PreparedData), reload it, score it: one JSON row.

    Runs in this process (megatron's one-rank process group is set up and torn down here).
    """
    import torch

    from megatron_jrt.distributed import destroy_distributed, init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import config_from_dict

    preset = f"{family}-{setup.size}"
    steps = setup.steps
    run_dir = (work_dir / "runs" /
               f"{preset}-{data_key(data.data_dir)}-{steps}steps-seed{setup.seed}")
    eval_interval = max(1, steps // 4)
    cfg = config_from_dict({
        "model": {"preset": preset},
        "data": {"data_dir": str(data.data_dir), "tokenizer": str(data.tokenizer),
                 "seq_length": setup.seq_length, "micro_batch_size": setup.micro_batch_size,
                 "global_batch_size": setup.global_batch_size,
                 "num_workers": data_workers if torch.cuda.is_available() else 0},
        "optimizer": {"lr": setup.lr, "min_lr": setup.lr / 10,
                      "warmup_steps": max(1, int(steps * setup.warmup_fraction))},
        "training": {"train_steps": steps, "seed": setup.seed, "eval_interval": eval_interval,
                     "eval_steps": 1, "log_interval": max(1, steps // 50)},
        # A checkpoint every quarter of a long run: one cut short (a time limit's SIGTERM
        # checkpoints and stops it) continues from there when the same command runs again.
        "checkpoint": {"save_dir": str(run_dir / "ckpt"), "keep_last": 1, "resume": "auto",
                       "save_interval": eval_interval if steps >= 100 else steps},
        "logging": {"run_dir": str(run_dir), "tensorboard": False, "progress_bar": False},
    })
    cfg.validate()
    started = time.perf_counter()
    tokens_per_step = setup.global_batch_size * setup.seq_length
    # What training measured, kept beside the checkpoint before scoring: a rerun that finds the
    # run done (resume: auto, nothing left to train), or one cut while scoring, reports the same.
    training_file = run_dir / "lm_quality_training.json"
    init_distributed(seed=setup.seed)
    try:
        result = train(cfg)
        if result.stopped_by_signal or result.last_step < steps:
            raise SystemExit(f"{preset}: stopped at step {result.last_step} of {steps} "
                             f"({result.stopped_by_signal or 'early'}); run the same command "
                             "again to continue from its checkpoint")
        if result.step_times:
            first = result.start_step
            atomic_write_bytes(training_file, json.dumps({
                "tokens_per_second": tokens_per_step / statistics.median(result.step_times),
                "train_seconds": time.perf_counter() - started, "resumed_at_step": first or None,
                "trainer_validation": [{"step": step, **v} for step, v in zip(
                    [s for s in range(first + 1, steps + 1)
                     if s % eval_interval == 0 or s == steps],
                    result.validation)]}, indent=1).encode() + b"\n")
        valid = validation_loss(run_dir / "ckpt", data.data_dir, setup)
        recall = recall_scores(run_dir / "ckpt", setup)
    finally:
        destroy_distributed()
    losses = read_losses(run_dir / LOSSES_FILE)
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    return {"family": family, "preset": preset, **valid.pop("model"),
            "steps": steps, "tokens": steps * tokens_per_step,
            "final_train_loss": losses[-1]["loss"] if losses else None,
            "tokens_per_second": training.get("tokens_per_second"),
            "train_seconds": training.get("train_seconds"),
            "resumed_at_step": training.get("resumed_at_step"),
            "trainer_validation": training.get("trainer_validation", []),
            "valid": valid, "recall": recall, "checkpoint": str(run_dir / "ckpt"),
            "seconds": time.perf_counter() - started}


def data_key(data_dir: Path) -> str:
    """Names the shards and tokenizer (a hash of the manifest, which holds the tokenizer's)."""
    import hashlib

    return hashlib.sha256(Path(data_dir, "manifest.json").read_bytes()).hexdigest()[:12]


def validation_loss(checkpoint: Path, data_dir: Path, setup: Setup) -> dict:
    """Next-token loss of the checkpoint on the first `eval_windows` held-out windows.

    `loss_after_prefix` averages positions M..L-1, M the JRT preset's prefix length, for every
    family (the comparable number); `loss_all` every position, for causal models only.
    `loss_repeat` is the same positions' loss when they repeat the window's first M tokens, read
    just before (`repeated_windows`): in-context recall on real text, where a model that recalls
    what it read approaches 0 and one that does not stays near `loss_after_prefix`.
    """
    import torch

    from data_prep.reader import PackedSequenceReader
    from megatron_jrt.config import preset
    from megatron_jrt.evals.trained_model import load_trained_model
    from megatron_jrt.model import count_parameters

    trained = load_trained_model(checkpoint)
    after = preset(f"jrt-{setup.size}").prefix_length
    batch = min(setup.micro_batch_size, setup.eval_windows)
    reader = PackedSequenceReader(str(data_dir), "valid", setup.seq_length, batch)
    batches = min(len(reader), -(-setup.eval_windows // batch))
    if batches == 0:
        raise SystemExit(f"{data_dir}: the validation split holds fewer than {batch} windows of "
                         f"{setup.seq_length + 1} tokens; raise the valid fraction or the corpus")
    device = next(trained.model.parameters()).device
    positions = torch.arange(setup.seq_length, device=device).unsqueeze(0)
    sums = torch.zeros(6, dtype=torch.float64)  # after: loss, tokens; all: ...; repeat: ...

    def per_token_loss(inputs, labels):
        return trained.model(inputs, positions.expand(inputs.shape[0], -1), None,
                             labels=labels).double().cpu()

    with torch.no_grad():
        for _, tokens in zip(range(batches), reader):
            tokens = tokens.to(device)
            per_token = per_token_loss(tokens[:, :-1], tokens[:, 1:])
            repeat = per_token_loss(*repeated_windows(tokens, after))[:, after:]
            sums += torch.tensor([per_token[:, after:].sum(), per_token[:, after:].numel(),
                                  per_token.sum(), per_token.numel(), repeat.sum(),
                                  repeat.numel()], dtype=torch.float64)
    loss_after = (sums[0] / sums[1]).item()
    loss_repeat = (sums[4] / sums[5]).item()
    causal = trained.config.prefix_length == 0
    config = trained.config
    return {"windows": batches * batch, "positions_from": after,
            "tokens_after_prefix": int(sums[1]), "loss_after_prefix": loss_after,
            "ppl_after_prefix": math.exp(loss_after),
            "loss_all": (sums[2] / sums[3]).item() if causal else None,
            "ppl_all": math.exp((sums[2] / sums[3]).item()) if causal else None,
            "loss_repeat": loss_repeat, "ppl_repeat": math.exp(loss_repeat),
            "model": {"parameters": count_parameters(trained.model),
                      "layer_pattern": config.layer_pattern, "hidden_size": config.hidden_size,
                      "num_layers": config.num_layers, "vocab_size": config.vocab_size,
                      "prefix_length": config.prefix_length}}


def repeated_windows(tokens, after: int):
    """(inputs, labels) [b, L] from held-out windows `tokens` [b, L + 1]: their first `after`
    tokens over and over, so every label from position `after` on is the one `after` positions
    earlier. For JRT-RNN the first copy is exactly its prefix (the JRT-Prompt idea applied to
    plain text)."""
    import torch

    length = tokens.shape[1] - 1
    if not 0 < after < length:
        raise ValueError(f"a repeat needs a first copy shorter than the window (prefix {after} "
                         f"of {length})")
    period = torch.arange(length + 1, device=tokens.device) % after
    stream = tokens[:, period]
    return stream[:, :-1], stream[:, 1:]


def recall_scores(checkpoint: Path, setup: Setup) -> dict:
    """`jrt-eval recall` on the shipped set: accuracy per template (the harness's own code)."""
    from data_prep.recall_set import SHIPPED_SET
    from megatron_jrt.evals.recall import evaluate_recall
    from megatron_jrt.evals.recall_data import read_documents
    from megatron_jrt.evals.recall_models import megatron_generator

    documents = read_documents(SHIPPED_SET)[:setup.recall_limit]
    codec, generate = megatron_generator(checkpoint)
    started = time.perf_counter()
    results = evaluate_recall(documents, generate, codec, templates=TEMPLATES,
                              max_context_tokens=setup.max_context_tokens)
    return {"data": SHIPPED_SET.name, "documents": len(documents),
            "max_context_tokens": setup.max_context_tokens,
            "seconds": time.perf_counter() - started,
            **{name: {"accuracy": r.accuracy, "correct": sum(r.scores)}
               for name, r in results.items()}}


# ------------------------------------------------------------------------------- the driver

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the results JSON")
    parser.add_argument("--tiny", action="store_true",
                        help="the CPU smoke version (the *-tiny presets, ~300 KB of this "
                             "Python's sources, a few steps, 3 recall documents)")
    parser.add_argument("--families", type=lambda t: tuple(t.split(",")), default=FAMILIES,
                        help=f"comma-separated, of {','.join(FAMILIES)} (default: all)")
    parser.add_argument("--tokens", type=int, help=f"trained per model (default {GPU.tokens:,}; "
                                                    "rounded down to whole steps)")
    parser.add_argument("--data-dir", type=Path,
                        help="prepared shards (jrt-prep shards, with a valid split) instead of "
                             "building a corpus; needs --tokenizer")
    parser.add_argument("--tokenizer", type=Path, help="with --data-dir: its tokenizer")
    parser.add_argument("--corpus-dirs", type=lambda t: [d for d in t.split(",") if d],
                        help="directories whose .py/.md/.rst/.txt files make the corpus "
                             "(default: this Python's stdlib and site-packages)")
    parser.add_argument("--corpus-mb", type=float, help=f"text to read (default {GPU.corpus_mb:g})")
    parser.add_argument("--vocab-size", type=int, help=f"tokenizer (default {GPU.vocab_size})")
    parser.add_argument("--lr", type=float, help=f"peak, cosine to lr/10 (default {GPU.lr:g})")
    parser.add_argument("--global-batch-size", type=int,
                        help=f"sequences per step (default {GPU.global_batch_size})")
    parser.add_argument("--micro-batch-size", type=int,
                        help=f"per forward (default {GPU.micro_batch_size})")
    parser.add_argument("--seed", type=int, help=f"of the data order and init (default {GPU.seed})")
    parser.add_argument("--eval-windows", type=int,
                        help=f"held-out windows scored (default {GPU.eval_windows})")
    parser.add_argument("--recall-limit", type=int, help="the first N recall documents "
                                                         "(default: all 250)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/lm-quality"),
                        help="corpus cache, shards, checkpoints (default: runs/lm-quality)")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="jrt-prep processes / tokenizer threads (default: cores, at most 16)")
    parser.add_argument("--data-workers", type=int, default=2,
                        help="reader processes per model on a GPU (default 2; none on CPU)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build (or find) the corpus, tokenizer and shards, then stop")
    parser.add_argument("--parallel", type=int, default=1,
                        help="families trained at once, each a child process on its own GPU "
                             "(default 1: one after the other, in this process)")
    parser.add_argument("--gpus", type=lambda t: [g for g in t.split(",") if g],
                        help="with --parallel: CUDA_VISIBLE_DEVICES names to use (default: all)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # --parallel's
    args = parser.parse_args(argv)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {sorted(unknown)}; choose from {','.join(FAMILIES)}")
    if (args.data_dir is None) != (args.tokenizer is None):
        parser.error("--data-dir and --tokenizer go together")
    if args.data_dir is not None and (args.corpus_dirs or args.corpus_mb):
        parser.error("--data-dir is prepared data: leave out --corpus-dirs and --corpus-mb")
    for name in ("parallel", "tokens", "recall_limit", "eval_windows", "global_batch_size",
                 "micro_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: at least 1")
    return args


def chosen_setup(args: argparse.Namespace) -> Setup:
    base = TINY if args.tiny else GPU
    given = {"tokens": args.tokens, "corpus_mb": args.corpus_mb, "vocab_size": args.vocab_size,
             "lr": args.lr, "global_batch_size": args.global_batch_size,
             "micro_batch_size": args.micro_batch_size, "seed": args.seed,
             "eval_windows": args.eval_windows, "recall_limit": args.recall_limit}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def prepare_data(args: argparse.Namespace, setup: Setup, log=print):
    """The shards and tokenizer: --data-dir's, or the corpus built (or cached) under --work-dir."""
    from megatron_jrt.evals.experiments.lm_corpus import (CORPUS_INFO, CorpusSettings,
                                                          PreparedData, default_corpus_dirs,
                                                          prepare_corpus)

    if args.data_dir is not None:
        manifest = json.loads((args.data_dir / "manifest.json").read_text())
        corpus = args.data_dir.parent / CORPUS_INFO  # lm_corpus's, when it made these shards
        info = json.loads(corpus.read_text()) if corpus.is_file() else {
            "data_dir": str(args.data_dir),
            "train_tokens": sum(e["tokens"] for e in manifest["splits"]["train"]),
            "valid_tokens": sum(e["tokens"] for e in manifest["splits"].get("valid", []))}
        return PreparedData(args.data_dir, args.tokenizer, info)
    dirs, skip = args.corpus_dirs or default_corpus_dirs(), ()
    if args.tiny and not args.corpus_dirs:  # a few hundred KB of the standard library alone
        dirs, skip = dirs[:1], tuple(dirs[1:])
    settings = CorpusSettings(dirs=tuple(str(Path(d).resolve()) for d in dirs),
                              max_bytes=int(setup.corpus_mb * 1e6), vocab_size=setup.vocab_size,
                              valid_fraction=setup.valid_fraction, skip_dirs=skip)
    return prepare_corpus(settings, args.work_dir, workers=args.workers,
                          tokenizer_sentences=setup.tokenizer_sentences, log=log)


def run(args: argparse.Namespace) -> dict:
    """Everything `args` asks for; returns the results written to args.out."""
    from megatron_jrt.quiet import silence_megatron_noise

    silence_megatron_noise()
    setup = chosen_setup(args)
    data = prepare_data(args, setup)
    if args.prepare_only:
        return {}
    settings = {**dataclasses.asdict(setup), "steps": setup.steps,
                "data": data_key(data.data_dir)}
    results = Results(args.out, settings, data.info, args.families)
    log_dir = args.out.parent / f"{args.out.stem}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(args.families)} models x {setup.steps} steps x "
          f"{setup.global_batch_size * setup.seq_length:,} tokens ({setup.steps * setup.global_batch_size * setup.seq_length:,} "
          f"each); training logs in {log_dir}", flush=True)
    if args.parallel > 1 and not args.child:
        run_children(args, setup, data, results, log_dir)
    else:
        for family in args.families:
            log = log_dir / f"{family}.log"
            if args.child:  # the parent already sends this process's output to the log
                row = train_and_score(family, setup, data, work_dir=args.work_dir,
                                      data_workers=args.data_workers)
            else:
                with open(log, "w") as handle, contextlib.redirect_stdout(handle):
                    row = train_and_score(family, setup, data, work_dir=args.work_dir,
                                          data_workers=args.data_workers)
            results.add(row)
            print(summary(row), flush=True)
    if not args.child:
        print(markdown_table(results.data))
    if results.data["failed"]:
        raise SystemExit(f"{len(results.data['failed'])} models failed: " + ", ".join(
            f"{f['family']} (log {f['log']})" for f in results.data["failed"]))
    return results.data


class Results:
    """The JSON at `out`, rewritten after each model; keeps the rows of other families from an
    earlier run with the same settings and data."""

    def __init__(self, out: Path, settings: dict, corpus: dict, families: tuple[str, ...]):
        self.out = out
        self.data = {"experiment": "lm_quality", "device": _device(), "settings": settings,
                     "corpus": corpus, "runs": [], "failed": []}
        if out.is_file():
            try:
                old = json.loads(out.read_text())
            except ValueError:
                old = {}
            if old.get("settings") == settings:
                self.data["runs"] = [r for r in old.get("runs", []) if r["family"] not in families]
        out.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def add(self, row: dict) -> None:
        self.data["runs"] = sorted([r for r in self.data["runs"] if r["family"] != row["family"]]
                                   + [row], key=lambda r: FAMILIES.index(r["family"]))
        self._write()

    def fail(self, failure: dict) -> None:
        self.data["failed"].append(failure)
        self._write()

    def _write(self) -> None:
        self.out.write_text(json.dumps(self.data, indent=1) + "\n")


def run_children(args: argparse.Namespace, setup: Setup, data, results: Results,
                 log_dir: Path) -> None:
    """Each family as a child process of this driver (`children.Child`: a lone rank,
    OMP_NUM_THREADS=1 unless set), `--parallel` at once, one GPU each (the GPU running the
    fewest); a failed child is listed in "failed", the others go on."""
    pending, running = list(args.families), {}  # family -> Child
    gpus = visible_gpus(args.gpus)
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                family = pending.pop(0)
                gpu = min(gpus, key=[c.gpu for c in running.values()].count) if gpus else None
                out = args.work_dir / "children" / f"{family}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.unlink(missing_ok=True)
                running[family] = Child.start(child_argv(args, setup, data, family, out),
                                              log_dir / f"{family}.log", out, gpu)
                print(f"{family}: started{' on GPU ' + gpu if gpu else ''}", flush=True)
            time.sleep(1)
            for family, child in list(running.items()):
                if child.proc.poll() is None:
                    continue
                del running[family]
                row, failure = child.result()
                if row is not None:
                    results.add(row)
                    print(summary(row), flush=True)
                else:
                    results.fail({"family": family, **failure, "log": str(child.log)})
                    print(f"{family}: FAILED (exit {failure['returncode']}): "
                          f"{failure['error']}; log {child.log}", flush=True)
    finally:
        for child in running.values():  # interrupted: end the children we started
            child.stop()


def child_argv(args: argparse.Namespace, setup: Setup, data, family: str, out: Path
               ) -> list[str]:
    """This driver for one family, with every setting spelled out and the data prepared."""
    argv = [sys.executable, "-m", "megatron_jrt.evals.experiments.lm_quality", "--child",
            "--families", family, "--out", str(out), "--work-dir", str(args.work_dir),
            "--tokens", str(setup.tokens), "--lr", repr(setup.lr), "--seed", str(setup.seed),
            "--global-batch-size", str(setup.global_batch_size),
            "--micro-batch-size", str(setup.micro_batch_size),
            "--eval-windows", str(setup.eval_windows), "--data-workers", str(args.data_workers),
            "--workers", str(args.workers)]
    argv += ["--tiny"] if args.tiny else []
    argv += ["--recall-limit", str(setup.recall_limit)] if setup.recall_limit else []
    return argv + ["--data-dir", str(data.data_dir), "--tokenizer", str(data.tokenizer)]


def summary(row: dict) -> str:
    speed = (f", {row['tokens_per_second']:,.0f} tokens/s" if row["tokens_per_second"]
             else "")
    recall = ", ".join(f"{t} {row['recall'][t]['accuracy']:.3f}" for t in TEMPLATES)
    return (f"{row['preset']}: {row['parameters']:,} parameters, {row['tokens']:,} tokens, "
            f"valid loss {row['valid']['loss_after_prefix']:.4f} (ppl "
            f"{row['valid']['ppl_after_prefix']:.2f}), on a repeat "
            f"{row['valid']['loss_repeat']:.4f}, recall {recall}{speed}, "
            f"{row['seconds']:.0f} s")


def markdown_table(data: dict) -> str:
    """The rows as the table of docs/RESULTS.md section 4."""
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    def loss_and_ppl(loss, ppl):
        return "-" if loss is None else f"{loss:.3f} ({ppl:.1f})"

    lines = ["| model | parameters | tokens | valid loss (ppl), positions >= M | "
             "valid loss (ppl), all positions | loss on a repeat (ppl) | recall default | "
             "recall JRT-Prompt | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["runs"]:
        valid, recall = row["valid"], row["recall"]
        lines.append(
            f"| {row['preset']} | {row['parameters']:,} | {row['tokens']:,} | "
            f"{loss_and_ppl(valid['loss_after_prefix'], valid['ppl_after_prefix'])} | "
            f"{loss_and_ppl(valid['loss_all'], valid['ppl_all'])} | "
            f"{loss_and_ppl(valid.get('loss_repeat'), valid.get('ppl_repeat'))} | "
            f"{recall['default']['accuracy']:.3f} | {recall['jrt']['accuracy']:.3f} | "
            f"{number(row['tokens_per_second'], ',.0f')} |")
    runs = data["runs"]
    if runs:
        valid, recall = runs[0]["valid"], runs[0]["recall"]
        train_tokens = data["corpus"].get("train_tokens")
        epochs = f" ({runs[0]['tokens'] / train_tokens:.2f} epochs)" if train_tokens else ""
        lines.append(f"\nM = {valid['positions_from']} (JRT's prefix) of "
                     f"{data['settings']['seq_length']}-token windows, {valid['windows']} "
                     f"held-out windows; {runs[0]['tokens']:,} training tokens per model"
                     f"{epochs}; recall: {recall['documents']} documents of {recall['data']}")
    return "\n".join(lines)


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
