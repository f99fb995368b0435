"""Training-step throughput of JRT-RNN through the real `jrt-train` step, on mock tokens.

    python benchmarks/train_step.py --preset jrt-360m --micro-batch 8 --steps 12

Runs `megatron_jrt.train.train` (megatron-core DDP + distributed optimizer, bf16 on GPU, fp32
on CPU) twice in one process: with the PLA kernel the dispatcher picks (Triton on CUDA), and
with the PyTorch reference PLA as the baseline, and prints step time, tokens/s, TFLOP/s, MFU,
peak memory and the speed-up over the baseline. The first `--warmup` steps are not timed.
"""
from __future__ import annotations

import argparse
import tempfile

import torch


def _run(args, tmp: str, variant: str) -> dict:
    import megatron_jrt.mixers.pla as pla_mixer
    from kernels.pla import prefix_linear_attention
    from kernels.pla.reference import pla_reference
    from train_throughput import measure_stack  # a sibling: benchmarks/ is on sys.path

    pla_mixer.prefix_linear_attention = (pla_reference if variant == "reference"
                                         else prefix_linear_attention)
    measured = measure_stack(
        args.preset, seq_length=args.seq_length, batch=args.micro_batch,
        micro_batch=args.micro_batch, steps=args.steps, warmup=args.warmup,
        run_dir=f"{tmp}/{variant}", overrides=[f"training.recompute={args.recompute}", *args.set],
        profile=args.profile and variant == "dispatch")
    return dict(measured, variant=variant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="jrt-360m")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--recompute", default="null", choices=["null", "full"])
    parser.add_argument("--profile", action="store_true",
                        help="print the top device kernels of the dispatcher run (torch.profiler)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a jrt-train config override for both runs, e.g. "
                             "training.compile=true; repeatable")
    args = parser.parse_args()

    from megatron_jrt.distributed import destroy_distributed

    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [_run(args, tmp, variant) for variant in ("dispatch", "reference")]
    finally:
        destroy_distributed()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{args.preset}, micro batch {args.micro_batch} x {args.seq_length} tokens, "
          f"recompute {args.recompute}, {device}")
    print(f"{'PLA kernel':<12}{'step ms':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
          f"{'mem GiB':>9}{'speed-up':>10}{'last loss':>11}")
    baseline = rows[-1]["step_ms"]
    for row in rows:
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
        memory = "n/a" if row["memory_gib"] is None else f"{row['memory_gib']:.1f}"
        print(f"{row['variant']:<12}{row['step_ms']:>10.1f}{row['tokens_per_s']:>12,.0f}"
              f"{row['tflops']:>10.1f}{mfu:>8}{memory:>9}{baseline / row['step_ms']:>9.2f}x"
              f"{row['loss']:>11.4f}")


if __name__ == "__main__":
    main()
