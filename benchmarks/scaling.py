"""Scaling suite: data-parallel weak scaling, parallel layouts, and a resume onto another layout.

    # 2 x H200 (weak + layouts took 4.2 minutes; resume did not finish in 3.3 more: give it
    # its own call with --parts resume; `--json` is rewritten after each row)
    python benchmarks/scaling.py --gpus 1,2 --json out/scaling.json --work-dir out/scaling
    # 4 or 8 GPUs: the same script, other numbers
    python benchmarks/scaling.py --gpus 1,2,4,8 --layouts dp,tp2,pp2,tp2pp2 \\
        --resume-from 8:dp --resume-to 4:dp,8:tp2 --json scaling-8.json
    # CPU smoke run (GPUs hidden, gloo; "GPUs" are processes): about a minute on 2 cores
    python benchmarks/scaling.py --tiny --json /tmp/scaling-tiny.json

Every measurement is a real `jrt-train` run, launched as
`python -m torch.distributed.run --standalone --nproc-per-node N -m megatron_jrt.train
--config configs/<preset>.yaml --set data.mock_data=true --set ...` (this interpreter, this
environment, the repository root on PYTHONPATH; configs/mock-tiny.yaml for a preset without a
config of its own), with the environment defaults slurm/jrt-train.sh gives its trainers (NVLink
multicast off: NCCL_NVLS_ENABLE=0 ...; read from that script, so they are said once). Mock tokens
of a 50,264-token vocabulary, no evaluation, no checkpoints except in `resume`, one log line and
TensorBoard record per step. Metrics come from each run's directory: `losses.jsonl` (the loss of
every step) and the TensorBoard scalars `iteration-time`, `mfu`, `mem-max-allocated-bytes` (where
tensorboard is not installed the runs log none, and the same values are read from the trainer's
per-step console lines). The runs' step timing is jrt-train's own (device-synced by the loss).
Every run's console goes to `<work-dir>/<run>.log`, printed with the row's status when the run
fails (an out-of-memory, any error, a timeout: that row's status; the suite goes on). `--set`
adds overrides to every run (e.g. `--set training.compile=true`).

Parts (`--parts weak,layouts,resume`):
  weak     DP weak scaling of `--weak-preset` (default jrt-360m) at each of `--gpus`: a fixed
           micro batch per GPU (`--weak-micro-batch` x `--seq-length`), no accumulation,
           distributed optimizer, `parallel.overlap_grad_reduce=true`. Per row: median step
           time and tokens/s per GPU over the `--steps` steps after `--warmup`, efficiency
           (tokens/s per GPU over the 1-GPU row's), MFU, peak memory.
  layouts  `--layouts-preset` (default jrt-1.3b) on `--layouts-gpus` GPUs (default the largest of
           `--gpus`) in each of `--layouts` (dp, tpT, ppP, tpTppP; data parallel fills the
           rest). Every layout trains the same global batch (`--layouts-batch-per-gpu` x GPUs
           sequences of `--layouts-micro-batch`; TP/PP layouts accumulate more micro-batches),
           so tokens/s per GPU compare directly; distributed optimizer, overlapped grad
           reduce. A layout whose TP x PP does not divide the GPUs (or that the config
           refuses) is printed as skipped, with the reason.
  resume   `--resume-preset` (default jrt-360m) trained `--resume-steps` steps two ways, same
           seed, data, global batch and LR schedule (warm-up 2, cosine over the steps; bf16 on
           GPU, fp32 on CPU): uninterrupted on the
           `--resume-from` GPUs:layout (default <largest of --gpus>:dp); and, per target of
           `--resume-to` (default 1:dp), stopped by SIGUSR1 once it has logged step
           `--resume-stop-step` (jrt-train checkpoints at the next step boundary, k, and exits 10),
           then resumed with `checkpoint.resume=auto` (same save_dir and run dir) on the target.
           Per row: k, both loss curves, the max relative gap |resumed - uninterrupted| /
           |uninterrupted| over the steps after k (and over steps <= k, which must be 0), and
           a PNG of the two curves beside `--json` (else in the work dir; matplotlib, the
           `[evals]` extra; skipped with a message when it is missing). The checkpoints are
           deleted after the row.

Memory is the peak allocated device memory (torch's allocator) of the logging rank, the last
rank (the last pipeline stage with PP); host memory is not counted. Rows run in the order
weak, layouts, resume; `--max-minutes` (default 9) skips what would start after the budget
and bounds each run by what is left. Exit status 1 when any row failed (skips are not failures).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "slurm" / "jrt-train.sh"
VOCAB = 50264  # GPT-2's 50,257 ids padded to a multiple of 8 (mock ids 0..50262, 50263 [MASK])
STOPPED = 10  # megatron_jrt.errors.ExitCode.STOPPED: checkpointed after a stop signal
# what the weak-scaling and layout rows set on top of run_sets
DISTRIBUTED_OPTIMIZER = ["parallel.use_distributed_optimizer=true",
                         "parallel.overlap_grad_reduce=true"]
TINY = dict(weak_preset="jrt-tiny", layouts_preset="jrt-tiny", resume_preset="jrt-tiny",
            seq_length=64, weak_micro_batch=2, layouts_micro_batch=1, layouts_batch_per_gpu=2,
            resume_micro_batch=2, steps=3, warmup=1, resume_steps=12, resume_stop_step=4,
            vocab=256)
GPU = dict(weak_preset="jrt-360m", layouts_preset="jrt-1.3b", resume_preset="jrt-360m",
           seq_length=2048, weak_micro_batch=8, layouts_micro_batch=2, layouts_batch_per_gpu=4,
           resume_micro_batch=4, steps=15, warmup=5, resume_steps=20, resume_stop_step=10,
           vocab=VOCAB)


@dataclasses.dataclass
class Layout:
    gpus: int
    tp: int = 1
    pp: int = 1

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def name(self) -> str:
        return f"TP{self.tp} PP{self.pp} DP{self.dp}"

    @property
    def describe(self) -> str:
        return f"{self.gpus} GPU{'s' if self.gpus > 1 else ''} {self.name}"

    @property
    def tag(self) -> str:
        return f"{self.gpus}gpu-tp{self.tp}pp{self.pp}"

    def sets(self) -> list[str]:
        return [f"parallel.tensor_parallel={self.tp}", f"parallel.pipeline_parallel={self.pp}"]


@dataclasses.dataclass
class Row:
    """One measured run: a line of a part's table, an entry of the JSON's list for its part."""

    part: str  # "weak" | "layouts"
    preset: str
    layout: str  # the --layouts name ("dp", "tp2", ...) or "dp" for weak
    gpus: int
    tp: int
    pp: int
    dp: int
    seq_length: int
    micro_batch: int
    global_batch: int  # sequences per optimizer step
    status: str = "ok"  # "ok", "OOM", "skipped: ...", "error: ..."
    step_ms: float | None = None
    tokens_per_s: float | None = None  # whole job
    tokens_per_s_per_gpu: float | None = None
    efficiency: float | None = None  # weak: tokens/s per GPU over the 1-GPU row's
    mfu: float | None = None
    memory_gib: float | None = None  # the logging (last) rank's peak allocated
    final_loss: float | None = None
    timed_steps: int = 0
    log: str | None = None


@dataclasses.dataclass
class ResumeRow:
    preset: str
    uninterrupted: str  # "2 GPUs TP1 PP1 DP2"
    resumed_on: str
    steps: int
    status: str = "ok"
    stop_step: int | None = None  # k: the step the stopped run checkpointed and exited at
    max_rel_gap: float | None = None  # over the steps after k
    max_rel_gap_before: float | None = None  # over steps 1..k (same layout: 0)
    losses_uninterrupted: dict[int, float] = dataclasses.field(default_factory=dict)
    losses_resumed: dict[int, float] = dataclasses.field(default_factory=dict)
    plot: str | None = None
    log: str | None = None


class RunFailed(Exception):
    """A run that did not end as it should; the message is the row's status."""


# ---- launching -------------------------------------------------------------------------------

def launcher_env_defaults(path: Path = LAUNCHER) -> dict[str, str]:
    """The `export NAME="${NAME:-value}"` defaults slurm/jrt-train.sh gives every trainer (NVLS
    off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1), so this
    benchmark's runs see the cluster's settings without a second copy of the list."""
    found = dict(re.findall(r'^export (\w+)="\$\{\1:-([^${}"]*)\}"$', path.read_text(), re.M))
    if not found:
        raise SystemExit(f"{path}: no `export NAME=\"${{NAME:-value}}\"` defaults found; this "
                         "script takes the trainers' environment (NCCL_NVLS_ENABLE, ...) "
                         "from there")
    return found


def child_env(cpu: bool = False) -> dict[str, str]:
    """This environment, with the launcher's defaults, the repository on PYTHONPATH, no
    inherited rank variables; `cpu` hides the GPUs (--tiny: CPU and gloo on any machine)."""
    env = dict(os.environ)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for name, value in launcher_env_defaults().items():
        env.setdefault(name, value)  # as the launcher: the caller's environment wins
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = env.get("PYTHONPATH", "").split(os.pathsep)
    if str(REPO) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, paths)])
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)  # torchrun --standalone sets its own
    return env


def probe_device(env: dict[str, str]) -> dict:
    """Torch version, GPU count and name as the trainers will see them, asked in a child
    process so that this one never holds a CUDA context (memory on GPU 0) while they run."""
    code = ("import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() "
            "else 0; print(json.dumps({'torch': torch.__version__, 'gpus': n, "
            "'name': torch.cuda.get_device_name() if n else 'CPU'}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode:
        raise SystemExit(f"cannot import torch with {sys.executable}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def config_args(preset: str) -> list[str]:
    """configs/<preset>.yaml, or mock-tiny.yaml with the preset for one without a config."""
    path = REPO / "configs" / f"{preset}.yaml"
    if path.exists():
        return ["--config", str(path)]
    return ["--config", str(REPO / "configs" / "mock-tiny.yaml"), "--set", f"model.preset={preset}"]


def run_sets(args, *, run_dir: Path, seq_length: int, micro_batch: int, global_batch: int,
             steps: int, extra: list[str]) -> list[str]:
    """The `--set` values of every run: mock tokens, no evaluation, a line per step."""
    return ["data.mock_data=true", f"data.mock_vocab_size={args.vocab - 1}", "data.data_dir=''",
            "data.tokenizer=''", "data.num_workers=0", f"data.seq_length={seq_length}",
            f"data.micro_batch_size={micro_batch}", f"data.global_batch_size={global_batch}",
            f"training.train_steps={steps}", "training.eval_steps=0", "training.log_interval=1",
            "training.sample_tokens=0", "optimizer.warmup_steps=1", "checkpoint.save_dir=''",
            "checkpoint.resume=none", f"logging.run_dir={run_dir}",
            f"logging.tensorboard={str(have_tensorboard()).lower()}",
            "logging.progress_bar=false", *args.set, *extra]


def check_config(preset: str, sets: list[str], gpus: int) -> str | None:
    """The config error jrt-train would stop with at this world size, or None (checked here,
    in a second, rather than after a launch)."""
    from megatron_jrt.config import ConfigError
    from megatron_jrt.train_config import load_config

    path, *preset_set = [a for a in config_args(preset) if a not in ("--config", "--set")]
    try:
        load_config(path, preset_set + sets).validate(world_size=gpus)
    except (ConfigError, FileNotFoundError) as error:
        return str(error)
    return None


class Launch:
    """`torchrun ... -m megatron_jrt.train` in its own process group, console to `log`."""

    def __init__(self, gpus: int, preset: str, sets: list[str], run_dir: Path, log: Path,
                 deadline: float, env: dict[str, str]):
        # an earlier run's exit.json (the stopped run's, before a resume) is not this run's
        (run_dir / "exit.json").unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={gpus}", "-m", "megatron_jrt.train", *config_args(preset)]
        for item in sets:
            cmd += ["--set", item]
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log, self.deadline = log, deadline
        with open(log, "w") as handle:
            handle.write("$ " + " ".join(cmd) + "\n")
            handle.flush()
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=handle,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)

    def signal_workers(self, sig: int) -> None:
        """`sig` to the trainers (torchrun's children). Not to torchrun: it has no SIGUSR1
        handler and would die of it, leaving its workers behind."""
        import psutil

        for child in psutil.Process(self.proc.pid).children():
            try:
                child.send_signal(sig)
            except psutil.NoSuchProcess:
                pass

    def wait(self) -> int:
        """The launcher's exit status; then whatever it left in its process group (a checkpoint
        writer) is ended, so that nothing holds memory into the next run."""
        try:
            rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise RunFailed("timeout: over --max-minutes (or --run-timeout); killed") from None
        self._signal_group(signal.SIGKILL)
        return rc

    def kill(self) -> None:
        """The whole process group this script started: SIGTERM (torchrun stops its workers),
        then SIGKILL for anything left."""
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:  # nothing left in the group
            pass


def exit_status(run_dir: Path, rc: int, expected: int = 0) -> None:
    """Raise RunFailed with the trainer's own exit code and message (exit.json; torchrun turns
    every worker failure into its own exit 1) unless the run ended with `expected`."""
    path = run_dir / "exit.json"
    record = json.loads(path.read_text()) if path.exists() else None
    code = record["code"] if record else rc
    if code == expected and (record or rc == expected):
        return
    if record is None:
        raise RunFailed(f"error: exit {rc} before jrt-train wrote exit.json")
    message = record.get("message", "")
    # an OOM on another rank reaches rank 0 (exit.json) as a failed collective: its traceback
    # file in <run_dir>/logs/ says what happened
    tracebacks = [p.read_text(errors="replace") for p in (run_dir / "logs").glob("error-rank*")]
    if any("OutOfMemoryError" in text or "CUDA out of memory" in text
           for text in [message, *tracebacks]):
        raise RunFailed("OOM")
    raise RunFailed(f"error: exit {code} ({record.get('name')}): {message}".splitlines()[0][:300])


# ---- reading a run directory -----------------------------------------------------------------

def read_losses(run_dir: Path) -> dict[int, float]:
    """losses.jsonl as {step: loss} (a torn last line of a killed run is left out)."""
    from megatron_jrt.runlog import LOSSES_FILE, read_losses as loss_rows

    return {row["step"]: row["loss"] for row in loss_rows(run_dir / LOSSES_FILE)}


SCALARS = ("iteration-time", "mfu", "mem-max-allocated-bytes")  # megatron_jrt/metrics.py tags
# The console line of the same values (megatron_jrt/metrics.py), read only without TensorBoard.
CONSOLE_LINE = re.compile(r"^step (\d+)/\d+ \|.*\| step time ([\d.]+) ms \|.*"
                          r"\| MFU ([\d.]+%|n/a) \| mem ([\d.]+ GiB|n/a) \|", re.M)


def have_tensorboard() -> bool:
    from importlib.util import find_spec

    return find_spec("tensorboard") is not None


def read_scalars(run_dir: Path, log: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of SCALARS (absent tags: empty): from the run's TensorBoard events,
    or, where TensorBoard is not installed (runs then log none), from the console lines in `log`
    (the logging rank, which prints them, is the last rank, so they are not in train.log)."""
    if not (run_dir / "tensorboard").is_dir():
        return parse_console(log.read_text(errors="replace"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    present = set(acc.Tags().get("scalars", []))
    return {tag: ({e.step: e.value for e in acc.Scalars(tag)} if tag in present else {})
            for tag in SCALARS}


def parse_console(text: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {tag: {} for tag in SCALARS}
    for step, ms, mfu, mem in CONSOLE_LINE.findall(text):
        out["iteration-time"][int(step)] = float(ms) / 1e3
        if mfu != "n/a":
            out["mfu"][int(step)] = float(mfu[:-1]) / 100
        if mem != "n/a":
            out["mem-max-allocated-bytes"][int(step)] = float(mem.split()[0]) * 2**30
    return out


def step_metrics(run_dir: Path, log: Path, *, warmup: int, tokens_per_step: int,
                 gpus: int) -> dict:
    """Median of the steps after `warmup`: step time, tokens/s (job and per GPU), MFU; the
    peak memory over the run; the last loss."""
    scalars = read_scalars(run_dir, log)
    times = [v for s, v in scalars["iteration-time"].items() if s > warmup]
    if not times:
        raise RunFailed(f"error: no step times after the warm-up ({warmup}) in {run_dir}")
    step = statistics.median(times)
    mfu = [v for s, v in scalars["mfu"].items() if s > warmup]
    memory = scalars["mem-max-allocated-bytes"]
    losses = read_losses(run_dir)
    return dict(step_ms=step * 1e3, tokens_per_s=tokens_per_step / step,
                tokens_per_s_per_gpu=tokens_per_step / step / gpus,
                mfu=statistics.median(mfu) if mfu else None,
                memory_gib=max(memory.values()) / 2**30 if memory else None,
                final_loss=losses[max(losses)] if losses else None, timed_steps=len(times))


# ---- the parts ---------------------------------------------------------------------------------

class Suite:
    def __init__(self, args, env: dict[str, str], device: dict):
        self.args, self.env, self.device = args, env, device
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="jrt-scaling-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.results: dict[str, list] = {part: [] for part in args.parts}

    # budget
    def deadline(self) -> float:
        end = self.start + self.args.max_minutes * 60
        return min(end, time.monotonic() + self.args.run_timeout)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.start + self.args.max_minutes * 60

    def add(self, part: str, row) -> None:
        self.results[part].append(row)
        if self.args.json:
            self.write_json()

    def write_json(self) -> None:
        device = self.device
        body = {"device": (f"{device['gpus']} x {device['name']}" if device["gpus"] else "CPU"),
                "torch": device["torch"], "command": sys.argv,
                "work_dir": str(self.work), "settings": {k: v for k, v in vars(self.args).items()
                                                          if k not in ("json",)},
                **{part: [dataclasses.asdict(r) for r in rows]
                   for part, rows in self.results.items()}}
        path = Path(self.args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(body, indent=1, default=dataclasses.asdict))
        os.replace(tmp, path)

    # one throughput row (weak and layouts)
    def measure(self, row: Row, name: str, extra: list[str]) -> Row:
        args = self.args
        run_dir = self.work / name
        sets = run_sets(args, run_dir=run_dir, seq_length=row.seq_length,
                        micro_batch=row.micro_batch, global_batch=row.global_batch,
                        steps=args.warmup + args.steps,
                        extra=[*Layout(row.gpus, row.tp, row.pp).sets(), *extra])
        if self.out_of_time():
            row.status = "skipped: over --max-minutes"
            return row
        problem = check_config(row.preset, sets, row.gpus)
        if problem:
            row.status = f"skipped: {problem}"
            return row
        shutil.rmtree(run_dir, ignore_errors=True)
        launch = Launch(row.gpus, row.preset, sets, run_dir, run_dir.with_suffix(".log"),
                        self.deadline(), self.env)
        row.log = str(launch.log)
        try:
            exit_status(run_dir, launch.wait())
            for key, value in step_metrics(run_dir, launch.log, warmup=args.warmup,
                                           tokens_per_step=row.global_batch * row.seq_length,
                                           gpus=row.gpus).items():
                setattr(row, key, value)
        except RunFailed as failed:
            row.status = str(failed)
        return row

    def weak(self) -> None:
        args = self.args
        print(f"\n== weak: {args.weak_preset}, data parallel, micro batch {args.weak_micro_batch}"
              f" x {args.seq_length} per GPU, distributed optimizer, overlapped grad reduce; "
              f"median of {args.steps} steps after {args.warmup}\n{WEAK_HEADER}", flush=True)
        base = None
        for gpus in args.gpus:
            row = Row("weak", args.weak_preset, "dp", gpus, 1, 1, gpus, args.seq_length,
                      args.weak_micro_batch, args.weak_micro_batch * gpus)
            self.measure(row, f"weak-{gpus}gpu", DISTRIBUTED_OPTIMIZER)
            if gpus == 1 and row.status == "ok":
                base = row.tokens_per_s_per_gpu
            if base and row.status == "ok":
                row.efficiency = row.tokens_per_s_per_gpu / base
            self.add("weak", row)
            print(format_weak(row), flush=True)
            print_log_on_failure(row)

    def layouts(self) -> None:
        args = self.args
        gpus = args.layouts_gpus
        batch = args.layouts_batch_per_gpu * gpus
        print(f"\n== layouts: {args.layouts_preset} on {gpus} GPUs, global batch {batch} x "
              f"{args.seq_length} (micro batch {args.layouts_micro_batch}), distributed "
              f"optimizer; median of {args.steps} steps after {args.warmup}\n{LAYOUT_HEADER}",
              flush=True)
        for name in args.layouts:
            tp, pp = parse_layout(name)
            row = Row("layouts", args.layouts_preset, name, gpus, tp, pp,
                      gpus // (tp * pp) if gpus % (tp * pp) == 0 else 0, args.seq_length,
                      args.layouts_micro_batch, batch)
            if gpus % (tp * pp):
                row.status = (f"skipped: TP x PP = {tp * pp} does not divide {gpus} GPUs")
            else:
                self.measure(row, f"layouts-{name}-{gpus}gpu", DISTRIBUTED_OPTIMIZER)
            self.add("layouts", row)
            print(format_layout(row), flush=True)
            print_log_on_failure(row)

    def resume(self) -> None:
        args = self.args
        source = args.resume_from
        steps, micro = args.resume_steps, args.resume_micro_batch
        batch = micro * source.dp
        print(f"\n== resume: {args.resume_preset}, {steps} steps, global batch {batch} x "
              f"{args.seq_length} (micro batch {micro}); uninterrupted on {source.describe}; "
              f"stopped by SIGUSR1 after step {args.resume_stop_step}, resumed on each of "
              f"{', '.join(t.describe for t in args.resume_to)}",
              flush=True)
        common = dict(seq_length=args.seq_length, micro_batch=micro, global_batch=batch,
                      steps=steps)
        # The same LR schedule in every run: warm-up 2, cosine over `steps`.
        schedule = ["optimizer.warmup_steps=2", f"optimizer.decay_steps={steps}"]
        ref_dir = self.work / "resume-uninterrupted"
        ref_sets = run_sets(args, run_dir=ref_dir, extra=[*source.sets(), *schedule], **common)
        reference, ref_error = None, None
        for target in args.resume_to:
            row = ResumeRow(args.resume_preset, source.describe, target.describe, steps)
            tag = f"resume-{source.tag}-to-{target.tag}"
            try:
                if self.out_of_time():
                    raise RunFailed("skipped: over --max-minutes")
                if reference is None and ref_error is None:
                    try:
                        reference = self.resume_reference(ref_dir, ref_sets, source)
                    except RunFailed as failed_ref:
                        ref_error = str(failed_ref)
                        if not ref_error.startswith("skipped"):
                            ref_error = f"error in the uninterrupted run: {ref_error}"
                row.log = str(ref_dir.with_suffix(".log"))
                if ref_error:
                    raise RunFailed(ref_error)
                self.resume_row(row, tag, source, target, common, schedule, reference)
            except RunFailed as failed_row:
                row.status = str(failed_row)
            self.add("resume", row)
            print(format_resume(row), flush=True)
            print_log_on_failure(row)

    def resume_reference(self, run_dir: Path, sets: list[str], source: Layout) -> dict:
        problem = check_config(self.args.resume_preset, sets, source.gpus)
        if problem:
            raise RunFailed(f"skipped: {problem}")
        shutil.rmtree(run_dir, ignore_errors=True)
        launch = Launch(source.gpus, self.args.resume_preset, sets, run_dir,
                        run_dir.with_suffix(".log"), self.deadline(), self.env)
        exit_status(run_dir, launch.wait())
        return read_losses(run_dir)

    def resume_row(self, row: ResumeRow, tag: str, source: Layout, target: Layout,
                   common: dict, schedule: list[str], reference: dict) -> None:
        args = self.args
        run_dir, save_dir = self.work / tag, self.work / f"{tag}-ckpt"
        ckpt = [f"checkpoint.save_dir={save_dir}", f"checkpoint.save_interval={10**9}"]
        stop_sets = run_sets(args, run_dir=run_dir, extra=[*source.sets(), *schedule, *ckpt],
                             **common)
        resume_sets = run_sets(args, run_dir=run_dir, extra=[
            *target.sets(), *schedule, *ckpt, "checkpoint.resume=auto"], **common)
        for sets, gpus in ((stop_sets, source.gpus), (resume_sets, target.gpus)):
            problem = check_config(args.resume_preset, sets, gpus)
            if problem:
                raise RunFailed(f"skipped: {problem}")
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(save_dir, ignore_errors=True)
        try:
            # 1. on the source layout until step k, then SIGUSR1: checkpoint, exit 10
            launch = Launch(source.gpus, args.resume_preset, stop_sets, run_dir,
                            self.work / f"{tag}-stopped.log", self.deadline(), self.env)
            row.log = str(launch.log)
            while launch.proc.poll() is None:
                if time.monotonic() > launch.deadline:
                    break  # launch.wait() kills it and says so
                if len(read_losses(run_dir)) >= args.resume_stop_step:
                    launch.signal_workers(signal.SIGUSR1)
                    break
                time.sleep(0.02)
            rc = launch.wait()
            try:
                exit_status(run_dir, rc)
            except RunFailed:
                exit_status(run_dir, rc, expected=STOPPED)
            else:
                raise RunFailed("error: the run finished before the stop signal reached it; "
                                "raise --resume-steps")
            row.stop_step = int((save_dir / "latest").read_text().strip().split("_")[-1])
            if row.stop_step >= row.steps:
                raise RunFailed(f"error: stopped at the last step ({row.stop_step}), nothing to "
                                "resume; raise --resume-steps")
            # 2. resumed on the target layout, same save_dir and run dir, to the end
            launch = Launch(target.gpus, args.resume_preset, resume_sets, run_dir,
                            self.work / f"{tag}-resumed.log", self.deadline(), self.env)
            row.log = str(launch.log)
            exit_status(run_dir, launch.wait())
        finally:
            shutil.rmtree(save_dir, ignore_errors=True)  # 5 GB at 360M
        resumed = read_losses(run_dir)
        if sorted(resumed) != sorted(reference) or len(reference) != row.steps:
            raise RunFailed(f"error: steps logged: uninterrupted {len(reference)}, "
                            f"stopped + resumed {len(resumed)} (of {row.steps})")
        row.losses_uninterrupted, row.losses_resumed = reference, resumed
        row.max_rel_gap = max_rel_gap(reference, resumed, range(row.stop_step + 1, row.steps + 1))
        row.max_rel_gap_before = max_rel_gap(reference, resumed, range(1, row.stop_step + 1))
        row.plot = self.plot(row, tag)

    def plot(self, row: ResumeRow, tag: str) -> str | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("  plot: skipped (matplotlib is not installed: pip install -e \".[evals]\")",
                  flush=True)
            return None
        folder = Path(self.args.json).parent if self.args.json else self.work
        path = folder / f"{tag}.png"
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
        steps = sorted(row.losses_uninterrupted)
        top.plot(steps, [row.losses_uninterrupted[s] for s in steps], "-o", ms=3,
                 label=f"uninterrupted, {row.uninterrupted}")
        top.plot(steps, [row.losses_resumed[s] for s in steps], "--x", ms=4,
                 label=f"stopped at {row.stop_step}, resumed on {row.resumed_on}")
        bottom.plot(steps, [abs(row.losses_resumed[s] - row.losses_uninterrupted[s])
                            / abs(row.losses_uninterrupted[s]) for s in steps], "-o", ms=3)
        for axis in (top, bottom):
            axis.axvline(row.stop_step + 0.5, color="grey", lw=0.8, ls=":")
        top.set_ylabel("loss (lm + 0.25 mlm)")
        top.set_title(f"{row.preset}: resume onto another layout")
        top.legend()
        bottom.set_ylabel("relative gap")
        bottom.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return str(path)


def max_rel_gap(reference: dict[int, float], other: dict[int, float], steps) -> float | None:
    gaps = [abs(other[s] - reference[s]) / abs(reference[s]) for s in steps]
    return max(gaps) if gaps else None


# ---- printing --------------------------------------------------------------------------------

def _show(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


WEAK_HEADER = (f"{'GPUs':>5}{'batch':>7}{'step ms':>10}{'tokens/s':>12}{'per GPU':>11}"
               f"{'eff.':>7}{'MFU':>7}{'mem GiB':>9}  status")
LAYOUT_HEADER = (f"{'layout':<8}{'TP':>3}{'PP':>3}{'DP':>3}{'step ms':>10}{'tokens/s':>12}"
                 f"{'per GPU':>11}{'MFU':>7}{'mem GiB':>9}  status")


def format_weak(row: Row) -> str:
    return (f"{row.gpus:>5}{row.global_batch:>7}{_show(row.step_ms, '.1f'):>10}"
            f"{_show(row.tokens_per_s, ',.0f'):>12}{_show(row.tokens_per_s_per_gpu, ',.0f'):>11}"
            f"{_show(row.efficiency, '.1%'):>7}{_show(row.mfu, '.1%'):>7}"
            f"{_show(row.memory_gib, '.1f'):>9}  {row.status}")


def format_layout(row: Row) -> str:
    return (f"{row.layout:<8}{row.tp:>3}{row.pp:>3}{row.dp:>3}{_show(row.step_ms, '.1f'):>10}"
            f"{_show(row.tokens_per_s, ',.0f'):>12}{_show(row.tokens_per_s_per_gpu, ',.0f'):>11}"
            f"{_show(row.mfu, '.1%'):>7}{_show(row.memory_gib, '.1f'):>9}  {row.status}")


def format_resume(row: ResumeRow) -> str:
    if row.status != "ok":
        return f"{row.uninterrupted} -> {row.resumed_on}: {row.status}"
    lines = [f"{row.uninterrupted} -> stopped at step {row.stop_step} -> resumed on "
             f"{row.resumed_on}: max relative gap {row.max_rel_gap:.2e} over steps "
             f"{row.stop_step + 1}-{row.steps} ({row.max_rel_gap_before:.1e} before)",
             f"{'step':>6}{'uninterrupted':>15}{'resumed':>12}{'rel. gap':>10}"]
    for step in sorted(row.losses_uninterrupted):
        a, b = row.losses_uninterrupted[step], row.losses_resumed[step]
        mark = "  <- resumed" if step == row.stop_step + 1 else ""
        lines.append(f"{step:>6}{a:>15.5f}{b:>12.5f}{abs(b - a) / abs(a):>10.1e}{mark}")
    if row.plot:
        lines.append(f"plot: {row.plot}")
    return "\n".join(lines)


def print_log_on_failure(row: Row | ResumeRow) -> None:
    if not (row.status == "ok" or row.status.startswith("skipped")) and row.log:
        print(f"  log: {row.log}", flush=True)


# ---- arguments -------------------------------------------------------------------------------

def parse_layout(name: str) -> tuple[int, int]:
    """"dp" -> (1, 1); "tp2" -> (2, 1); "pp2" -> (1, 2); "tp2pp2" -> (2, 2)."""
    match = re.fullmatch(r"dp|(?:tp(\d+))?(?:pp(\d+))?", name)
    if not match or not name:
        raise SystemExit(f"--layouts: {name!r} is not dp, tpT, ppP or tpTppP")
    return int(match.group(1) or 1), int(match.group(2) or 1)


def parse_target(text: str) -> Layout:
    """"2:tp2" -> 2 GPUs at TP=2 (DP fills the rest); "1" -> 1 GPU."""
    gpus, _, layout = text.partition(":")
    tp, pp = parse_layout(layout or "dp")
    if not gpus.isdigit() or int(gpus) % (tp * pp):
        raise SystemExit(f"resume layout {text!r}: give GPUS:LAYOUT with TP x PP dividing GPUS")
    return Layout(int(gpus), tp, pp)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="weak,layouts,resume",
                        help="comma list of weak, layouts, resume")
    parser.add_argument("--gpus", default=None,
                        help="GPU counts for weak scaling (default 1,2; --tiny: processes 1,2)")
    parser.add_argument("--tiny", action="store_true",
                        help="jrt-tiny on CPU (gloo), 1 and 2 processes: a smoke run, about a "
                             "minute")
    g = parser.add_argument_group("sizes (defaults: GPU / --tiny)")
    for key in GPU:
        flag = "--" + key.replace("_", "-")
        g.add_argument(flag, type=str if key.endswith("preset") else int,
                       help=f"default {GPU[key]} / {TINY[key]}")
    parser.add_argument("--layouts", default="dp,tp2,pp2,tp2pp2",
                        help="dp, tpT, ppP, tpTppP; data parallel fills the rest")
    parser.add_argument("--layouts-gpus", type=int, help="default: the largest of --gpus")
    parser.add_argument("--resume-from", help="GPUS:LAYOUT of the uninterrupted and the stopped "
                                              "run (default <largest of --gpus>:dp)")
    parser.add_argument("--resume-to", default="1:dp",
                        help="comma list of GPUS:LAYOUT to resume on, one row each")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="passed to every run (after this script's own), repeatable")
    parser.add_argument("--work-dir", help="run dirs and console logs (default: a new temp dir)")
    parser.add_argument("--json", help="results, rewritten after every row")
    parser.add_argument("--max-minutes", type=float, default=9.0,
                        help="rows that would start later are skipped; runs are killed at it")
    parser.add_argument("--run-timeout", type=float, default=300,
                        help="seconds one run may take before it is killed")
    args = parser.parse_args(argv)
    defaults = TINY if args.tiny else GPU
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = set(args.parts) - {"weak", "layouts", "resume"}
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; "
                         "use weak, layouts, resume")
    args.gpus = sorted({int(x) for x in (args.gpus or "1,2").split(",")})
    args.layouts = [x for x in args.layouts.split(",") if x]
    for name in args.layouts:
        parse_layout(name)
    args.layouts_gpus = args.layouts_gpus or max(args.gpus)
    args.resume_from = parse_target(args.resume_from or f"{max(args.gpus)}:dp")
    args.resume_to = [parse_target(x) for x in args.resume_to.split(",") if x]
    if not 0 < args.resume_stop_step < args.resume_steps:
        raise SystemExit("--resume-stop-step: must be in 1 .. --resume-steps - 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if str(REPO) not in sys.path:  # megatron_jrt's config checks, also without an install
        sys.path.insert(1, str(REPO))
    env = child_env(cpu=args.tiny)
    device = probe_device(env)
    cuda = device["gpus"]
    needed = max([*args.gpus, args.layouts_gpus, args.resume_from.gpus,
                  *(t.gpus for t in args.resume_to)])
    if cuda and needed > cuda:
        print(f"warning: up to {needed} GPUs asked for, {cuda} visible: those rows will fail",
              flush=True)
    if not cuda and not args.tiny:
        print("warning: no CUDA device; the GPU sizes on CPU take very long (use --tiny)",
              flush=True)
    suite = Suite(args, env, device)
    where = f"{cuda} x {device['name']} (nccl, bf16)" if cuda else "CPU (gloo, fp32)"
    print(f"{where}, torch {device['torch']}; work dir {suite.work}; trainer environment "
          f"defaults from {LAUNCHER.relative_to(REPO)}: "
          + " ".join(f"{k}={v}" for k, v in launcher_env_defaults().items()), flush=True)
    for part in ("weak", "layouts", "resume"):
        if part in args.parts:
            getattr(suite, part)()
    if args.json:
        suite.write_json()
        print(f"\njson: {args.json}")
    minutes = (time.monotonic() - suite.start) / 60
    rows = [row for part in suite.results.values() for row in part]
    bad = [row for row in rows if row.status != "ok" and not row.status.startswith("skipped")]
    print(f"{len(rows)} rows in {minutes:.1f} min: {len(rows) - len(bad)} ok or skipped, "
          f"{len(bad)} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
