"""JRT-RNN's training objective: next-token prediction after the prefix plus masked LM on it.

loss = CE_ntp (mean over positions M..L-1) + 0.25 * CE_mlm (mean over masked prefix positions)
(JRT_SPEC.md section 4), both means over the tokens of the whole global batch. Both terms share
the tied LM head; the per-token cross entropy comes from megatron-core's vocab-parallel
implementation inside GPTModel, so it is exact under TP.

With prefix length 0 (the Based and Transformer baselines) there is no MLM term: every position
is a next-token position, and no "mlm loss" is reported (a mean over zero tokens would be NaN,
and a NaN report makes the trainer skip the step).
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_jrt.batch import JRTBatch

MLM_WEIGHT = 0.25


def loss_tokens(batches: list[JRTBatch]) -> Tensor:
    """[NTP tokens, MLM tokens] counted by the loss over `batches` (float64, on their device)."""
    return torch.stack([torch.stack([b.ntp_mask.sum(), b.mlm_mask.sum()]) for b in batches]
                       ).sum(0, dtype=torch.float64)


def jrt_loss(per_token_loss: Tensor, batch: JRTBatch, global_tokens: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the JRT objective, and its (sum, count) loss reports.

    The objective is token-weighted over the whole global batch: NTP mean over all its NTP
    tokens + 0.25 x MLM mean over all its masked tokens, whatever the split into micro-batches
    and data-parallel ranks. `global_tokens` ([NTP, MLM] counts of the global batch, from
    `loss_tokens` summed over ranks) makes the shares of all micro-batches add up to it;
    None takes this batch alone as the global batch (the share is then the objective).
    The reports are [sum, count] pairs for `training.step.reduce_losses`; "mlm loss" only when
    the batch has an MLM term.
    """
    losses = per_token_loss.float()
    ntp_mask, mlm_mask = batch.ntp_mask, batch.mlm_mask
    ntp_sum, mlm_sum = (losses * ntp_mask).sum(), (losses * mlm_mask).sum()
    counts = torch.stack([ntp_mask.sum(), mlm_mask.sum()])
    totals = (counts if global_tokens is None else global_tokens).to(losses).clamp(min=1)
    share = ntp_sum / totals[0] + MLM_WEIGHT * mlm_sum / totals[1]
    reports = {"lm loss": torch.stack([ntp_sum.detach(), counts[0]])}
    if batch.has_mlm:
        reports["mlm loss"] = torch.stack([mlm_sum.detach(), counts[1]])
    return share, reports


def with_objective(means: dict[str, float]) -> dict[str, float]:
    """The reduced loss means plus "loss" = lm + 0.25 x mlm, the optimised objective."""
    if "lm loss" not in means:
        return dict(means)
    return {**means, "loss": means["lm loss"] + MLM_WEIGHT * means.get("mlm loss", 0.0)}
