"""Multi-query associative recall (zoology `data/multiquery_ar.py`), with JRT-Prompt.

Format: the key-value pairs first (keys from [1, V/2), values from [V/2, V), no repeats),
then a query region where every key is asked once, at even offsets 2*gap with gaps drawn
without replacement from a power law (power_a 0.01: most queries come soon), filler tokens
uniform in [0, V) elsewhere; the label of each queried key is its value. zoology leaves the
token after a queried key random; here it is the value itself (the window is what a text
would be), which changes no label the loss sees.

JRT-Prompt (`jrt_prompt`): the key-value context is repeated twice before the queries, so a
causal model reads every pair again after it has seen them all.

Layout (one prefix length for a batch that mixes kv counts): the window of L+1 tokens is a
context region of C = 2 x context_slots x passes tokens holding the pairs right-aligned (PAD in
front), then the query region of the remaining L - C inputs. JRT's prefix covers exactly the
context region (prefix_length = C). A cell is (seq len, kv pairs), the seq len counted without
JRT-Prompt's repetition (2 x context_slots + the query region), so prompted and plain runs
report the same cells.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

import numpy as np

from megatron_jrt.evals.tasks.sample import Sample, left_pad, sample_rng


@dataclass(frozen=True)
class MQAR:
    """Sample i holds `kv_pairs[i % len(kv_pairs)]` pairs; windows are `seq_length` + 1 tokens."""

    name: ClassVar[str] = "mqar"
    seq_length: int  # L, the model's input length (data.seq_length)
    vocab_size: int = 8192
    kv_pairs: tuple[int, ...] = (4, 8, 16, 32, 64)
    jrt_prompt: bool = False  # the context twice before the queries
    power_a: float = 0.01
    context_slots: int = 0  # pairs the context region holds; 0: max(kv_pairs)

    @property
    def passes(self) -> int:
        return 2 if self.jrt_prompt else 1

    @property
    def slots(self) -> int:
        return self.context_slots or max(self.kv_pairs, default=0)

    @property
    def context_length(self) -> int:
        """Tokens of the context region (every pass of the pairs), all read non-causally by JRT."""
        return 2 * self.slots * self.passes

    @property
    def query_length(self) -> int:
        return self.seq_length - self.context_length

    @cached_property
    def _log_gap_weights(self) -> np.ndarray:
        """log P(gap = g) up to a constant, P ∝ power_a * (g+1)^(power_a - 1) (zoology's)."""
        return (self.power_a - 1) * np.log(np.arange(1, self.query_length // 2 + 1))

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) for values this task cannot generate from, else None."""
        if not self.kv_pairs or min(self.kv_pairs) < 1:
            return ("kv_pairs", f"{list(self.kv_pairs)}: give one or more counts >= 1")
        most = max(self.kv_pairs)
        if self.vocab_size // 2 - 1 < most:
            return ("vocab_size", f"{self.vocab_size} has {self.vocab_size // 2 - 1} keys, fewer "
                                  f"than {most} pairs; use at least {2 * most + 2}")
        if not 0.0 < self.power_a <= 1.0:
            return ("power_a", f"must be in (0, 1], got {self.power_a}")
        if self.context_slots and self.context_slots < most:
            return ("context_slots", f"{self.context_slots} is fewer than the {most} pairs of "
                                     "kv_pairs; use 0 (= max(kv_pairs)) or more")
        needed = self.context_length + 2 * most
        if self.seq_length < needed:
            return ("seq_length", f"{self.seq_length} is too short: the context region takes "
                                  f"{self.context_length} tokens and {most} queries need "
                                  f"{2 * most} more; set data.seq_length={needed} or more")
        return None

    def cell_of(self, index: int) -> tuple[int, int]:
        return (self.seq_length - self.context_length // self.passes * (self.passes - 1),
                self.kv_pairs[index % len(self.kv_pairs)])

    def cells(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(self.cell_of(i) for i in range(len(self.kv_pairs))))

    def for_cell(self, cell: tuple[int, int]) -> "MQAR":
        """This task with only `cell`'s kv count and seq len; the context region grows if needed."""
        seq_len, kv = cell
        slots = max(self.slots, kv)
        queries = seq_len - 2 * slots
        return replace(self, kv_pairs=(kv,), context_slots=slots,
                       seq_length=2 * slots * self.passes + queries)

    def describe(self, cell: tuple[int, int]) -> dict:
        return {"seq_len": cell[0], "kv_pairs": cell[1]}

    def sample(self, seed: int, split: str, index: int) -> Sample:
        rng = sample_rng(seed, split, index)
        n = self.kv_pairs[index % len(self.kv_pairs)]
        half = self.vocab_size // 2
        keys = 1 + rng.choice(half - 1, n, replace=False)
        values = half + rng.choice(self.vocab_size - half, n, replace=False)
        pairs = np.empty(2 * n, dtype=np.int64)
        pairs[0::2], pairs[1::2] = keys, values
        context = left_pad(np.tile(pairs, self.passes), self.context_length)
        # n gaps without replacement, weighted: the n largest of log-weight + Gumbel noise
        # (the same distribution as drawing one at a time, as zoology does, and 10x faster)
        noisy = self._log_gap_weights + rng.gumbel(size=len(self._log_gap_weights))
        gaps = np.argpartition(noisy, -n)[-n:]
        queries = rng.integers(0, self.vocab_size, self.query_length + 1)
        queries[2 * gaps], queries[2 * gaps + 1] = keys, values
        return Sample(tokens=np.concatenate([context, queries]),
                      answers=np.sort(self.context_length + 2 * gaps))
