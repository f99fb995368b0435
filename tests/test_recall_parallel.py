"""A recall sweep's --parallel: each run a child process of the driver, the rows merged into
the one JSON the in-process sweep writes; a failed child is recorded and the others finish."""
from __future__ import annotations

import json

import pytest
import torch

from megatron_jrt.config import PRESETS
from megatron_jrt.evals.experiments.plot import cell_name
from tests.multiproc import launch

pytestmark = pytest.mark.skipif("based-tiny" not in PRESETS,
                                reason="needs the Based preset (megatron_jrt/config.py)")


def _sweep(argv: list[str]) -> dict:
    from megatron_jrt.evals.experiments import set_disjointness

    set_disjointness.main(argv)
    return json.loads(open(argv[argv.index("--out") + 1]).read())


def _summary(run: dict) -> tuple:
    return (run["name"], run["state_size"], [c["accuracy"] for c in run["cells"]],
            [step for step, _ in run["loss_curve"]])


def test_parallel_children_write_the_in_process_sweeps_rows(tmp_path, capsys):
    tiny = ["--tiny", "--models", "jrt,based"]
    alone = launch(_sweep, 1, [*tiny, "--out", str(tmp_path / "one.json")], in_process=True)[0]
    capsys.readouterr()
    # launch sets a rank's variables (MASTER_PORT...): the children must not share them
    merged = launch(_sweep, 1, [*tiny, "--parallel", "2", "--out", str(tmp_path / "two.json")],
                    in_process=True)[0]
    printed = capsys.readouterr().out
    assert [_summary(r) for r in merged["runs"]] == [_summary(r) for r in alone["runs"]]
    assert [r["name"] for r in merged["runs"]] == ["jrt-d32-f4", "based-d32-f4"]
    for mine, theirs in zip(merged["runs"], alone["runs"]):
        assert mine["final_loss"] == pytest.approx(theirs["final_loss"], abs=1e-3)
    assert (merged["experiment"], merged["device"], merged["skipped"], merged["failed"]) == (
        "set_disjointness", "CPU", [], [])
    assert merged["settings"] == {**alone["settings"], "parallel": 2, "gpus": []}
    assert "2 runs, 2 at a time on the CPU" in printed
    assert printed.count("/2] ") == 2 and "] jrt-d32-f4 lr 0.003: state" in printed
    # every cell's accuracy reaches the console, which comes back when files may not
    for run in merged["runs"]:
        cells = " ".join(f"{cell_name(c)} {c['accuracy']:.3f}" for c in run["cells"])
        assert f"per cell: {cells}\n" in printed
    logs = sorted(p.name for p in (tmp_path / "two-logs").glob("*.log"))
    assert logs == ["based-d32-f4-lr0.003.log", "jrt-d32-f4-lr0.003.log"]
    training_log = (tmp_path / "two-logs" / logs[0]).read_text()
    assert "model.preset: based-tiny" in training_log
    assert not (tmp_path / ".two-work").exists()


def test_a_failed_child_is_recorded_the_others_finish_and_the_exit_is_non_zero(tmp_path,
                                                                                capsys):
    out = tmp_path / "sd.json"
    with pytest.raises(SystemExit, match=r"1 of 2 runs failed: jrt-d33-f4 lr 0.003 \("):
        launch(_sweep, 1, ["--tiny", "--points", "jrt:33:4,based:32:4", "--parallel", "2",
                           "--out", str(out)], in_process=True)
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["runs"]] == ["based-d32-f4"]
    assert data["runs"][0]["loss_curve"]
    [failed] = data["failed"]
    assert (failed["name"], failed["returncode"]) == ("jrt-d33-f4", 1)
    assert "hidden_size 33 is not divisible by num_heads 2" in failed["error"]
    assert failed["log"] == str(tmp_path / "sd-logs" / "jrt-d33-f4-lr0.003.log")
    assert "ConfigError" in open(failed["log"]).read()
    assert "jrt-d33-f4 lr 0.003: FAILED (exit 1)" in capsys.readouterr().out


def test_points_budget_and_bad_options_start_no_child(tmp_path, capsys):
    out = tmp_path / "sd.json"
    data = launch(_sweep, 1, ["--tiny", "--points", "jrt:32:4,transformer:32", "--parallel", "2",
                              "--max-minutes", "0", "--out", str(out)], in_process=True)[0]
    assert data["runs"] == data["failed"] == []
    # f defaults to the first feature dim; past the budget every run is listed as skipped
    assert data["skipped"] == ["jrt-d32-f4 lr 0.003", "transformer-d32 lr 0.003"]
    assert data["settings"]["points"] == ["jrt:32:4", "transformer:32:4"]
    assert "skipping 2 runs" in capsys.readouterr().out
    for argv, message in [(["--points", "jrt:32:4", "--models", "jrt"], "leave out --models"),
                          (["--points", "rwkv:32:4"], "'rwkv:32:4' is not family:d:f"),
                          (["--points", "jrt:32:4", "--parallel", "0"], "at least 1"),
                          (["--points", "jrt:32:4", "--parallel", "2", "--gpus", "0"],
                           "no GPU is visible")]:
        if "--gpus" in argv and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit, match=message):
            _sweep(["--tiny", *argv, "--out", str(out)])


def test_runs_past_their_time_limit_are_scored_at_the_step_they_reached(tmp_path, capsys):
    out = tmp_path / "sd.json"
    data = launch(_sweep, 1, ["--tiny", "--points", "jrt:32:4,based:32:4", "--parallel", "2",
                              "--steps", "100000", "--train-minutes", "0.04", "--out", str(out)],
                  in_process=True)[0]
    assert [r["name"] for r in data["runs"]] == ["jrt-d32-f4", "based-d32-f4"]
    for row in data["runs"]:
        assert 0 < row["steps_done"] < row["steps"] == 100000, row
        assert len(row["cells"]) == 4 and row["loss_curve"][-1][0] == row["steps_done"]
    assert capsys.readouterr().out.count("(time limit: stopped at step ") == 2


def test_a_budget_limits_each_runs_training_and_keeps_time_to_score(tmp_path):
    from megatron_jrt.evals.experiments.runner import Sweep

    budget = Sweep(tmp_path / "a.json", "set_disjointness", {}, max_minutes=2.0)
    assert budget.time_limit_minutes(0.0) == pytest.approx(1.5, abs=0.01)  # 30 s kept to score
    assert budget.time_limit_minutes(1.0) == 1.0
    assert Sweep(tmp_path / "b.json", "mqar", {}, max_minutes=None).time_limit_minutes(0.3) == 0.3


@pytest.mark.slow
def test_a_sweep_stopped_by_its_time_limit_resumes_to_the_uninterrupted_result(tmp_path,
                                                                                capsys):
    """--resume: the runs a time limit stopped continue from their checkpoints and end where
    one uninterrupted sweep ends (same losses, curves, accuracies); finished runs are kept."""
    sweep = ["--tiny", "--points", "jrt:32:4,based:32:4", "--steps", "150", "--parallel", "2"]
    straight = launch(_sweep, 1, [*sweep, "--out", str(tmp_path / "one.json")],
                      in_process=True)[0]["runs"]
    out = tmp_path / "two.json"
    cut = launch(_sweep, 1, [*sweep, "--train-minutes", "0.02", "--out", str(out)],
                 in_process=True)[0]["runs"]
    assert all(0 < row["steps_done"] < 150 for row in cut), cut
    assert "the same command with --resume continues them" in capsys.readouterr().out
    assert (tmp_path / ".two-work").is_dir()

    resumed = launch(_sweep, 1, [*sweep, "--resume", "--out", str(out)], in_process=True)[0]
    assert [row["resumed_at_step"] for row in resumed["runs"]] == [r["steps_done"] for r in cut]
    for mine, theirs in zip(resumed["runs"], straight):
        assert mine["steps_done"] == 150 and mine["final_loss"] == theirs["final_loss"]
        assert mine["loss_curve"] == theirs["loss_curve"] and mine["cells"] == theirs["cells"]
    assert not (tmp_path / ".two-work").exists()
    log = (tmp_path / "two-logs" / "jrt-d32-f4-lr0.003.log").read_text()
    assert "(time limit" in log and "resum" in log.lower()  # both parts, appended

    again = launch(_sweep, 1, [*sweep, "--resume", "--out", str(out)], in_process=True)[0]
    assert again["runs"] == resumed["runs"]  # finished runs are kept, not trained again
    assert "0 runs" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="was made with steps 150, not 151"):
        _sweep(["--tiny", "--points", "jrt:32:4", "--steps", "151", "--resume",
                "--out", str(out)])
