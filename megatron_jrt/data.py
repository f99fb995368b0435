"""Where the trainer's micro-batches come from: shards through the packed reader, or mock tokens.

Both sources yield [micro_batch, L+1] token windows and carry a small resumable state. The
trainer turns each window into a `JRTBatch` (masking seeded by the sample's global index), so
what a sample looks like does not depend on the parallel layout.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from megatron_jrt.loss import JRTBatch, make_jrt_batch


class TokenSource(Protocol):
    def __iter__(self) -> Iterator[torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class SampleLayout:
    """Where a data-parallel rank's samples sit in the global order: rank r of d takes the r-th
    contiguous slice of every global batch."""

    def __init__(self, global_batch_size: int, dp_rank: int, dp_world_size: int):
        self.global_batch_size, self.dp_rank = global_batch_size, dp_rank
        self.per_rank = global_batch_size // dp_world_size

    def first_sample(self, consumed_samples: int) -> int:
        """Global index of this rank's first sample of the step that starts after
        `consumed_samples` (counted, not step x batch, so the global batch may change)."""
        return consumed_samples + self.dp_rank * self.per_rank


class MockTokens:
    """Random token windows; window i is a function of (seed, i) alone.

    Data-parallel rank r of d reads windows so that the global batch of a step holds the same
    windows, in the same order, whatever d is (like Megatron-LM's --mock-data). The state is
    the global position, so a resume may change the data-parallel size or the global batch.
    """

    def __init__(self, *, vocab_size: int, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_world_size: int, seed: int):
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed
        self.micro_batch_size = micro_batch_size
        self.layout = SampleLayout(global_batch_size, dp_rank, dp_world_size)
        self.consumed_samples = 0  # global samples of the steps read completely
        self.offset = 0  # windows this rank has read of the current step

    def _window(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 7919 + index)
        return torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=generator)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            first = self.layout.first_sample(self.consumed_samples) + self.offset
            self.offset += self.micro_batch_size
            if self.offset >= self.layout.per_rank:
                self.consumed_samples += self.layout.global_batch_size
                self.offset = 0
            yield torch.stack([self._window(first + i) for i in range(self.micro_batch_size)])

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples, self.offset = int(state["consumed_samples"]), int(state["offset"])


def build_token_source(data, split: str, *, dp_rank: int, dp_world_size: int, seed: int,
                       tokenizer_hash: str | None) -> TokenSource:
    """The reader for `split` ("train" or "valid") described by the config's data section."""
    if data.mock_data:
        return MockTokens(vocab_size=data.mock_vocab_size, seq_length=data.seq_length,
                          micro_batch_size=data.micro_batch_size,
                          global_batch_size=data.global_batch_size, dp_rank=dp_rank,
                          dp_world_size=dp_world_size, seed=seed + (split == "valid"))
    from data_prep.reader import PackedSequenceReader

    if not Path(data.data_dir, "manifest.json").is_file():
        raise FileNotFoundError(
            f"data.data_dir: no manifest.json in {data.data_dir!r}; create shards with "
            "`jrt-prep shards --out DIR ...` or set data.mock_data=true")
    return PackedSequenceReader(
        data.data_dir, split, data.seq_length, data.micro_batch_size, dp_rank=dp_rank,
        dp_world_size=dp_world_size, seed=seed, num_workers=data.num_workers,
        tokenizer_hash=tokenizer_hash, skip_corrupt=data.skip_corrupt)


class JRTBatches:
    """Micro-batches of one optimizer step as `JRTBatch`es, masked by global sample index."""

    def __init__(self, source: TokenSource, *, prefix_length: int, mask_id: int, seed: int,
                 global_batch_size: int, dp_rank: int, dp_world_size: int):
        self.source, self.iterator = source, None
        self.prefix_length, self.mask_id, self.seed = prefix_length, mask_id, seed
        self.layout = SampleLayout(global_batch_size, dp_rank, dp_world_size)

    def step(self, consumed_samples: int, num_microbatches: int, device) -> list[JRTBatch]:
        """This rank's micro-batches of the step that starts after `consumed_samples`."""
        if self.iterator is None:
            self.iterator = iter(self.source)
        batches, first = [], self.layout.first_sample(consumed_samples)
        for _ in range(num_microbatches):
            tokens = next(self.iterator)
            batches.append(make_jrt_batch(tokens, prefix_length=self.prefix_length,
                                          mask_id=self.mask_id, seed=self.seed,
                                          first_sample_index=first).to(device))
            first += tokens.shape[0]
        return batches
