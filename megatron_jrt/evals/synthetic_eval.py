"""Accuracy of a trained model on a synthetic task's test split, cell by cell.

A cell is evaluated on its own test task (`task.for_cell`): the training layout when the cell
fits it, a longer context region and window when it does not (unseen, longer sets or more
pairs). A JRT model reads each test context with a prefix of exactly that region; weights do
not depend on the prefix length. Accuracy is over answer positions, as zoology counts it:
one per sample for set disjointness, one per queried key for MQAR. The test stream
(`split="test"`) shares no sample with training or validation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_jrt.evals.tasks import SyntheticTask
from megatron_jrt.evals.tasks.sample import labelled_batch
from megatron_jrt.evals.trained_model import TrainedModel


@dataclass(frozen=True)
class CellResult:
    cell: tuple[int, int]
    correct: int
    answers: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.answers


def test_task(task: SyntheticTask, cell: tuple[int, int]) -> SyntheticTask:
    """`task` reduced to `cell`; ValueError naming the cell when it cannot be generated."""
    cell_task = task.for_cell(cell)
    if (problem := cell_task.problem()) is not None:
        raise ValueError(f"cell {cell}: {problem[0]} {problem[1]}")
    return cell_task


@torch.no_grad()
def evaluate_cell(trained: TrainedModel, task: SyntheticTask, cell: tuple[int, int], *,
                  examples: int, batch_size: int, seed: int) -> CellResult:
    """Greedy (argmax) predictions at the answer positions of `examples` test samples."""
    cell_task = test_task(task, cell)
    prefix = cell_task.context_length if trained.config.prefix_length else 0
    model = trained.rebuilt(prefix_length=prefix, max_sequence_length=max(
        trained.config.max_sequence_length, cell_task.seq_length)).model
    device = next(model.parameters()).device
    correct = answers = 0
    for start in range(0, examples, batch_size):
        batch = labelled_batch([cell_task.sample(seed, "test", i)
                                for i in range(start, min(start + batch_size, examples))])
        batch = batch.to(device)
        positions = torch.arange(batch.input_ids.shape[1], device=device)
        logits = model(batch.input_ids, positions.expand_as(batch.input_ids), None)
        scored = batch.ntp_mask.bool()
        correct += int((logits.argmax(-1) == batch.labels)[scored].sum())
        answers += int(scored.sum())
    return CellResult(cell, correct, answers)


def evaluate_cells(trained: TrainedModel, task: SyntheticTask, cells: list[tuple[int, int]], *,
                   examples: int = 1000, batch_size: int = 64, seed: int = 0
                   ) -> list[CellResult]:
    return [evaluate_cell(trained, task, cell, examples=examples, batch_size=batch_size,
                          seed=seed) for cell in cells]
