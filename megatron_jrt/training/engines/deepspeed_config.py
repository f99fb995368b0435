"""The DeepSpeed JSON config of a run: generated from the run config, merged with the user's.

The run config stays the one source of truth for what both engines share (batch sizes,
clipping, precision) and for the ZeRO choices it exposes (`training.zero_stage`,
`training.offload`). A user file (`training.deepspeed_config`) may add any other DeepSpeed
setting (bucket sizes, overlap_comm, ...); a value it sets that the generated config sets
differently is a ConfigError naming both keys, never a silent override. `optimizer` and
`scheduler` sections are refused: the optimizer is the run's AdamW and the LR schedule is
megatron's, so that both engines follow the same curve.

No deepspeed import here: the config is checked before any model is built, also where the
package is missing. The engine settings alone are validated with the run config
(`megatron_jrt.train_config`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_jrt.config import ConfigError

# DeepSpeed key -> the run-config key that decides it (for conflict messages).
_OWNER = {
    "train_batch_size": "data.global_batch_size",
    "train_micro_batch_size_per_gpu": "data.micro_batch_size",
    "gradient_accumulation_steps": "data.global_batch_size / (data.micro_batch_size x DP)",
    "gradient_clipping": "optimizer.clip_grad",
    "bf16.enabled": "training.bf16",
    "zero_optimization.stage": "training.zero_stage",
    "zero_optimization.offload_optimizer.device": "training.offload",
    "zero_optimization.offload_param.device": "training.offload",
}
_REFUSED = {
    "optimizer": "the optimizer is the run's AdamW (the optimizer section)",
    "scheduler": "the LR schedule is megatron's (optimizer.warmup_steps, decay_steps, ...)",
    "fp16": "fp16 is not supported; use training.bf16",
}


def generated_config(cfg, *, dp_world: int, bf16: bool) -> dict:
    """The DeepSpeed config that trains like the megatron engine with `cfg`'s values.

    `bf16`: the precision the run really uses (CPU runs are fp32 whatever training.bf16 says).
    A client torch optimizer is used (no compiled DeepSpeed Adam op), also with offload
    (`zero_force_ds_cpu_optimizer: false`). `stage3_param_persistence_threshold: 0` keeps
    every parameter partitioned under ZeRO-3, the setting checked with the tied
    embedding/output weight.
    """
    data, training = cfg.data, cfg.training
    zero: dict[str, Any] = {"stage": training.zero_stage}
    if training.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if training.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    if training.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": data.global_batch_size,
        "train_micro_batch_size_per_gpu": data.micro_batch_size,
        "gradient_accumulation_steps": data.global_batch_size // (data.micro_batch_size * dp_world),
        "gradient_clipping": cfg.optimizer.clip_grad,  # DeepSpeed's default is 1.0, not ours
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # the AdamW subclass that can skip a step
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }


def read_user_config(path: str) -> dict:
    """training.deepspeed_config as a mapping; ConfigError naming the key when unusable."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"training.deepspeed_config: cannot read {path} ({exc.strerror})"
                          ) from None
    except ValueError as exc:
        raise ConfigError(f"training.deepspeed_config: {path} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"training.deepspeed_config: {path} must hold a JSON object")
    return raw


def merge_configs(generated: dict, user: dict, source: str = "training.deepspeed_config") -> dict:
    """`generated` with the user's settings added; ConfigError on any conflicting value."""
    for key, why in _REFUSED.items():
        if key in user and not (key == "fp16" and not _enabled(user[key])):
            raise ConfigError(f"{source}: sets {key!r}, which this trainer does not take from "
                              f"DeepSpeed: {why}; remove it")
    return _merge(generated, user, prefix="", source=source)


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def _merge(ours: dict, theirs: dict, *, prefix: str, source: str) -> dict:
    merged = dict(ours)
    for key, value in theirs.items():
        full = f"{prefix}{key}"
        if key not in ours:
            merged[key] = value
        elif isinstance(ours[key], dict) and isinstance(value, dict):
            merged[key] = _merge(ours[key], value, prefix=f"{full}.", source=source)
        elif ours[key] != value:
            owner = _OWNER.get(full, "the generated config")
            raise ConfigError(f"{source}: {full} = {value!r} conflicts with {owner} "
                              f"(which gives {full} = {ours[key]!r}); change one of the two")
    return merged


def deepspeed_config(cfg, *, dp_world: int, bf16: bool) -> dict:
    """The config `deepspeed.initialize` gets: generated, plus the user's file if any."""
    generated = generated_config(cfg, dp_world=dp_world, bf16=bf16)
    path = cfg.training.deepspeed_config
    return merge_configs(generated, read_user_config(path)) if path else generated
