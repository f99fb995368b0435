"""Set disjointness and MQAR learned well above chance, end to end through the stack: the task
as `data.synthetic`, megatron-core's model and jrt-train's loop and loss, a saved checkpoint
reloaded and scored on the test stream (the experiment drivers' `train_and_evaluate`).

Settings are tiny (width 64, 4 layers C P C P) but chosen to learn reliably within ~150-200
steps at batch 128 (about a minute each on 2 idle cores). Chance is low: a model
that only learned the format picks one of A's elements (1/3, 1/6) or one of the V/2 values.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.multiproc import launch


def _train_and_score(family: str, task: dict, seq_length: int, steps: int,
                     cells: list[tuple[int, int]], work_dir: Path) -> dict:
    from megatron_jrt.evals.experiments.runner import Model, Training, train_and_evaluate

    return train_and_evaluate(Model(family, 64, 16), task, seq_length,
                              Training(steps=steps, batch_size=128, lr=3e-3), cells,
                              work_dir=work_dir, examples=256)


def test_set_disjointness_is_learned_in_both_orders(tmp_path):
    task = {"task": "set_disjointness", "vocab_size": 24, "pairs": [[3, 6], [6, 3]]}
    row = launch(_train_and_score, 1, "jrt", task, 12, 150, [(3, 6), (6, 3)], tmp_path,
                 in_process=True)[0]
    accuracy = {(c["A"], c["B"]): c["accuracy"] for c in row["cells"]}
    assert accuracy[(3, 6)] > 0.8 and accuracy[(6, 3)] > 0.8, row  # chance: 1/3 and 1/6
    assert row["prefix_length"] == 11 and row["final_loss"] < 0.5
    assert not any(tmp_path.iterdir())  # the run's checkpoint is cleaned up


@pytest.mark.slow
def test_mqar_is_learned_well_above_chance(tmp_path):
    task = {"task": "mqar", "vocab_size": 128, "kv_pairs": [2, 3]}
    row = launch(_train_and_score, 1, "jrt", task, 16, 200, [(16, 2), (16, 3)], tmp_path,
                 in_process=True)[0]
    accuracy = {c["kv_pairs"]: c["accuracy"] for c in row["cells"]}
    assert accuracy[2] > 0.4 and accuracy[3] > 0.3, row  # chance: 1/64
    assert [c["answers"] for c in row["cells"]] == [256 * 2, 256 * 3]  # every query scored
