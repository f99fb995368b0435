"""Training engines behind one seam (`base.Engine`): megatron-core's (the default) and
DeepSpeed's (`training.engine: deepspeed`, ZeRO 1/2/3, TP = PP = 1)."""
from __future__ import annotations

from typing import Callable

from megatron_jrt.training.engines.base import Engine, Saver


def build_engine(cfg, model, transformer_config, *, bf16: bool, dp_world: int,
                 num_microbatches: int, step_forward: Callable) -> Engine:
    """The engine `training.engine` names, wrapped around `model` (built, on its device).

    `step_forward(batches)`: megatron's forward_step of one step (the megatron engine's
    objective; the DeepSpeed engine computes the same one itself).
    """
    if cfg.training.engine == "deepspeed":
        from megatron_jrt.training.engines.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, bf16=bf16, dp_world=dp_world)
    from megatron_jrt.training.engines.megatron_engine import MegatronEngine

    return MegatronEngine(cfg, model, transformer_config, bf16=bf16,
                          num_microbatches=num_microbatches, step_forward=step_forward)


__all__ = ["Engine", "Saver", "build_engine"]
