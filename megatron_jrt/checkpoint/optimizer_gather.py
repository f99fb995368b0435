"""The distributed optimizer's state gathered over data-parallel ranks for a save, on the device.

A checkpoint stores the optimizer in megatron's ``fully_reshardable`` format, whose save
gathers every rank's shard of the fp32 weights and Adam moments
(``DistributedOptimizer.get_parameter_state_dp_zero``). megatron-core 0.16 does that through
host memory: each parameter's shard is copied to the host one at a time (a synchronising copy
each), the shards are moved back to the GPU for the all-gather, and the gathered buckets to
the host again, where they are concatenated. For jrt-360m over DP=2 that stalled training
12 s per save (docs/PERFORMANCE.md). Here the same tensors are built on the device with one
all-gather per bucket and state; the background writer's device -> host copy then moves only
the share this rank writes. When the device cannot hold the gathered state (12 bytes per
parameter on every rank), megatron's own gather runs instead.
"""
from __future__ import annotations

import contextlib
from functools import partial
from typing import Iterator

import torch

STATES = ("param", "exp_avg", "exp_avg_sq")  # what megatron's gather returns per buffer
HEADROOM = 1.25  # device memory wanted, as a multiple of the gathered state's size


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part for part in parts if isinstance(part, DistributedOptimizer)]


def gathered_parameter_state(optimizer, device: torch.device) -> dict:
    """What ``optimizer.get_parameter_state_dp_zero(return_on_all_ranks=True)`` returns (one
    DistributedOptimizer; collective over its data-parallel group), with the world tensors on
    `device`: per gradient buffer and dtype, the unpadded concatenation of every rank's shard
    of each state in STATES, and ``numel_unpadded``."""
    group = optimizer.data_parallel_group
    ranks = group.size()
    state: dict = {"buckets_coalesced": True}
    for buffer_index, ranges_by_dtype in enumerate(optimizer.gbuf_ranges):
        buffer = optimizer.buffers[buffer_index]
        by_dtype = {}
        for dtype, bucket_ranges in ranges_by_dtype.items():
            world = {key: torch.empty(buffer.numel_unpadded, dtype=torch.float32, device=device)
                     for key in STATES}
            offset = 0
            for bucket, ranges in zip(buffer.buckets, bucket_ranges):
                local_numel = bucket.grad_data.numel() // ranks
                local = torch.zeros(len(STATES), local_numel, dtype=torch.float32, device=device)
                for model_param, param_range in ranges["param_map"].items():
                    tensors = optimizer._get_main_param_and_optimizer_states(model_param)
                    span = slice(param_range["gbuf_local"].start, param_range["gbuf_local"].end)
                    for row, key in enumerate(STATES):
                        local[row, span].copy_(tensors[key].detach().reshape(-1))
                gathered = torch.empty(ranks, len(STATES), local_numel, dtype=torch.float32,
                                       device=device)
                _all_gather(gathered, local, group)
                for row, key in enumerate(STATES):
                    # rank r's shard is bucket positions [r * local_numel, (r+1) * local_numel)
                    bucket_state = gathered[:, row].reshape(-1)[:bucket.numel_unpadded]
                    world[key][offset:offset + bucket.numel_unpadded].copy_(bucket_state)
                offset += bucket.numel_unpadded
            world["numel_unpadded"] = buffer.numel_unpadded
            by_dtype[dtype] = world
        state[buffer_index] = by_dtype
    return state


def _all_gather(output: torch.Tensor, local: torch.Tensor, group) -> None:
    """`output[r]` = rank r's `local` (NCCL gathers into one tensor; gloo into its views)."""
    if output.is_cuda:
        torch.distributed.all_gather_into_tensor(output, local, group=group)
    else:
        torch.distributed.all_gather(list(output.unbind(0)), local, group=group)


def _gathered_bytes(optimizer) -> int:
    return sum(len(STATES) * 4 * buffer.numel_unpadded for buffer in optimizer.buffers)


def _device_can_hold(optimizers: list, device: torch.device) -> bool:
    """Whether every rank's device has room for the gathered states (the same answer on all)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    need = HEADROOM * sum(_gathered_bytes(o) for o in optimizers)
    fits = torch.tensor([int(free >= need)], device=device)
    torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
    return bool(fits.item())


@contextlib.contextmanager
def gathering_on_device(optimizer, device: torch.device) -> Iterator[None]:
    """Within the block, the DistributedOptimizers of `optimizer` gather their state for a save
    with `gathered_parameter_state` on `device` (collective: every rank enters it). Loading
    (``empty_data``) and a device short of memory keep megatron's own gather."""
    optimizers = _distributed_optimizers(optimizer)
    if not optimizers or not _device_can_hold(optimizers, device):
        yield
        return

    def on_device(part, megatron_gather, *, use_gloo_comm: bool = True, empty_data: bool = False,
                  return_on_all_ranks: bool = False):
        if empty_data or not return_on_all_ranks:
            return megatron_gather(use_gloo_comm=use_gloo_comm, empty_data=empty_data,
                                   return_on_all_ranks=return_on_all_ranks)
        return gathered_parameter_state(part, device)

    for part in optimizers:
        megatron_gather = part.get_parameter_state_dp_zero
        part.get_parameter_state_dp_zero = partial(on_device, part, megatron_gather)
    try:
        yield
    finally:
        for part in optimizers:
            del part.get_parameter_state_dp_zero  # the class's method again

