"""Set disjointness (JRT paper, Fig. 2): `[1] A [2] B [3]` -> the one token A and B share.

Format of the authors' `synthetic/zoology/data/non_autoreg.py`: tokens 4..V-1 are shuffled, A
is drawn from the first V/2 of them and B from the rest, then one element of A overwrites a
random slot of B; separators 1, 2, 3; the only label is the shared token, after `[3]`. (A and
B are thus disjoint uniform subsets of 4..V-1 before the overwrite; they are drawn here as one
sample of |A| + |B| distinct tokens, the same distribution without shuffling V tokens.)

Layout here (so that one prefix length fits every (|A|, |B|) pair of a mixed batch): the
window of L+1 tokens is a context region of L-1 tokens holding `[1] A [2] B` right-aligned
(PAD in front), then `[3]`, then the answer. JRT's prefix covers exactly the context region
(prefix_length = L-1); `[3]` is read causally and the answer is predicted at its position.
A cell is (|A|, |B|): the set read first and the set read second.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from megatron_jrt.evals.tasks.sample import Sample, left_pad, sample_rng

FIRST, SECOND, QUERY = 1, 2, 3
SPECIAL_TOKENS = 4  # 0 = PAD and the three separators
# The paper's training pairs (|A|, |B|), both orders, and its longer test pairs.
PAPER_TRAIN_PAIRS = ((4, 16), (16, 4), (8, 32), (32, 8), (64, 16), (16, 64), (4, 128), (128, 4),
                     (16, 256), (256, 16), (4, 256), (256, 4))
PAPER_TEST_PAIRS = ((4, 128), (128, 4), (16, 256), (256, 16), (4, 256), (256, 4), (16, 512),
                    (512, 16), (4, 512), (512, 4), (16, 768), (768, 16), (4, 768), (768, 4))


@dataclass(frozen=True)
class SetDisjointness:
    """Sample i has the sizes `pairs[i % len(pairs)]`; windows are `seq_length` + 1 tokens."""

    name: ClassVar[str] = "set_disjointness"
    seq_length: int  # L, the model's input length (data.seq_length)
    vocab_size: int = 2048
    pairs: tuple[tuple[int, int], ...] = PAPER_TRAIN_PAIRS  # (|A|, |B|)

    @property
    def context_length(self) -> int:
        """Tokens of the context region (the sets), all read non-causally by JRT."""
        return self.seq_length - 1

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) for values this task cannot generate from, else None."""
        half = self.vocab_size // 2
        if self.vocab_size < 2 * SPECIAL_TOKENS + 2:
            return ("vocab_size", f"{self.vocab_size} leaves no room for two sets after the "
                                  f"{SPECIAL_TOKENS} special tokens; use at least 10")
        if not self.pairs:
            return ("pairs", "is empty; give [|A|, |B|] pairs")
        for a, b in self.pairs:
            if a < 1 or b < 1:
                return ("pairs", f"[{a}, {b}]: set sizes must be >= 1")
            if a > half or b > self.vocab_size - SPECIAL_TOKENS - half:
                return ("pairs", f"[{a}, {b}]: A draws from {half} tokens and B from "
                                 f"{self.vocab_size - SPECIAL_TOKENS - half} (vocab_size "
                                 f"{self.vocab_size}); use smaller sets or a larger vocab_size")
        needed = max(a + b for a, b in self.pairs) + 3
        if self.seq_length < needed:
            return ("seq_length", f"{self.seq_length} is too short for the pairs: the largest "
                                  f"needs {needed} (`[1] A [2] B [3]`); set data.seq_length="
                                  f"{needed}")
        return None

    def cell_of(self, index: int) -> tuple[int, int]:
        return self.pairs[index % len(self.pairs)]

    def cells(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(self.pairs))

    def for_cell(self, cell: tuple[int, int]) -> "SetDisjointness":
        """This task with only `cell`'s sizes, its window grown when the sets need more room."""
        a, b = cell
        return replace(self, pairs=((a, b),), seq_length=max(self.seq_length, a + b + 3))

    def sample(self, seed: int, split: str, index: int) -> Sample:
        rng = sample_rng(seed, split, index)
        a, b = self.cell_of(index)
        drawn = SPECIAL_TOKENS + rng.choice(self.vocab_size - SPECIAL_TOKENS, a + b, replace=False)
        first, second = drawn[:a], drawn[a:]
        shared = first[rng.integers(a)]
        second[rng.integers(b)] = shared
        context = np.concatenate([[FIRST], first, [SECOND], second])
        tokens = np.concatenate([left_pad(context, self.context_length), [QUERY, shared]])
        return Sample(tokens=tokens, answers=np.array([self.context_length]))

    def describe(self, cell: tuple[int, int]) -> dict:
        """The cell as the paper reports it: which set comes first matters to a causal model."""
        a, b = cell
        return {"order": "long first" if a > b else "short first" if a < b else "equal",
                "A": a, "B": b}
