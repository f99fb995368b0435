"""Scoring synthetic tasks: accuracy per cell against an oracle, `jrt-eval synthetic` on a
trained checkpoint, and the sweep drivers' --tiny runs with the plot."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from megatron_jrt.config import PRESETS, preset
from megatron_jrt.evals.synthetic_eval import evaluate_cell
from megatron_jrt.evals.tasks import build_task
from tests.multiproc import launch

MQAR = {"task": "mqar", "vocab_size": 64, "kv_pairs": [2, 3]}


class MQAROracle(torch.nn.Module):
    """Logits that know MQAR: at a token, the one after its first occurrence (the context
    comes first), or with `wrong` the id after that."""

    def __init__(self, vocab: int, wrong: bool = False):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device to be on

    def forward(self, input_ids, positions, mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, tokens in enumerate(input_ids.tolist()):
            values = {}
            for i in range(len(tokens) - 1):
                values.setdefault(tokens[i], tokens[i + 1])
            for p, token in enumerate(tokens):
                answer = values.get(token, 0)
                logits[row, p, (answer + 1) % self.vocab if self.wrong else answer] = 1.0
        return logits


@dataclass
class FakeTrained:
    """What evaluate_cell uses of a TrainedModel; records the configs it asks for."""

    model: torch.nn.Module
    config: object
    asked: list = field(default_factory=list)

    def rebuilt(self, **changes):
        self.asked.append(changes)
        return self


@pytest.mark.parametrize("prefix", [0, 6])
def test_cell_accuracy_counts_every_answer_and_jrt_reads_each_test_context_whole(prefix):
    task = build_task(MQAR, 16)  # context region 6
    trained = FakeTrained(MQAROracle(64), preset("jrt-tiny", prefix_length=prefix))
    seen = evaluate_cell(trained, task, (16, 2), examples=10, batch_size=4, seed=0)
    assert (seen.correct, seen.answers, seen.accuracy) == (20, 20, 1.0)
    longer = evaluate_cell(trained, task, (40, 8), examples=5, batch_size=4, seed=0)
    assert (longer.correct, longer.answers) == (40, 40)
    # the unseen cell's context region is 16 tokens: JRT reads all of it as its prefix
    assert trained.asked == [{"prefix_length": prefix, "max_sequence_length": 64},
                             {"prefix_length": 16 if prefix else 0, "max_sequence_length": 64}]
    wrong = FakeTrained(MQAROracle(64, wrong=True), preset("jrt-tiny", prefix_length=prefix))
    assert evaluate_cell(wrong, task, (16, 3), examples=4, batch_size=4, seed=0).correct == 0
    with pytest.raises(ValueError, match=r"cell \(10, 3\): seq_length"):
        evaluate_cell(trained, task, (10, 3), examples=4, batch_size=4, seed=0)


def _train(run_dir: str) -> int:
    from megatron_jrt.train import main

    return main([
        "--set", "model.preset=jrt-tiny", "--set", "model.overrides.prefix_length=6",
        "--set", f"data.synthetic={json.dumps(MQAR)}", "--set", "data.seq_length=16",
        "--set", "data.micro_batch_size=8", "--set", "data.global_batch_size=8",
        "--set", "training.train_steps=4", "--set", "training.eval_steps=1",
        "--set", "training.eval_interval=4", "--set", "optimizer.warmup_steps=1",
        "--set", f"logging.run_dir={run_dir}", "--set", "logging.tensorboard=false",
        "--set", f"checkpoint.save_dir={run_dir}/ckpt"])


def _jrt_eval(argv: list[str]) -> int:
    from megatron_jrt.evals.cli import main

    return main(argv)


def test_jrt_train_then_jrt_eval_synthetic(tmp_path, capsys):
    assert launch(_train, 1, str(tmp_path), in_process=True)[0] == 0
    losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and "mlm loss" not in losses[0]  # answers only, no MLM term
    out = tmp_path / "eval.json"
    assert launch(_jrt_eval, 1, ["synthetic", "--model", str(tmp_path / "ckpt"), "--cells",
                                 "16x2,16x3,40x8", "--examples", "12", "--json", str(out)],
                  in_process=True)[0] == 0
    results = json.loads(out.read_text())
    assert results["task"] == MQAR and results["prefix_length"] == 6
    assert results["layer_pattern"] == preset("jrt-tiny").layer_pattern
    assert [(c["seq_len"], c["kv_pairs"], c["answers"]) for c in results["cells"]] == [
        (16, 2, 24), (16, 3, 36), (40, 8, 96)]
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in results["cells"])
    assert "mean accuracy over 3 cells" in capsys.readouterr().out
    assert launch(_jrt_eval, 1, ["synthetic", "--model", str(tmp_path / "ckpt"), "--cells", "8x3"],
                  in_process=True)[0] == 2
    assert "jrt-eval: error: cell (8, 3): seq_length" in capsys.readouterr().err


@pytest.mark.skipif("transformer-tiny" not in PRESETS or "based-tiny" not in PRESETS,
                    reason="needs the Based and Transformer presets (megatron_jrt/config.py)")
def test_sweep_driver_tiny_and_plot(tmp_path, capsys):
    from megatron_jrt.evals.experiments import set_disjointness

    out = tmp_path / "sd.json"
    launch(set_disjointness.main, 1, ["--tiny", "--out", str(out)], in_process=True)
    data = json.loads(out.read_text())
    assert [r["family"] for r in data["runs"]] == ["jrt", "based", "transformer"]
    assert [r["prefix_length"] for r in data["runs"]] == [11, 0, 0]
    for run in data["runs"]:
        assert [(c["A"], c["B"]) for c in run["cells"]] == [(3, 6), (6, 3), (8, 4), (4, 8)]
        assert [c["order"] for c in run["cells"]] == ["short first", "long first",
                                                       "long first", "short first"]
    assert data["runs"][0]["state_size"] == data["runs"][1]["state_size"]  # JRT = Based's state
    printed = capsys.readouterr().out  # a line per run; the training logs go to files
    assert "model.preset" not in printed and printed.count("] jrt-d32-f4 lr 0.003: state") == 1
    assert len(list((tmp_path / "sd-logs").glob("*.log"))) == 3
    pytest.importorskip("matplotlib")
    from megatron_jrt.evals.experiments import plot

    capsys.readouterr()
    plot.main([str(out), "--out", str(tmp_path)])
    assert (tmp_path / "set_disjointness.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert table.count("\n| ") == 4 and "| 3x6 | 6x3 | 8x4 | 4x8 |" in table
