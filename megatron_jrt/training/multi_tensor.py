"""megatron-core's multi-tensor fallbacks, without a host sync per tensor.

Without apex or Transformer Engine, megatron-core 0.16.1 computes the gradient norm for
clipping with `local_multi_tensor_l2_norm`: a norm per gradient, then `torch.tensor()` of
that list, which copies every norm to the host: one device sync per parameter (212 a step of
jrt-360m on an H200, the GPU idle between them). Its `local_multi_tensor_scale` (the clipping
itself; fp16 optimizers' main-to-model copies) is two kernels per tensor. torch's foreach
kernels do each in a few launches and no sync. The functions keep megatron's contracts
(`multi_tensor_applier(op, noop_flag, tensor_lists, *args)` calls `op(chunk_size, noop_flag,
tensor_lists, *args)`); `use_foreach_multi_tensor` swaps them in where megatron fell back to
its local ones, and back.
"""
from __future__ import annotations

import torch
from torch import Tensor


def l2_norm(chunk_size: int, noop_flag: Tensor, tensor_lists: list[list[Tensor]],
            per_tensor: bool, *args) -> tuple[Tensor, None]:
    """megatron's multi_tensor_l2norm: (the L2 norm over all of tensor_lists[0], fp32, [1], on
    their device; None)."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms: megatron's clipping does not ask for them")
    norm = torch.nn.utils.get_total_norm(tensor_lists[0], 2.0)
    return norm.float().reshape(1), None


def scale(chunk_size: int, noop_flag: Tensor, tensor_lists: list[list[Tensor]],
          factor: float) -> None:
    """megatron's multi_tensor_scale: tensor_lists[1][i] = tensor_lists[0][i] * factor."""
    sources, targets = tensor_lists
    if factor == 1.0:
        torch._foreach_copy_(targets, sources)
    elif all(source is target for source, target in zip(sources, targets)):
        torch._foreach_mul_(targets, factor)
    else:
        torch._foreach_copy_(targets, torch._foreach_mul(sources, factor))


def use_foreach_multi_tensor(on: bool) -> bool:
    """Make megatron's grad clipping and fp16 optimizers use `l2_norm` and `scale` (on) or its
    own local fallbacks (off), where it runs those fallbacks (no apex or TE; with them
    megatron's fused kernels stay). Returns whether the foreach versions are in use."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    swaps = ((clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm, l2_norm),
             (clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale, scale),
             (megatron_optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale,
              scale))
    swapped = False
    for module, name, local, ours in swaps:
        if getattr(module, name) in (local, ours):
            setattr(module, name, ours if on else local)
            swapped = swapped or on
    return swapped
