"""One point of a recall sweep: train a model on a synthetic task, reload it, score its cells.

The models differ only where the paper's do (megatron_jrt.config's presets):
- "jrt": JRT-RNN, the prefix covering the task's context region (read non-causally);
- "based": the same layers, prefix 0 (causal Taylor linear attention);
- "based+jrt-prompt": Based trained and tested on prompts with the context twice (MQAR);
- "transformer": the same layers with full softmax attention (letter A) for linear attention.
All are 4 layers alternating BaseConv (short gated conv, kernel 3) and the mixer, 2 heads,
as in the authors' set-disjointness models and zoology's hybrids; width and feature dim set
the state size (megatron_jrt.evals.state_size).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FAMILIES = ("jrt", "based", "transformer", "based+jrt-prompt")
PRESET = {"jrt": "jrt-tiny", "based": "based-tiny", "transformer": "transformer-tiny",
          "based+jrt-prompt": "based-tiny"}
# Processes that make the samples ahead of a GPU (~0.1 ms each in Python: 25 ms of a batch of
# 256, more than a small model's step); none on CPU, where they would compete with training.
DATA_WORKERS = 4


@dataclass(frozen=True)
class Model:
    family: str
    hidden_size: int
    feature_dim: int = 16  # PLA only; the Transformer has none

    @property
    def name(self) -> str:
        if self.family == "transformer":
            return f"{self.family}-d{self.hidden_size}"
        return f"{self.family}-d{self.hidden_size}-f{self.feature_dim}"

    def task_params(self, params: dict) -> dict:
        return {**params, "jrt_prompt": True} if self.family == "based+jrt-prompt" else params

    def overrides(self, context_length: int, seq_length: int) -> dict:
        """model.overrides of the family's preset for a task of this layout."""
        mixer = "A" if self.family == "transformer" else "P"
        return {"num_layers": 4, "layer_pattern": "C" + mixer + "C" + mixer, "num_heads": 2,
                "hidden_size": self.hidden_size, "feature_dim": self.feature_dim,
                "prefix_length": context_length if self.family == "jrt" else 0,
                "max_sequence_length": seq_length}


@dataclass(frozen=True)
class Training:
    steps: int
    batch_size: int
    lr: float
    seed: int = 1234
    warmup_steps: int = 50
    data_workers: int = DATA_WORKERS  # on a GPU; none on CPU


def train_and_evaluate(model: Model, task_params: dict, seq_length: int, training: Training,
                       test_cells: list[tuple[int, int]], *, work_dir: Path,
                       examples: int, eval_batch_size: int = 256) -> dict:
    """Train `model` on the task, score `test_cells`, delete the checkpoint; one JSON row.

    `seq_length` is the plain task's window; JRT-Prompt's window grows by one more context.
    Runs in this process (megatron's process group of one rank is set up and torn down here).
    """
    from megatron_jrt.distributed import destroy_distributed, init_distributed
    from megatron_jrt.evals.state_size import state_size
    from megatron_jrt.evals.synthetic_eval import evaluate_cells
    from megatron_jrt.evals.tasks import build_task
    from megatron_jrt.evals.trained_model import load_trained_model
    from megatron_jrt.train import train
    from megatron_jrt.train_config import config_from_dict

    params = model.task_params(task_params)
    prompted = params != task_params  # JRT-Prompt: the window holds the context once more
    task = build_task(params, seq_length + (
        build_task(task_params, seq_length).context_length if prompted else 0))
    run_dir = work_dir / model.name
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_from_dict({
        "model": {"preset": PRESET[model.family],
                  "overrides": model.overrides(task.context_length, task.seq_length)},
        "data": {"synthetic": params, "seq_length": task.seq_length,
                 "micro_batch_size": training.batch_size,
                 "global_batch_size": training.batch_size,
                 "num_workers": training.data_workers if torch.cuda.is_available() else 0},
        "optimizer": {"lr": training.lr, "min_lr": training.lr / 10,
                      "warmup_steps": min(training.warmup_steps, training.steps // 2)},
        "training": {"train_steps": training.steps, "seed": training.seed,
                     "eval_steps": 0, "log_interval": max(1, training.steps // 20)},
        "checkpoint": {"save_dir": str(run_dir / "ckpt"), "save_interval": training.steps,
                       "keep_last": 1},
        "logging": {"run_dir": str(run_dir), "tensorboard": False, "progress_bar": False},
    })
    cfg.validate()
    started = time.perf_counter()
    init_distributed(seed=training.seed)
    try:
        result = train(cfg)
        trained_at = time.perf_counter()
        trained = load_trained_model(run_dir / "ckpt")
        cells = evaluate_cells(trained, task, test_cells, examples=examples,
                               batch_size=eval_batch_size, seed=training.seed)
    finally:
        destroy_distributed()
    shutil.rmtree(run_dir, ignore_errors=True)
    return {**asdict(model), "name": model.name,
            "state_size": state_size(trained.config, task.seq_length),
            "prefix_length": trained.config.prefix_length, "seq_length": task.seq_length,
            "steps": training.steps, "batch_size": training.batch_size, "lr": training.lr,
            "final_loss": result.losses[-1], "loss_curve": loss_curve(result.losses),
            "train_seconds": trained_at - started,
            "step_ms": statistics.median(result.step_times) * 1e3,
            "seconds": time.perf_counter() - started,
            "cells": [{**task.describe(c.cell), "accuracy": c.accuracy, "answers": c.answers}
                      for c in cells]}


def loss_curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """[step, training loss] at about `points` evenly spaced steps and the last one (the plot's
    learning curves: how far from converged a run stopped)."""
    every = max(1, len(losses) // points)
    steps = sorted(set(range(every, len(losses) + 1, every)) | {len(losses)})
    return [[step, losses[step - 1]] for step in steps]


class Sweep:
    """The rows of a sweep, rewritten to `out` after each run; stops before the time budget.

    A run's training log goes to `<out stem>-logs/<model>-lr<lr>.log`; the console gets one
    line per run.
    """

    def __init__(self, out: Path, experiment: str, settings: dict, max_minutes: float | None):
        self.out, self.max_seconds = out, None if max_minutes is None else 60 * max_minutes
        self.started, self.longest = time.perf_counter(), 0.0
        self.data = {"experiment": experiment, "device": _device(), "settings": settings,
                     "runs": [], "skipped": []}
        out.parent.mkdir(parents=True, exist_ok=True)

    def run(self, runs: list[tuple[Model, float]], one_run) -> dict:
        """`one_run((model, lr)) -> row` for each run in order, within the budget."""
        for index, (model, lr) in enumerate(runs):
            elapsed = time.perf_counter() - self.started
            if self.max_seconds is not None and elapsed + self.longest > self.max_seconds:
                self.data["skipped"] = [f"{m.name} lr {x:g}" for m, x in runs[index:]]
                print(f"budget: {elapsed / 60:.1f} of {self.max_seconds / 60:.1f} min used, "
                      f"the longest run took {self.longest:.0f} s; skipping "
                      f"{len(runs) - index} runs", flush=True)
                break
            log = self.out.parent / f"{self.out.stem}-logs" / f"{model.name}-lr{lr:g}.log"
            log.parent.mkdir(exist_ok=True)
            with open(log, "w") as handle, contextlib.redirect_stdout(handle):
                row = one_run((model, lr))
            self.longest = max(self.longest, row["seconds"])
            self.data["runs"].append(row)
            self._write()
            mean = sum(c["accuracy"] for c in row["cells"]) / len(row["cells"])
            print(f"[{index + 1}/{len(runs)}] {model.name} lr {lr:g}: state "
                  f"{row['state_size']:,}, mean accuracy {mean:.3f}, loss {row['final_loss']:.3f}, "
                  f"{row['step_ms']:.0f} ms/step, "
                  f"{row['seconds']:.0f} s", flush=True)
        self._write()
        return self.data

    def _write(self) -> None:
        self.data["minutes"] = (time.perf_counter() - self.started) / 60
        self.out.write_text(json.dumps(self.data, indent=1) + "\n")


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


@dataclass(frozen=True)
class Setup:
    """What one sweep trains and tests (a driver has a GPU setup and a --tiny CPU one)."""

    task: dict  # data.synthetic
    seq_length: int
    test_cells: tuple[tuple[int, int], ...]
    families: tuple[str, ...]
    hidden_sizes: tuple[int, ...]
    feature_dims: tuple[int, ...]
    steps: int
    batch_size: int
    lrs: tuple[float, ...]
    examples: int
    max_minutes: float | None


def sweep_parser(description: str, setup: Setup, tiny: Setup):
    """The command line every sweep shares; its defaults are `setup`'s (`--tiny`: `tiny`'s)."""
    import argparse

    def numbers(kind):
        return lambda text: tuple(kind(x) for x in text.split(","))

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True, help="the results JSON")
    parser.add_argument("--tiny", action="store_true",
                        help=f"the CPU smoke version ({tiny.steps} steps, small sizes)")
    parser.add_argument("--models", type=lambda t: tuple(t.split(",")),
                        help=f"families, comma-separated, of {', '.join(FAMILIES)} "
                             f"(default: {','.join(setup.families)})")
    parser.add_argument("--hidden-sizes", type=numbers(int), help="d_model values")
    parser.add_argument("--feature-dims", type=numbers(int), help="PLA feature dims")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=numbers(float), dest="lrs",
                        help="one or more (a point is the best over them, as in the paper)")
    parser.add_argument("--vocab-size", type=int, help=f"the task's (default: "
                                                       f"{setup.task['vocab_size']})")
    parser.add_argument("--examples", type=int, help="test samples per cell")
    parser.add_argument("--max-minutes", type=float,
                        help="start no run that would end past this (default: "
                             f"{setup.max_minutes})")
    parser.add_argument("--data-workers", type=int, default=DATA_WORKERS,
                        help="sample-making processes per run on a GPU (fewer when several "
                             "sweeps share a host)")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: run every n-th model from the i-th (one shard per GPU)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints while a run lasts (default: next to --out)")
    return parser


def run_sweep(experiment: str, args, setup: Setup, tiny: Setup) -> dict:
    """The sweep `args` asks for (parsed by `sweep_parser`), written to args.out."""
    import dataclasses

    from megatron_jrt.quiet import silence_megatron_noise

    silence_megatron_noise()

    base = tiny if args.tiny else setup
    chosen = dataclasses.replace(base, **{
        "task": {**base.task, "vocab_size": args.vocab_size or base.task["vocab_size"]},
        "families": args.models or base.families,
        "hidden_sizes": args.hidden_sizes or base.hidden_sizes,
        "feature_dims": args.feature_dims or base.feature_dims,
        "steps": args.steps or base.steps, "batch_size": args.batch_size or base.batch_size,
        "lrs": args.lrs or base.lrs, "examples": args.examples or base.examples,
        "max_minutes": args.max_minutes if args.max_minutes is not None else base.max_minutes})
    unknown = set(chosen.families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    shard, shards = (int(x) for x in args.shard.split("/"))
    runs = [(model, lr) for model, lr in _grid(chosen)][shard::shards]
    work_dir = args.work_dir or args.out.parent / f".{args.out.stem}-work"
    sweep = Sweep(args.out, experiment, {**dataclasses.asdict(chosen), "shard": args.shard},
                  chosen.max_minutes)

    def one_run(item) -> dict:
        model, lr = item
        training = Training(steps=chosen.steps, batch_size=chosen.batch_size, lr=lr,
                            data_workers=args.data_workers)
        return train_and_evaluate(model, chosen.task, chosen.seq_length, training,
                                  list(chosen.test_cells), work_dir=work_dir,
                                  examples=chosen.examples)

    data = sweep.run(runs, one_run)
    shutil.rmtree(work_dir, ignore_errors=True)
    return data


def _grid(setup: Setup) -> list[tuple[Model, float]]:
    """Every (model, lr), smallest width first and the families interleaved, so that a sweep cut
    short by its budget still compares the families at the sizes it reached."""
    grid = []
    for d in setup.hidden_sizes:
        for f in setup.feature_dims:
            for family in setup.families:
                if family == "transformer" and f != setup.feature_dims[0]:
                    continue  # no feature map: one Transformer per width
                grid += [(Model(family, d, f), lr) for lr in setup.lrs]
    return grid
