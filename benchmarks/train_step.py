"""Training-step throughput of JRT-RNN through the real `jrt-train` step, on mock tokens.

    python benchmarks/train_step.py --preset jrt-360m --micro-batch 8 --steps 12

Runs `megatron_jrt.train.train` (megatron-core DDP + distributed optimizer, bf16 on GPU, fp32
on CPU) twice in one process: with the PLA kernel the dispatcher picks (Triton on CUDA), and
with the PyTorch reference PLA as the baseline, and prints step time, tokens/s, TFLOP/s, MFU,
peak memory and the speed-up over the baseline. The first `--warmup` steps are not timed.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile

import torch


def _run(args, tmp: str, variant: str) -> dict:
    import megatron_jrt.mixers.pla as pla_mixer
    from kernels.pla import prefix_linear_attention
    from kernels.pla.reference import pla_reference
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.flops import flops_per_token, peak_flops_per_device
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    pla_mixer.prefix_linear_attention = (pla_reference if variant == "reference"
                                         else prefix_linear_attention)
    steps = args.warmup + args.steps
    cfg = load_config(None, [
        f"model.preset={args.preset}", "data.mock_data=true", "data.mock_vocab_size=50263",
        f"data.seq_length={args.seq_length}", f"data.micro_batch_size={args.micro_batch}",
        f"data.global_batch_size={args.micro_batch}", "data.num_workers=0",
        f"training.train_steps={steps}", "training.eval_steps=0", f"training.log_interval={steps}",
        "optimizer.warmup_steps=1", f"training.recompute={args.recompute}",
        f"logging.run_dir={tmp}/{variant}", "logging.tensorboard=false",
        "logging.progress_bar=false"])
    init_distributed(seed=cfg.training.seed)  # both variants start from the same weights
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.profile and variant == "dispatch":
        result = _profiled(train, cfg)
    else:
        result = train(cfg)
    step_time = statistics.median(result.step_times[args.warmup:])
    tokens_per_s = args.micro_batch * args.seq_length / step_time
    model_flops = flops_per_token(cfg.model_config(), args.seq_length) * tokens_per_s
    peak = peak_flops_per_device("bf16" if torch.cuda.is_available() else "fp32")
    return dict(variant=variant, step_ms=step_time * 1e3, tokens_per_s=tokens_per_s,
                tflops=model_flops / 1e12, mfu=None if peak is None else model_flops / peak,
                memory_gib=(torch.cuda.max_memory_allocated() / 2**30
                            if torch.cuda.is_available() else None),
                loss=result.losses[-1])


def _profiled(train, cfg):
    """Run `train(cfg)` under torch.profiler and print the most expensive device kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    with profile(activities=activities) as prof:
        result = train(cfg)
    sort_by = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))
    return result


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
