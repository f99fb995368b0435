"""How long checkpoint saves stall training: synchronous vs background (`checkpoint.async_save`).

    torchrun --nproc-per-node 2 benchmarks/checkpoint_stall.py --preset jrt-360m --steps 40 \\
        --save-interval 10

Runs the real `jrt-train` path (megatron DDP + distributed optimizer, bf16 on GPU, fp32 on CPU,
mock tokens) twice in one process: saving synchronously, then in the background, every
`--save-interval` steps into `--save-dir` (which must be on the file system the runs would
use; it is emptied before and after). Per save it prints the stall that training sees (the
wall time from the start of the save's step to the start of the next step, minus the median of
that time over steps without a save or a publication), the saver's own split of it (capture:
state dicts, the distributed optimizer's gather over DP ranks, planning, the small files, and of
it the state dicts with the gather alone; copy:
device -> host and the start of the writer), the wait for a previous save, the write time
(synchronous: in the stall; background: from the copy to the step boundary that found every
rank done), the step it was published at and that step's excess (the publication's own
stall, when no save fell on that step). The overhead line charges every step's excess
over the median (the background writer's contention and the publications included) to the
saves. The final save of each run (after its last step) is not timed.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _run(args, mode: str) -> dict:
    import megatron_jrt.training.engines.megatron_engine as engine_module
    import megatron_jrt.training.step as step_module
    from megatron_jrt.distributed import init_distributed, read_launch_env
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    save_dir = Path(args.save_dir) / mode
    world = read_launch_env().world_size  # all data-parallel
    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.mock_data=true", "data.mock_vocab_size=50263",
        f"data.seq_length={args.seq_length}", f"data.micro_batch_size={args.micro_batch}",
        f"data.global_batch_size={args.micro_batch * world}", "data.num_workers=0",
        f"training.train_steps={args.steps}", "training.eval_steps=0",
        f"training.log_interval={args.steps}", "optimizer.warmup_steps=1",
        f"checkpoint.save_dir={save_dir}", f"checkpoint.save_interval={args.save_interval}",
        "checkpoint.keep_last=2", f"checkpoint.async_save={mode == 'async'}",
        f"logging.run_dir={save_dir}_run", "logging.tensorboard=false",
        "logging.progress_bar=false"])
    init_distributed(seed=cfg.training.seed)
    _remove(save_dir)

    starts: list[float] = []  # when each training step began (the saves lie between them)
    savers: list = []
    train_step = step_module.train_step

    def timed_train_step(*a, **k):
        starts.append(time.perf_counter())
        return train_step(*a, **k)

    class RecordingSaver(engine_module.CheckpointSaver):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            savers.append(self)

    step_module.train_step, saver_class = timed_train_step, engine_module.CheckpointSaver
    engine_module.CheckpointSaver = RecordingSaver
    try:
        train(cfg)
    finally:
        step_module.train_step, engine_module.CheckpointSaver = train_step, saver_class
    size = _checkpoint_size(save_dir)
    _remove(save_dir)
    _remove(Path(f"{save_dir}_run"))
    # intervals[s]: from the start of step s (1-based) to the start of step s + 1
    intervals = {s: starts[s] - starts[s - 1] for s in range(1, len(starts))}
    timings = [t for t in savers[0].timings if t.step < args.steps]
    busy = {t.step for t in timings} | {t.published_at_step for t in timings}
    quiet = [v for s, v in intervals.items() if s not in busy and s > args.warmup]
    median = statistics.median(quiet)
    measured = [v for s, v in intervals.items() if s > args.warmup]
    saves = {t.step for t in timings}
    return {"mode": mode, "median": median, "size": size, "timings": timings,
            "stalls": {t.step: intervals[t.step] - median for t in timings},
            # a background save's publication, when it fell on a step without a save
            "publications": {t.step: intervals[t.published_at_step] - median for t in timings
                             if t.background and t.published_at_step in intervals
                             and t.published_at_step not in saves},
            "overhead": (sum(measured) - median * len(measured))
            / max(1, len([t for t in timings if t.step > args.warmup]))}


def _checkpoint_size(save_dir: Path) -> int:
    from megatron_jrt.checkpoint import find_latest_complete, read_metadata

    if torch.distributed.get_rank() != 0:
        return 0
    latest, _ = find_latest_complete(save_dir)
    return sum(f["size"] for f in read_metadata(latest)["files"].values())


def _remove(folder: Path) -> None:
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    torch.distributed.barrier()


def _report(args, rows: list[dict]) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    world = torch.distributed.get_world_size()
    print(f"\n{args.preset}, DP={world}, distributed optimizer, micro batch {args.micro_batch} x "
          f"{args.seq_length} tokens, {device}, checkpoint {rows[0]['size'] / 1e9:.2f} GB, "
          f"save every {args.save_interval} steps into {args.save_dir}")
    print(f"{'mode':<7}{'step':>6}{'stall s':>9}{'capture s':>11}{'state dicts s':>15}"
          f"{'copy s':>8}{'waited s':>10}{'write s':>9}{'published':>11}{'its stall s':>13}")
    for row in rows:
        for t in row["timings"]:
            copy = f"{t.stall_s - t.capture_s:.2f}" if t.background else "-"
            publication = row["publications"].get(t.step)
            print(f"{row['mode']:<7}{t.step:>6}{row['stalls'][t.step]:>9.2f}{t.capture_s:>11.2f}"
                  f"{t.state_dict_s:>15.2f}{copy:>8}{t.waited_s:>10.2f}{t.write_s:>9.2f}"
                  f"{'step ' + str(t.published_at_step):>11}"
                  f"{'-' if publication is None else f'{publication:.2f}':>13}")
    for row in rows:
        timed = [v for s, v in row["stalls"].items() if s > args.warmup]
        worst = f"{max(timed):.2f} s" if timed else "n/a"
        print(f"{row['mode']}: median step {row['median']:.3f} s; stall per save after warm-up: "
              f"max {worst}; all excess step time per save {row['overhead']:.2f} s"
              + (" (target: stall <= 2 s)" if row["mode"] == "async" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="jrt-360m")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save-interval", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps (and their saves) left out of the summary line")
    parser.add_argument("--save-dir", default=str(Path(tempfile.gettempdir()) / "jrt-ckpt-stall"),
                        help="emptied before and after each run (shared by the ranks)")
    parser.add_argument("--modes", default="sync,async", help="comma-separated: sync, async")
    args = parser.parse_args()

    from megatron_jrt.distributed import destroy_distributed

    try:
        rows = [_run(args, mode) for mode in args.modes.split(",")]
        if torch.distributed.get_rank() == 0:
            _report(args, rows)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
