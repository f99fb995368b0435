"""Where the trainer's micro-batches come from: shards through the packed reader, mock tokens,
or a synthetic recall task.

The first two yield [micro_batch, L+1] token windows and carry a small resumable state; the
trainer turns each window into a `JRTBatch` (masking seeded by the sample's global index), so
what a sample looks like does not depend on the parallel layout. A synthetic task
(`data.synthetic`, megatron_jrt.evals.tasks) knows where its answers are, so its source
yields finished `JRTBatch`es whose loss counts the answers only.
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from megatron_jrt.batch import JRTBatch, make_jrt_batch


class TokenSource(Protocol):
    def __iter__(self) -> Iterator[torch.Tensor | JRTBatch]: ...
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

    def _micro_batch(self, first: int) -> torch.Tensor | JRTBatch:
        """The micro-batch of global samples first, first+1, ..."""
        return torch.stack([self._window(first + i) for i in range(self.micro_batch_size)])

    def _next_first(self) -> int:
        """The first global sample of this rank's next micro-batch; moves the position past it."""
        first = self.layout.first_sample(self.consumed_samples) + self.offset
        self.offset += self.micro_batch_size
        if self.offset >= self.layout.per_rank:
            self.consumed_samples += self.layout.global_batch_size
            self.offset = 0
        return first

    def __iter__(self) -> Iterator[torch.Tensor | JRTBatch]:
        while True:
            yield self._micro_batch(self._next_first())

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples, self.offset = int(state["consumed_samples"]), int(state["offset"])


class SyntheticTaskSamples(MockTokens):
    """A synthetic task's labelled samples, placed in the global order like mock windows (so a
    resume positions them from the consumed samples, whatever the data-parallel size).

    Making a sample costs ~0.1 ms of Python, a GPU step of a small model ~20 ms for 256
    samples: with `num_workers` > 0, DataLoader worker processes make the upcoming
    micro-batches in turn (worker k of W the k-th, (k+W)-th, ...), which the DataLoader
    interleaves back into the same order one process would make them in.
    """

    def __init__(self, task, *, split: str, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_world_size: int, seed: int, num_workers: int = 0):
        super().__init__(vocab_size=task.vocab_size, seq_length=task.seq_length,
                         micro_batch_size=micro_batch_size, global_batch_size=global_batch_size,
                         dp_rank=dp_rank, dp_world_size=dp_world_size, seed=seed)
        self.task, self.split, self.num_workers = task, split, num_workers

    def _micro_batch(self, first: int) -> JRTBatch:
        from megatron_jrt.evals.tasks.sample import labelled_batch

        return labelled_batch([self.task.sample(self.seed, self.split, first + i)
                               for i in range(self.micro_batch_size)])

    def __iter__(self) -> Iterator[JRTBatch]:
        if not self.num_workers:
            yield from super().__iter__()
            return
        loader = iter(torch.utils.data.DataLoader(
            _UpcomingMicroBatches(copy.copy(self)), batch_size=None,
            num_workers=self.num_workers, prefetch_factor=4))
        try:
            for batch in loader:
                self._next_first()  # this position follows what has been handed out
                yield batch
        finally:  # stop the workers now, also when an error's traceback keeps this frame alive
            getattr(loader, "_shutdown_workers", lambda: None)()


class _UpcomingMicroBatches(torch.utils.data.IterableDataset):
    """DataLoader worker k of W makes the k-th, (k+W)-th, ... micro-batches `source` would."""

    def __init__(self, source: SyntheticTaskSamples):
        self.source = source

    def __iter__(self) -> Iterator[JRTBatch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        source = copy.copy(self.source)
        for index in itertools.count():
            first = source._next_first()
            if index % workers == worker:
                yield source._micro_batch(first)


def synthetic_task(data):
    """The task of `data.synthetic` (megatron_jrt.evals.tasks), or None for token data."""
    if not data.synthetic:
        return None
    from megatron_jrt.evals.tasks import build_task

    return build_task(data.synthetic, data.seq_length)


def generated_vocab_size(data) -> int | None:
    """Token ids of generated data (mock tokens or a synthetic task); None: the tokenizer's.

    The model gets one more id, the (unused) mask id, as with a tokenizer that lacks one.
    """
    task = synthetic_task(data)
    if task is not None:
        return task.vocab_size
    return data.mock_vocab_size if data.mock_data else None


def build_token_source(data, split: str, *, dp_rank: int, dp_world_size: int, seed: int,
                       tokenizer_hash: str | None) -> TokenSource:
    """The reader for `split` ("train" or "valid") described by the config's data section."""
    task = synthetic_task(data)
    if task is not None:
        return SyntheticTaskSamples(task, split=split, micro_batch_size=data.micro_batch_size,
                                    global_batch_size=data.global_batch_size, dp_rank=dp_rank,
                                    dp_world_size=dp_world_size, seed=seed,
                                    num_workers=data.num_workers)
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
    """Micro-batches of one optimizer step as `JRTBatch`es, masked by global sample index
    (token windows get the NTP + MLM objective; a labelled source's batches pass as they are)."""

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
            item = next(self.iterator)
            batch = item if isinstance(item, JRTBatch) else make_jrt_batch(
                item, prefix_length=self.prefix_length, mask_id=self.mask_id, seed=self.seed,
                first_sample_index=first)
            batches.append(batch.to(device))
            first += batch.input_ids.shape[0]
        return batches
