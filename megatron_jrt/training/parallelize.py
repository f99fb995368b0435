"""Data parallelism applied from outside the model: megatron-core's DDP wrapper.

Tensor and pipeline parallelism live in the model's layers and ``parallel_state``; this
module adds the data-parallel layer (and the fp16/bf16 wrapper) around each model chunk
and wires megatron's schedule hooks into the model config.
"""
from __future__ import annotations

from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.transformer.module import Float16Module


def wrap_with_ddp(
    model_chunks,
    transformer_config,
    *,
    use_distributed_optimizer: bool,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
) -> list[DistributedDataParallel]:
    """Wrap each chunk in megatron DDP (and ``Float16Module`` when the config is bf16/fp16).

    Gradients accumulate and are reduced in fp32 in DDP's contiguous buffers; with
    ``use_distributed_optimizer`` they are reduce-scattered and the optimizer state is
    sharded across data-parallel ranks. Data-parallel replicas must start equal: build
    them with the same seed (``init_distributed`` does) or call ``broadcast_params()``.

    Sets on ``transformer_config`` (which the schedules read through the wrapper):
    ``finalize_model_grads_func`` (DP grad reduction, tied-embedding sync across
    pipeline stages, per-token loss scaling) and, with ``overlap_grad_reduce``, the
    ``no_sync_func``/``grad_sync_func`` hooks, as Megatron-LM does.

    Buckets: without ``overlap_grad_reduce`` all gradients are reduced as one bucket after the
    last backward; with it, in buckets of ``bucket_size`` parameters (None: megatron's default,
    max(40M, 1M x data-parallel size)) started as soon as a bucket's gradients are ready. With
    one data-parallel rank there is nothing to overlap: the reduction is a single-rank
    collective, at most one pass over the gradient buffer.
    """
    chunks = list(model_chunks)
    if transformer_config.fp16 or transformer_config.bf16:
        chunks = [Float16Module(transformer_config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
    )
    wrapped = [
        DistributedDataParallel(
            transformer_config,
            ddp_config,
            chunk,
            # Only the first chunk is bucketed (Megatron-LM does the same for
            # interleaved pipelines: later chunks' grads are ready last anyway).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    transformer_config.finalize_model_grads_func = finalize_model_grads
    if overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        grad_sync = [chunk.start_grad_sync for chunk in wrapped]
        transformer_config.no_sync_func = no_sync[0] if len(wrapped) == 1 else no_sync
        transformer_config.grad_sync_func = grad_sync[0] if len(wrapped) == 1 else grad_sync
    return wrapped
