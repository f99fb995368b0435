"""One optimizer step (and one evaluation pass) through megatron-core's schedules.

The forward_step contract (megatron-core 0.16.1, ``pipeline_parallel/schedules.py``,
``forward_step_calc_loss``)::

    def forward_step(data_iterator, model) -> (output_tensor, loss_func):
        batch = next(data_iterator)           # called once per microbatch on EVERY stage
        output_tensor = model(...)            # last stage: per-token losses; else hidden states
        return output_tensor, loss_func       # loss_func is only called on the last stage

    def loss_func(output_tensor) -> (loss, num_tokens, {name: report}):
        loss = (per_token_loss * loss_mask).sum()         # a SUM over tokens, with grad
        num_tokens = loss_mask.sum().to(torch.int)        # tokens in this microbatch
        report = torch.cat([loss.detach().view(1), num_tokens.view(1).float()])
        return loss, num_tokens, {"lm loss": report}      # report = (sum, count)

With the 3-tuple the schedule divides ``loss`` by ``num_tokens`` and by the number of
microbatches before backward (unless ``config.calculate_per_token_loss``, where the sum
is kept and ``finalize_model_grads`` divides the gradients by the tokens of the whole
global batch). Each report value is a ``(sum, count)`` pair; ``reduce_losses`` sums
pairs over microbatches and data-parallel ranks and reports ``sum / count``, the
token-weighted mean over the global batch. The 2-tuple form
``loss_func -> (loss, {name: report})`` divides ``loss`` by the number of microbatches only;
reports may be pairs too, and a scalar report is averaged over microbatches and ranks.
JRT's objective has two token counts (NTP and MLM), which one ``num_tokens`` cannot express:
its loss_func (``megatron_jrt.train``) uses the 2-tuple form with the global counts known
before the step (``megatron_jrt.loss``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_jrt.platform import current_device


@dataclass
class StepResult:
    """What one ``train_step`` did; identical on every rank."""

    losses: dict[str, float] = field(default_factory=dict)  # token-weighted global-batch means
    grad_norm: float | None = None  # before clipping; None when the step was skipped
    skipped: bool = False  # non-finite loss (or fp16 overflow): no update was applied
    num_zeros: int | None = None  # zeros in the grads, when the optimizer counts them
    learning_rate: float | None = None  # lr used by this step


def reduce_losses(losses_reduced: list[dict]) -> dict[str, float]:
    """Microbatch loss reports -> global-batch means, the same dict on every rank.

    ``losses_reduced`` is what the schedule returns: one dict per microbatch on the last
    pipeline stage, an empty list elsewhere. Pairs are summed over microbatches and the
    data-parallel (and context-parallel) group; the last stage then broadcasts the
    result to the other pipeline stages.
    """
    result: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses_reduced:
        keys = sorted(losses_reduced[0])
        pairs = []
        for key in keys:
            total = torch.zeros(2, dtype=torch.float64)
            for microbatch in losses_reduced:
                value = torch.as_tensor(microbatch[key]).detach().double().cpu().view(-1)
                total += value if value.numel() == 2 else torch.cat([value, value.new_ones(1)])
            pairs.append(total)
        stacked = torch.stack(pairs).to(current_device())
        torch.distributed.all_reduce(
            stacked, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
        # A term with no tokens in this global batch (no masked prefix token drawn) is not
        # reported: 0/0 would make the step's objective look non-finite.
        result = {k: s / c for k, (s, c) in zip(keys, stacked.cpu().tolist()) if c != 0}
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        box = [result]
        torch.distributed.broadcast_object_list(
            box,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        result = box[0]
    return result


def _all_ranks_finite(losses: dict[str, float]) -> bool:
    """True when every rank saw finite losses (ranks must agree, or collectives hang)."""
    bad = torch.tensor([0.0 if all(math.isfinite(v) for v in losses.values()) else 1.0],
                       device=current_device())
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return bad.item() == 0.0


def _zero_grads(model_chunks, optimizer) -> None:
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()


def _run_schedule(forward_step_func, data_iterator, model_chunks, *, forward_only: bool,
                  num_microbatches: int, seq_length: int, micro_batch_size: int) -> dict[str, float]:
    """megatron's schedule for this layout (1F1B under PP) -> reduced loss means."""
    losses_reduced = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=list(model_chunks),
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )
    return reduce_losses(losses_reduced)


def train_step(
    forward_step_func,
    data_iterator,
    model_chunks,
    optimizer,
    scheduler,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> StepResult:
    """Forward and backward over ``num_microbatches``, then one optimizer step.

    ``model_chunks`` are DDP-wrapped (``wrap_with_ddp``); ``data_iterator`` yields one
    microbatch per ``next`` (a list of iterators, one per chunk, for interleaved
    pipelines). The global batch is ``num_microbatches * micro_batch_size`` times the
    data-parallel size. If the reduced loss is not finite on any rank, the gradients
    are zeroed and neither the optimizer nor the scheduler steps (``skipped=True``).
    """
    _zero_grads(model_chunks, optimizer)
    losses = _run_schedule(forward_step_func, data_iterator, model_chunks, forward_only=False,
                           num_microbatches=num_microbatches, seq_length=seq_length,
                           micro_batch_size=micro_batch_size)
    learning_rate = optimizer.param_groups[0]["lr"] if optimizer.param_groups else None
    if not _all_ranks_finite(losses):
        _zero_grads(model_chunks, optimizer)
        return StepResult(losses, None, True, None, learning_rate)

    update_successful, grad_norm, num_zeros = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)  # the schedule counts optimizer steps (training.optim)
    return StepResult(
        losses=losses,
        grad_norm=None if grad_norm is None else float(grad_norm),
        skipped=not update_successful,
        num_zeros=None if num_zeros is None else int(num_zeros),
        learning_rate=learning_rate,
    )


def eval_step(
    forward_step_func,
    data_iterator,
    model_chunks,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
) -> dict[str, float]:
    """Forward only (eval mode, no grad) over ``num_microbatches`` -> reduced loss means."""
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            return _run_schedule(forward_step_func, data_iterator, model_chunks,
                                 forward_only=True, num_microbatches=num_microbatches,
                                 seq_length=seq_length, micro_batch_size=micro_batch_size)
    finally:
        for chunk in model_chunks:
            chunk.train()
