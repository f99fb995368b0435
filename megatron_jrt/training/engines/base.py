"""The engine seam: what the training loop asks of a training engine.

An engine owns the wrapped model, the optimizer and the LR schedule, and the format of their
checkpoints. The loop (`megatron_jrt.train`) owns everything else: data, counters, logging,
signals, when to save. Both engines train the same model on the same batches with the same
objective, token-weighted over the global batch (`megatron_jrt.loss.jrt_loss`), so their loss
curves agree; the pieces they share live here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from megatron_jrt.batch import JRTBatch
from megatron_jrt.checkpoint.state import CheckpointState
from megatron_jrt.training.step import StepResult


class Saver(Protocol):
    """A run's checkpoint writer (collective calls; a context manager around the loop)."""

    def save(self, step: int, *, data_state: dict | None, consumed_samples: int,
             consumed_tokens: int) -> None: ...

    def poll(self, step: int) -> None: ...

    def finish(self) -> None: ...

    def __enter__(self) -> "Saver": ...

    def __exit__(self, kind, error, traceback) -> None: ...


class Engine(Protocol):
    """One training engine (megatron-core's or DeepSpeed's) behind the training loop."""

    name: str

    def train_step(self, batches: list[JRTBatch]) -> StepResult:
        """Forward and backward over this rank's micro-batches of one global batch, then one
        optimizer step (skipped on every rank when any rank's loss is not finite)."""

    def eval_step(self, batches: list[JRTBatch]) -> dict[str, float]:
        """Forward only -> the global batch's loss means (the same dict on every rank)."""

    def load(self, path: Path, *, expected_model_config: dict) -> CheckpointState:
        """Restore a checkpoint of this engine; the config's optimizer values then apply."""

    def saver(self, save_dir: str, *, config_dict: dict, async_save: bool, keep_last: int,
              keep_every: int) -> Saver:
        """The checkpoint writer of this run (store layout, publication and `latest` shared)."""

    @property
    def learning_rate(self) -> float:
        """The lr the next step uses."""

    def close(self) -> None:
        """Release what the engine holds before the process group is destroyed."""


def global_loss_tokens(batches: list[JRTBatch]) -> tuple[Tensor, int]:
    """([NTP, MLM] loss tokens of the global batch, the loss scale both engines need).

    Every engine divides a micro-batch's loss by the number of micro-batches and averages
    gradients over the data-parallel ranks; multiplying each share by the scale (their
    product) undoes both, so the gradient is that of the objective over the global batch.
    """
    from megatron.core import parallel_state

    from megatron_jrt.loss import loss_tokens

    counts = loss_tokens(batches)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.distributed.all_reduce(counts, group=group)
    return counts, len(batches) * torch.distributed.get_world_size(group)


def model_forward(model, batch: JRTBatch) -> Tensor:
    """The model's per-token losses on `batch` (megatron GPTModel's call, any wrapper)."""
    positions = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
    return model(batch.input_ids, positions.unsqueeze(0).expand_as(batch.input_ids), None,
                 labels=batch.labels)
