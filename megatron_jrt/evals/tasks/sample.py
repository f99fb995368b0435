"""What every synthetic task produces: a token window with its answer positions marked.

A sample is a function of (seed, split, index) alone, like the trainer's mock tokens, so a
resumed run or another data-parallel layout sees the same samples, and the train, valid and
test streams never share one. Its window is [L+1] tokens: the model reads tokens[:-1], the
label of position p is tokens[p+1], and only the task's answer positions count in the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_jrt.batch import JRTBatch

PAD = 0  # fills the context region in front of a shorter context (never a context token)
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Sample:
    tokens: np.ndarray  # [L+1] int64
    answers: np.ndarray  # positions p < L whose next token tokens[p+1] is an answer


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of sample `index` of `split` (numpy's SeedSequence mixes all three)."""
    return np.random.default_rng([seed % 2 ** 64, SPLITS.index(split), index])


def left_pad(context: np.ndarray, length: int) -> np.ndarray:
    """`context` right-aligned in a region of `length` tokens, PAD in front.

    Every sample of a task then has its context in the same region and its query right after
    it, so one prefix length (JRT's M) covers the context of every sample exactly.
    """
    if len(context) > length:
        raise ValueError(f"a context of {len(context)} tokens does not fit a region of {length}")
    return np.concatenate([np.full(length - len(context), PAD, dtype=np.int64),
                           context.astype(np.int64)])


def labelled_batch(samples: list[Sample]) -> JRTBatch:
    """Samples as a trainer batch: next-token labels, the loss on the answers only, no MLM.

    No masked-LM term: zoology trains these tasks on the answer labels alone, and masking 15%
    of the context would delete the very tokens the answer depends on.
    """
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples]))
    mask = np.zeros((tokens.shape[0], tokens.shape[1] - 1), dtype=np.float32)
    rows = np.repeat(np.arange(len(samples)), [len(s.answers) for s in samples])
    mask[rows, np.concatenate([s.answers for s in samples])] = 1.0
    answer_mask = torch.from_numpy(mask)
    return JRTBatch(input_ids=tokens[:, :-1], labels=tokens[:, 1:], ntp_mask=answer_mask,
                    mlm_mask=torch.zeros_like(answer_mask), has_mlm=False)
