"""The model-agnostic training core: optimizer + LR schedule, DDP wrapping, one step.

The train loop calls, in order::

    chunks = wrap_with_ddp(model_chunks, config, use_distributed_optimizer=...)
    optimizer, scheduler = build_optimizer(chunks, lr=..., ...)
    result = train_step(forward_step, data_iterator, chunks, optimizer, scheduler, ...)

Any megatron-core model (``MegatronModule`` chunks) plugs in; the model supplies only
``forward_step`` (contract in ``megatron_jrt.training.step``).
"""
from megatron_jrt.training.optim import build_optimizer
from megatron_jrt.training.parallelize import wrap_with_ddp
from megatron_jrt.training.step import StepResult, eval_step, reduce_losses, train_step

__all__ = [
    "build_optimizer",
    "wrap_with_ddp",
    "train_step",
    "eval_step",
    "reduce_losses",
    "StepResult",
]
