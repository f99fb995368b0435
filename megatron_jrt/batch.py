"""A micro-batch as JRT-RNN trains on it: the prefix's tokens masked for the MLM term, the
next-token targets after it (JRT_SPEC.md section 4).

Masks are drawn per sample from a seed of the run seed and the sample's index, so a sample is
masked the same way on any data-parallel layout and micro-batch size (exact resumes and
rescaled runs). The objective over these batches is ``megatron_jrt.loss``'s.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MASK_PROBABILITY = 0.15


@dataclass
class JRTBatch:
    """One micro-batch ready for the model; every tensor is [batch, L]."""

    input_ids: Tensor  # prefix tokens replaced by [MASK] where mlm_mask is set
    labels: Tensor  # next token after the prefix, original token at masked prefix positions
    ntp_mask: Tensor  # float: 1 where the next-token loss counts
    mlm_mask: Tensor  # float: 1 where the masked-LM loss counts
    # False without a prefix: the objective has no MLM term. A flag rather than a look at
    # mlm_mask, so that every micro-batch and rank reports the same keys without a host sync.
    has_mlm: bool = True

    def to(self, device) -> "JRTBatch":
        return JRTBatch(*(t.to(device, non_blocking=True) for t in
                          (self.input_ids, self.labels, self.ntp_mask, self.mlm_mask)),
                        has_mlm=self.has_mlm)


def sample_seed(seed: int, sample_index: int) -> int:
    """A per-sample seed, so masking depends on the sample, not on the rank that reads it."""
    return (seed * 1_000_003 + sample_index) % (2 ** 63 - 1)


def make_jrt_batch(tokens: Tensor, *, prefix_length: int, mask_id: int, seed: int,
                   first_sample_index: int, mask_probability: float = MASK_PROBABILITY) -> JRTBatch:
    """Split [batch, L+1] token windows into model inputs and the NTP + MLM targets.

    Sample b draws its mask from `sample_seed(seed, first_sample_index + b)`, so the same
    sample is masked identically whatever the data-parallel layout or micro-batch size.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, L+1] with L >= 1, got {tuple(tokens.shape)}")
    inputs, next_tokens = tokens[:, :-1], tokens[:, 1:]
    length = inputs.shape[1]
    prefix = min(prefix_length, length)
    masked = torch.zeros(inputs.shape, dtype=torch.bool)
    for b in range(inputs.shape[0]):
        generator = torch.Generator().manual_seed(sample_seed(seed, first_sample_index + b))
        masked[b, :prefix] = torch.rand(prefix, generator=generator) < mask_probability
    masked = masked.to(inputs.device)
    positions = torch.arange(length, device=inputs.device)
    ntp_mask = (positions >= prefix).expand_as(inputs)
    labels = torch.where(masked, inputs, next_tokens)
    return JRTBatch(
        input_ids=inputs.masked_fill(masked, mask_id),
        labels=labels,
        ntp_mask=ntp_mask.float(),
        mlm_mask=masked.float(),
        has_mlm=prefix > 0,
    )
