"""Training and validation metrics: one console line per log interval, and TensorBoard scalars.

Tag names follow Megatron-LM's `training_log` / `evaluate_and_print_results` where it has one,
so dashboards and scripts written for Megatron runs read ours. Every scalar is written twice,
as Megatron does for its main tags: `TAG` against the step and `TAG vs samples` against the
consumed training samples.

| tag                           | value                                                  | origin    |
|-------------------------------|--------------------------------------------------------|-----------|
| `lm loss`                     | NTP cross entropy (positions M..L-1), interval mean     | Megatron  |
| `mlm loss`                    | MLM cross entropy (masked prefix positions)             | ours      |
| `loss`                        | lm loss + 0.25 * mlm loss (the optimised objective)     | ours      |
| `learning-rate`               | learning rate at the logged step                        | Megatron  |
| `grad-norm`                   | global grad norm before clipping (absent when None)     | Megatron  |
| `batch-size`                  | samples per optimizer step (global batch)               | Megatron  |
| `iteration-time`              | seconds per step, averaged over the interval            | Megatron  |
| `throughput`                  | model TFLOP/s per device (`flops.py`)                   | Megatron  |
| `tokens-per-sec`              | tokens per second, whole job                            | ours      |
| `mfu`                         | model FLOPs utilisation, 0..1 (absent without a peak)   | ours      |
| `consumed-tokens`             | training tokens consumed so far                         | ours      |
| `mem-max-allocated-bytes`     | peak allocated device memory (absent on CPU)            | Megatron  |
| `skipped-iterations`          | steps skipped so far (non-finite grads)                 | ours      |
| `nonfinite-iterations`        | steps with a non-finite loss or grad so far             | ours      |
| `<key> validation`            | each validation loss (`lm loss`, `mlm loss`, `loss`)    | Megatron  |
| `lm loss validation ppl`      | exp(validation lm loss)                                 | Megatron  |

Only the rank built with `enabled=True` writes or prints; the others are no-ops.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

LOSS_KEYS = ("lm loss", "mlm loss", "loss")
VS_SAMPLES = " vs samples"
GIB = float(1 << 30)


def _fmt_loss(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


class MetricsLogger:
    """Console line + TensorBoard scalars for the training loop (see the module docstring)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool,
                 flops_per_token: float, peak_flops: float | None, world_size: int,
                 progress_total: int | None, progress_bar: bool):
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.progress_total = progress_total
        self.writer = None
        self.bar = None
        self._last: tuple[int, int] | None = None  # (step, consumed_samples) of the last log
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if progress_bar and progress_total is not None and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=progress_total, unit="step", dynamic_ncols=True)

    # -- output helpers ---------------------------------------------------------------------
    def _scalar(self, tag: str, value: float | None, step: int, samples: int) -> None:
        if self.writer is None or value is None:
            return
        self.writer.add_scalar(tag, value, step)
        self.writer.add_scalar(tag + VS_SAMPLES, value, samples)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    # -- public API -------------------------------------------------------------------------
    def log_train(self, *, step: int, consumed_samples: int, consumed_tokens: int,
                  losses: dict[str, float], lr: float, grad_norm: float | None, step_time: float,
                  tokens_per_step: int, skipped_steps: int, nonfinite_steps: int,
                  max_memory_bytes: int | None) -> str:
        """Print and record one training interval; return the console line ("" when disabled)."""
        if not self.enabled:
            return ""
        tokens_per_sec = tokens_per_step / step_time if step_time > 0 else 0.0
        flops_per_sec = self.flops_per_token * tokens_per_sec / self.world_size
        tflops = flops_per_sec / 1e12
        mfu = flops_per_sec / self.peak_flops if self.peak_flops else None
        if self._last is not None and step > self._last[0]:
            batch = (consumed_samples - self._last[1]) / (step - self._last[0])
        else:
            batch = consumed_samples / step if step > 0 else None
        self._last = (step, consumed_samples)

        total = f"/{self.progress_total}" if self.progress_total is not None else ""
        parts = [
            f"step {step}{total}",
            f"tokens {_fmt_count(consumed_tokens)}",
            f"loss {_fmt_loss(losses.get('loss'))}",
            f"lm loss {_fmt_loss(losses.get('lm loss'))}",
            f"mlm loss {_fmt_loss(losses.get('mlm loss'))}",
            f"lr {lr:.3E}",
            f"grad norm {'n/a' if grad_norm is None else f'{grad_norm:.3f}'}",
            f"step time {step_time * 1000:.1f} ms",
            f"tokens/s {tokens_per_sec:,.0f}",
            f"TFLOP/s/device {tflops:.1f}",
            f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}",
            f"mem {'n/a' if max_memory_bytes is None else f'{max_memory_bytes / GIB:.2f} GiB'}",
            f"skipped {skipped_steps}",
            f"nonfinite {nonfinite_steps}",
        ]
        line = " | ".join(parts)
        self._print(line)
        if self.bar is not None:
            self.bar.update(max(0, step - self.bar.n))
            self.bar.set_postfix(loss=_fmt_loss(losses.get("loss")), refresh=False)

        s = consumed_samples
        for key, value in losses.items():
            self._scalar(key, value, step, s)
        self._scalar("learning-rate", lr, step, s)
        self._scalar("grad-norm", grad_norm, step, s)
        self._scalar("batch-size", batch, step, s)
        self._scalar("iteration-time", step_time, step, s)
        self._scalar("throughput", tflops, step, s)
        self._scalar("tokens-per-sec", tokens_per_sec, step, s)
        self._scalar("mfu", mfu, step, s)
        self._scalar("consumed-tokens", consumed_tokens, step, s)
        self._scalar("mem-max-allocated-bytes", max_memory_bytes, step, s)
        self._scalar("skipped-iterations", skipped_steps, step, s)
        self._scalar("nonfinite-iterations", nonfinite_steps, step, s)
        if self.writer is not None:
            self.writer.flush()
        return line

    def log_validation(self, *, step: int, consumed_samples: int,
                       losses: dict[str, float]) -> str:
        """Print and record validation losses and lm perplexity; return the console line."""
        if not self.enabled:
            return ""
        parts = [f"validation at step {step}"]
        for key, value in losses.items():
            parts.append(f"{key} {_fmt_loss(value)}")
            self._scalar(f"{key} validation", value, step, consumed_samples)
        if "lm loss" in losses:
            ppl = perplexity(losses["lm loss"])
            parts.append(f"lm loss ppl {ppl:.3f}")
            self._scalar("lm loss validation ppl", ppl, step, consumed_samples)
        line = " | ".join(parts)
        rule = "-" * len(line)
        self._print(f"{rule}\n{line}\n{rule}")
        if self.writer is not None:
            self.writer.flush()
        return line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


__all__ = ["MetricsLogger", "LOSS_KEYS", "perplexity"]
