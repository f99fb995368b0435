"""The vocabulary cross entropy of a tensor-parallel output layer, the spec as plain PyTorch.

With tensor parallelism each rank's output layer computes a slice of the logits: rank r of a
group of size n holds the columns [r * v, (r + 1) * v) of the global vocabulary (v = the local
width). Labels are global vocabulary ids. Per token,

    loss = logsumexp over the global vocabulary of the logits - the logit of the label,

combined over ranks from per-rank maxima, sums of exponentials and label logits, the way
megatron-core's `tensor_parallel.vocab_parallel_cross_entropy` does (without label smoothing,
which this project never uses). Accumulation is fp32 (fp64 for fp64 logits, which the tests use).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def vocab_range(local_vocab: int, tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(first global id held by this rank, number of ranks) for a local slice of that width."""
    if tp_group is None:
        return 0, 1
    return dist.get_rank(tp_group) * local_vocab, dist.get_world_size(tp_group)


def _sum_over_ranks(x: Tensor, tp_group: dist.ProcessGroup | None, ranks: int) -> Tensor:
    """All-reduce SUM forward, identity backward: every rank's loss is the same replicated
    value, so each rank's slice gets the loss gradient as it is (megatron's reduce_from_*)."""
    if ranks == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, tp_group)


def vocab_parallel_cross_entropy_reference(logits: Tensor, labels: Tensor,
                                           tp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Per-token loss [...] (fp32; fp64 for fp64 logits) of logits [..., v_local], this rank's
    slice of the vocabulary, and labels [...] of global ids. Differentiable in the logits."""
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    local = x.shape[-1]
    start, ranks = vocab_range(local, tp_group)
    with torch.no_grad():  # a shift for stability: the loss does not depend on it
        shift = x.max(dim=-1).values
        if ranks > 1:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = torch.exp(x - shift.unsqueeze(-1)).sum(dim=-1)
    target = labels - start
    inside = (target >= 0) & (target < local)
    label_logit = x.gather(-1, target.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1)
    label_logit = torch.where(inside, label_logit, torch.zeros_like(label_logit))
    sum_exp = _sum_over_ranks(sum_exp, tp_group, ranks)
    label_logit = _sum_over_ranks(label_logit, tp_group, ranks)
    return torch.log(sum_exp) + shift - label_logit
