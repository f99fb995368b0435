"""What may change when a run resumes, and what happens when it does (docs/CHECKPOINTS.md).

- The model (architecture and the tokenizer's vocabulary) must match: `load_checkpoint`
  refuses a checkpoint of another model, naming the fields.
- The parallel layout may change: model and optimizer are resharded (a warning says so).
- Everything else in the config may change and **the config wins** from the resume step:
  the LR schedule (lr, min_lr, warmup, decay steps and style, so "resume and train longer"
  re-plans the decay), Adam's betas and eps, weight decay, clipping, the global batch size
  (consumed samples and tokens are counters in the checkpoint, so they stay right). One
  line lists every value that differs from the checkpoint's config and the lr it now uses.
- What the data reader cannot continue with (another micro batch or sequence length for the
  shard reader) is refused by the reader with a message naming the key.
"""
from __future__ import annotations

from typing import Any

from megatron_jrt.checkpoint import CheckpointState


def _flat(prefix: str, value: Any, out: dict) -> dict:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """`key: old -> new` for every run-config value that differs (checkpoint.resume aside)."""
    old, new = _flat("", saved, {}), _flat("", current, {})
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if key != "checkpoint.resume" and old.get(key) != new.get(key)]


def apply_optimizer_config(optimizer, scheduler, opt) -> None:
    """Put the config's optimizer values (`optimizer` section) into what a checkpoint restored.

    The restored parameter groups carry the old run's peak and minimum lr (megatron's
    scheduler reads them per group), Adam betas and eps; the scheduler keeps only its
    position and then recomputes lr and weight decay from the config's values.
    """
    for group in optimizer.param_groups:
        group["betas"] = (opt.adam_beta1, opt.adam_beta2)
        group["eps"] = opt.adam_eps
        if "max_lr" in group:
            group["max_lr"], group["min_lr"] = opt.lr, opt.min_lr
    scheduler.step(increment=0)


def resume_notice(resumed: CheckpointState, current_config: dict, lr_now: float) -> str | None:
    """One line naming what the config changed against the checkpoint's, or None."""
    changes = config_changes(resumed.config.get("train", {}), current_config)
    if not changes:
        return None
    return (f"resume: the config differs from the checkpoint's and wins from step "
            f"{resumed.step}: " + "; ".join(changes) + f" (lr now {lr_now:.3E})")


def restore_data_position(source, resumed: CheckpointState, dp_world: int) -> str | None:
    """Continue the training stream where the checkpoint left it; a warning if it cannot exactly.

    Same data-parallel size: each rank reloads its own reader state (exact). A different
    size cannot map reader states 1:1: mock data is positioned by the consumed samples
    (exact, mock windows are layout-independent); the shard reader restarts at the epoch
    position those samples correspond to, and the sample order changes (warned).
    """
    from megatron_jrt.data import MockTokens

    if resumed.data_state is not None:
        source.load_state_dict(resumed.data_state)
        return None
    if isinstance(source, MockTokens):
        source.load_state_dict({"consumed_samples": resumed.consumed_samples, "offset": 0})
        return None
    per_rank = resumed.consumed_samples // dp_world
    state = source.state_dict()
    batches = per_rank // state["micro_batch_size"]
    epoch, position = divmod(batches, source.batches_per_epoch)
    source.load_state_dict({**state, "epoch": epoch, "position": position})
    return (f"data-parallel size changed ({resumed.layout['dp']} -> {dp_world}): the "
            f"shard reader restarts at epoch {epoch}, batch {position} (from "
            f"{resumed.consumed_samples} consumed samples); the sample order differs from an "
            "unchanged run, and samples near the switch may repeat or be skipped")
