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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from megatron_jrt.evals.experiments.children import Child, visible_gpus
from megatron_jrt.evals.experiments.plot import cell_name

FAMILIES = ("jrt", "based", "transformer", "based+jrt-prompt")
PRESET = {"jrt": "jrt-tiny", "based": "based-tiny", "transformer": "transformer-tiny",
          "based+jrt-prompt": "based-tiny"}
# What a resumed sweep must share with the one it continues (the runs' schedules and scoring).
RESUMED_SETTINGS = ("task", "seq_length", "test_cells", "steps", "batch_size", "examples")
SCORING_RESERVE_S = 60.0  # of a --max-minutes budget, kept for the last runs' scoring
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
    time_limit_minutes: float = 0.0  # > 0: training stops there and the step reached is scored
    resume: bool = False  # continue from the checkpoint in the run's directory, if it has one


def train_and_evaluate(model: Model, task_params: dict, seq_length: int, training: Training,
                       test_cells: list[tuple[int, int]], *, work_dir: Path,
                       examples: int, eval_batch_size: int = 256) -> dict:
    """Train `model` on the task, score `test_cells`; one JSON row.

    `seq_length` is the plain task's window; JRT-Prompt's window grows by one more context.
    Runs in this process (megatron's process group of one rank is set up and torn down here).
    The checkpoint is deleted once the run reached its last step; a run stopped before (its
    time limit) keeps it, and `training.resume` continues from it to the same result as one
    uninterrupted run (the trainer's resume is exact).
    """
    from megatron_jrt.distributed import destroy_distributed, init_distributed
    from megatron_jrt.evals.state_size import state_size
    from megatron_jrt.evals.synthetic_eval import evaluate_cells
    from megatron_jrt.evals.tasks import build_task
    from megatron_jrt.evals.trained_model import load_trained_model
    from megatron_jrt.runlog import LOSSES_FILE, read_losses
    from megatron_jrt.train import train
    from megatron_jrt.train_config import config_from_dict

    params = model.task_params(task_params)
    prompted = params != task_params  # JRT-Prompt: the window holds the context once more
    task = build_task(params, seq_length + (
        build_task(task_params, seq_length).context_length if prompted else 0))
    run_dir = work_dir / model.name
    if not training.resume:
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
                     "eval_steps": 0, "log_interval": max(1, training.steps // 20),
                     "exit_duration_minutes": training.time_limit_minutes},
        "checkpoint": {"save_dir": str(run_dir / "ckpt"), "save_interval": training.steps,
                       "keep_last": 1, "resume": "auto"},
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
    losses = [row["loss"] for row in read_losses(run_dir / LOSSES_FILE)]  # resumed parts too
    if result.last_step >= training.steps:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {**asdict(model), "name": model.name,
            "state_size": state_size(trained.config, task.seq_length),
            "prefix_length": trained.config.prefix_length, "seq_length": task.seq_length,
            "steps": training.steps, "steps_done": result.last_step,
            "resumed_at_step": result.start_step or None,
            "batch_size": training.batch_size, "lr": training.lr,
            "final_loss": losses[-1], "loss_curve": loss_curve(losses),
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


def run_key(model: Model, lr: float) -> str:
    """Names one run of a sweep: its log, its directory in the work dir."""
    return f"{model.name}-lr{lr:g}"


class Sweep:
    """The rows of a sweep, rewritten to `out` after each run; stops before the time budget.

    A run's training log goes to `<out stem>-logs/<model>-lr<lr>.log`; the console gets one
    line per run. `run` trains in this process, one run after the other; `run_children` runs
    each in a child process, several at once. `kept` are rows of an earlier invocation
    (--resume) that lead the new ones; `resume` continues runs from their checkpoints.
    """

    def __init__(self, out: Path, experiment: str, settings: dict, max_minutes: float | None,
                 *, logs: bool = True, train_minutes: float = 0.0, kept: list[dict] = (),
                 resume: bool = False):
        self.out, self.max_seconds = out, None if max_minutes is None else 60 * max_minutes
        self.train_minutes = train_minutes  # each run's own limit (0: none)
        self.logs = logs  # False: the training log stays on stdout (a child's, to its log)
        self.kept, self.resume = list(kept), resume
        self.started, self.longest = time.perf_counter(), 0.0
        self.data = {"experiment": experiment, "device": _device(), "settings": settings,
                     "runs": list(kept), "skipped": []}
        out.parent.mkdir(parents=True, exist_ok=True)

    def time_limit_minutes(self, asked: float) -> float:
        """A run starting now trains at most `asked` minutes (0: no limit), and with a budget
        no longer than what is left of it after SCORING_RESERVE_S (a budget's last quarter
        when that is less) for scoring."""
        if self.max_seconds is None:
            return asked
        left = self._seconds_left() / 60
        return min(asked, left) if asked > 0 else left

    def _seconds_left(self) -> float:
        reserve = min(SCORING_RESERVE_S, self.max_seconds / 4)
        return self.max_seconds - reserve - (time.perf_counter() - self.started)

    def log_path(self, model: Model, lr: float) -> Path:
        return self.out.parent / f"{self.out.stem}-logs" / f"{run_key(model, lr)}.log"

    def run(self, runs: list[tuple[Model, float]], one_run) -> dict:
        """`one_run((model, lr)) -> row` for each run in order, within the budget."""
        for index, (model, lr) in enumerate(runs):
            if self._over_budget(runs[index:]):
                break
            if self.logs:
                log = self.log_path(model, lr)
                log.parent.mkdir(exist_ok=True)
                with open(log, "a" if self.resume else "w") as handle, \
                        contextlib.redirect_stdout(handle):
                    row = one_run((model, lr))
            else:
                row = one_run((model, lr))
            self.longest = max(self.longest, row["seconds"])
            self.data["runs"].append(row)
            self._write()
            print(f"[{index + 1}/{len(runs)}] {_summary(row)}", flush=True)
        self._write()
        return self.data

    def run_children(self, runs: list[tuple[Model, float]], command, *, parallel: int,
                     gpus: list[str], work_dir: Path, poll_seconds: float = 0.5) -> dict:
        """Each run as a child process, `parallel` at once, within the budget.

        `command(model, lr, out, work_dir, minutes) -> argv` trains that one run for at most
        `minutes` (0: no limit) and writes its sweep JSON to `out`. A child gets
        OMP_NUM_THREADS=1 unless it is set (a few threads each, or children oversubscribe
        the cores), a rank of its own (a lone process, any free
        port) and, with `gpus`, CUDA_VISIBLE_DEVICES: the GPU running the fewest children,
        the first such in `gpus` order (round-robin while runs take alike). Its stdout and
        stderr go to its log. The rows come back in `runs`' order, as `run` writes them; a
        failed child is listed in "failed" with its exit code, last line and log, and the
        others go on.
        """
        self.data["failed"] = []
        rows, failed, running = {}, {}, {}  # run index -> row / failure / Child
        pending = list(enumerate(runs))
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    if self._over_budget([run for _, run in pending]):
                        pending = []
                        break
                    index, (model, lr) = pending.pop(0)
                    gpu = min(gpus, key=[c.gpu for c in running.values()].count) if gpus else None
                    child_dir = work_dir / run_key(model, lr)
                    if not self.resume:
                        shutil.rmtree(child_dir, ignore_errors=True)
                    child_dir.mkdir(parents=True, exist_ok=True)
                    (child_dir / "run.json").unlink(missing_ok=True)  # the row of this start
                    log = self.log_path(model, lr)
                    log.parent.mkdir(exist_ok=True)
                    running[index] = Child.start(
                        command(model, lr, child_dir / "run.json", child_dir / "work",
                                self.time_limit_minutes(self.train_minutes)),
                        log, child_dir / "run.json", gpu, append=self.resume)
                time.sleep(poll_seconds)
                for index, child in list(running.items()):
                    if child.proc.poll() is None:
                        continue
                    del running[index]
                    model, lr = runs[index]
                    self.longest = max(self.longest, child.seconds())
                    row, failure = child.result()
                    if row is not None:
                        rows[index] = row
                        line = _summary(row)
                    else:
                        failed[index] = {"name": model.name, "lr": lr, "gpu": child.gpu,
                                         **failure, "log": str(child.log)}
                        line = (f"{model.name} lr {lr:g}: FAILED (exit {failure['returncode']}"
                                f"): {failure['error']}; log {child.log}")
                    self.data["runs"] = self.kept + [rows[i] for i in sorted(rows)]
                    self.data["failed"] = [failed[i] for i in sorted(failed)]
                    self._write()
                    print(f"[{len(rows) + len(failed)}/{len(runs)}] {line}", flush=True)
        finally:
            for child in running.values():  # interrupted: end the children we started
                child.stop()
        self._write()
        return self.data

    def _over_budget(self, rest: list[tuple[Model, float]]) -> bool:
        """Past the budget with `rest` still to start: list them as skipped and say so. A run
        is not started when the longest so far would end past the budget, or when no time
        is left to train before the scoring reserve."""
        elapsed = time.perf_counter() - self.started
        if self.max_seconds is None or (elapsed + self.longest <= self.max_seconds
                                        and self._seconds_left() > 0):
            return False
        self.data["skipped"] = [f"{m.name} lr {x:g}" for m, x in rest]
        print(f"budget: {elapsed / 60:.1f} of {self.max_seconds / 60:.1f} min used, "
              f"the longest run took {self.longest:.0f} s; skipping "
              f"{len(rest)} runs", flush=True)
        return True

    def _write(self) -> None:
        self.data["minutes"] = (time.perf_counter() - self.started) / 60
        self.out.write_text(json.dumps(self.data, indent=1) + "\n")


def _summary(row: dict) -> str:
    """The run's console lines: its totals, then its accuracy per test cell (the console comes
    back from a device call when the JSON may not)."""
    mean = sum(c["accuracy"] for c in row["cells"]) / len(row["cells"])
    cut = (f" (time limit: stopped at step {row['steps_done']} of {row['steps']})"
           if row["steps_done"] < row["steps"] else "")
    cells = " ".join(f"{cell_name(c)} {c['accuracy']:.3f}" for c in row["cells"])
    return (f"{row['name']} lr {row['lr']:g}: state {row['state_size']:,}, mean accuracy "
            f"{mean:.3f}, loss {row['final_loss']:.3f}, {row['step_ms']:.0f} ms/step, "
            f"{row['seconds']:.0f} s{cut}\n    per cell: {cells}")


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
                        help="the sweep's budget: no run starts that would end past it, and a "
                             "run still training when only the scoring reserve is left stops "
                             "and is scored at the step it reached (default: "
                             f"{setup.max_minutes})")
    parser.add_argument("--train-minutes", type=float, default=0.0,
                        help="each run trains at most this long, then is scored at the step "
                             "it reached (checkpointed like a SIGUSR1 stop; 0: no limit)")
    parser.add_argument("--data-workers", type=int, default=DATA_WORKERS,
                        help="sample-making processes per run on a GPU (fewer when several "
                             "sweeps share a host)")
    parser.add_argument("--points", type=lambda t: tuple(t.split(",")),
                        help="family:d:f,... the models to train instead of the grid of "
                             "--models x --hidden-sizes x --feature-dims (f defaults to the "
                             "first feature dim; each at every --lr)")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: run every n-th model from the i-th (one shard per GPU)")
    parser.add_argument("--parallel", type=int, default=1,
                        help="runs at once, each a child process with OMP_NUM_THREADS=1 (unless "
                             "set), its own log and the GPU running the fewest; the rows are "
                             "merged into --out (default 1: one after the other, in this process)")
    parser.add_argument("--gpus", type=lambda t: [g for g in t.split(",") if g],
                        help="with --parallel: the GPUs to spread the runs over, as "
                             "CUDA_VISIBLE_DEVICES names them (default: every visible one)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoints while a run lasts, and of runs stopped before their "
                             "last step (default: next to --out)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the sweep in --out: keep its finished runs, continue "
                             "the ones stopped by a time limit from their checkpoints in "
                             "--work-dir, run the rest (same settings as before)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # --parallel's
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
    settings = {}
    if args.points:
        if args.models or args.hidden_sizes or args.feature_dims:
            raise SystemExit("--points names every model: leave out --models, --hidden-sizes "
                             "and --feature-dims")
        points = [_point(text, chosen.feature_dims[0]) for text in args.points]
        chosen = dataclasses.replace(
            chosen, families=tuple(dict.fromkeys(m.family for m in points)),
            hidden_sizes=tuple(dict.fromkeys(m.hidden_size for m in points)),
            feature_dims=tuple(dict.fromkeys(m.feature_dim for m in points)))
        settings["points"] = [f"{m.family}:{m.hidden_size}:{m.feature_dim}" for m in points]
        grid = [(model, lr) for model in points for lr in chosen.lrs]
    else:
        grid = _grid(chosen)
    unknown = set(chosen.families) - set(FAMILIES)
    if unknown:
        raise SystemExit(f"--models: unknown {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.parallel < 1:
        raise SystemExit(f"--parallel {args.parallel}: at least 1")
    shard, shards = (int(x) for x in args.shard.split("/"))
    runs = grid[shard::shards]
    work_dir = args.work_dir or args.out.parent / f".{args.out.stem}-work"
    recorded = dataclasses.asdict(chosen)  # the settings the JSON records
    kept = (finished_rows(args.out, {key: recorded[key] for key in RESUMED_SETTINGS},
                          quiet=args.child) if args.resume else [])
    done = {(row["name"], row["lr"]) for row in kept}
    runs = [(model, lr) for model, lr in runs if (model.name, lr) not in done]
    if args.parallel > 1:
        gpus = visible_gpus(args.gpus)
        settings.update(parallel=args.parallel, gpus=gpus)
    if args.train_minutes < 0:
        raise SystemExit(f"--train-minutes {args.train_minutes}: at least 0")
    sweep = Sweep(args.out, experiment,
                  {**recorded, "shard": args.shard, **settings},
                  # a child's limit is its --train-minutes: the parent keeps the budget
                  None if args.child else chosen.max_minutes, logs=not args.child,
                  train_minutes=args.train_minutes, kept=kept, resume=args.resume)
    if args.parallel > 1:
        def command(model: Model, lr: float, out: Path, work: Path, minutes: float
                    ) -> list[str]:
            """This driver for the one run, with the sweep's settings spelled out."""
            return [sys.executable, "-m", f"megatron_jrt.evals.experiments.{experiment}",
                    *(["--tiny"] if args.tiny else []), "--child",
                    "--points", f"{model.family}:{model.hidden_size}:{model.feature_dim}",
                    "--lr", repr(lr), "--vocab-size", str(chosen.task["vocab_size"]),
                    "--steps", str(chosen.steps), "--batch-size", str(chosen.batch_size),
                    "--examples", str(chosen.examples), "--data-workers", str(args.data_workers),
                    "--train-minutes", repr(minutes), "--out", str(out), "--work-dir", str(work),
                    *(["--resume"] if args.resume else [])]

        print(f"{len(runs)} runs, {args.parallel} at a time "
              f"{'on GPUs ' + ','.join(gpus) if gpus else 'on the CPU'}; logs in "
              f"{sweep.log_path(*runs[0]).parent if runs else '-'}", flush=True)
        data = sweep.run_children(runs, command, parallel=args.parallel, gpus=gpus,
                                  work_dir=work_dir)
        _keep_unfinished(data, work_dir, quiet=args.child)
        if data["failed"]:
            raise SystemExit(f"{len(data['failed'])} of {len(runs)} runs failed: "
                             + ", ".join(f"{f['name']} lr {f['lr']:g} ({f['log']})"
                                         for f in data["failed"]))
        return data

    def one_run(item) -> dict:
        model, lr = item
        training = Training(steps=chosen.steps, batch_size=chosen.batch_size, lr=lr,
                            data_workers=args.data_workers,
                            time_limit_minutes=sweep.time_limit_minutes(args.train_minutes),
                            resume=args.resume)
        return train_and_evaluate(model, chosen.task, chosen.seq_length, training,
                                  list(chosen.test_cells), work_dir=work_dir / run_key(model, lr),
                                  examples=chosen.examples)

    data = sweep.run(runs, one_run)
    _keep_unfinished(data, work_dir, quiet=args.child)
    return data


def finished_rows(out: Path, compared: dict, *, quiet: bool = False) -> list[dict]:
    """The rows of the sweep in `out` whose runs reached their last step, after checking that
    it was made with the `compared` settings (a resumed run must follow the same schedule)."""
    if not out.is_file():
        if not quiet:
            print(f"--resume: {out} does not exist yet: starting the sweep", flush=True)
        return []
    earlier = json.loads(out.read_text())
    for key, value in compared.items():
        was = earlier.get("settings", {}).get(key)
        if json.loads(json.dumps(value)) != was:
            raise SystemExit(f"--resume: {out} was made with {key} {was}, not {value}; resume "
                             "with the same settings, or write a new --out")
    return [row for row in earlier.get("runs", []) if row["steps_done"] >= row["steps"]]


def _keep_unfinished(data: dict, work_dir: Path, *, quiet: bool) -> None:
    """Delete the work dir, unless runs stopped before their last step: their checkpoints
    stay there for --resume."""
    unfinished = [row["name"] for row in data["runs"] if row["steps_done"] < row["steps"]]
    if not unfinished:
        shutil.rmtree(work_dir, ignore_errors=True)
    elif not quiet:
        print(f"{len(unfinished)} runs stopped before their last step ({', '.join(unfinished)}); "
              f"their checkpoints are in {work_dir}: the same command with --resume continues "
              "them", flush=True)


def _point(text: str, feature_dim: int) -> Model:
    """--points' family:d[:f]."""
    parts = text.split(":")
    try:
        if parts[0] not in FAMILIES or len(parts) not in (2, 3):
            raise ValueError
        return Model(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else feature_dim)
    except ValueError:
        raise SystemExit(f"--points: {text!r} is not family:d:f with a family of "
                         f"{', '.join(FAMILIES)} (e.g. jrt:36:4)") from None


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
