"""benchmarks/scaling.py: the scaling suite's rows, on CPU with `--tiny` (jrt-tiny, gloo, 1 and 2
processes through torchrun): weak scaling, the DP=2 layout and one that does not divide 2
processes (a skipped row with its reason; TP=2 and PP=2 rows take the DP row's code path and
their numerics are tests/test_model_parallel.py's), and a DP=2 run stopped by SIGUSR1 and resumed on one
process whose losses follow the uninterrupted DP=2 run's (fp32: the tolerance of
tests/test_checkpoint_rescale.py). About 45 s on 2 quiet cores (6 launches of jrt-train).
"""
import json
import subprocess
import sys

import pytest

from tests.runs import REPO, env


@pytest.fixture
def scaling(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import scaling

    return scaling


def test_trainer_environment_comes_from_the_slurm_launcher(scaling):
    defaults = scaling.launcher_env_defaults()
    assert defaults == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}
    assert scaling.parse_layout("dp") == (1, 1) and scaling.parse_layout("tp2pp4") == (2, 4)
    assert scaling.parse_target("2:tp2").dp == 1 and scaling.parse_target("8").dp == 8


def test_a_failed_run_is_a_row_status(scaling, tmp_path):
    (tmp_path / "exit.json").write_text(json.dumps({
        "code": 1, "name": "ERROR", "message": "OutOfMemoryError: CUDA out of memory."}))
    with pytest.raises(scaling.RunFailed, match="^OOM$"):
        scaling.exit_status(tmp_path, 1)
    (tmp_path / "exit.json").write_text(json.dumps({
        "code": 10, "name": "STOPPED", "message": "stopped by SIGUSR1 after a checkpoint"}))
    scaling.exit_status(tmp_path, 1, expected=scaling.STOPPED)  # torchrun's 1, the trainer's 10
    with pytest.raises(scaling.RunFailed, match=r"exit 10 \(STOPPED\)"):
        scaling.exit_status(tmp_path, 1)


def test_console_lines_stand_in_for_tensorboard(scaling):
    """Without TensorBoard the step times, MFU and memory come from the trainer's log lines."""
    text = ("step 1/20 | tokens 16.38k | loss 11.0210 | lm loss 10.9 | mlm loss 10.8 | lr 8.0E-04 "
            "| grad norm 2.1 | step time 2012.5 ms | tokens/s 8,141 | TFLOP/s/device 17.5 | "
            "MFU 1.8% | mem 30.25 GiB | skipped 0 | nonfinite 0\nnoise\n"
            "step 2/20 | tokens 32.77k | loss 10.7 | lm loss 10.6 | mlm loss n/a | lr 8.0E-04 | "
            "grad norm n/a | step time 150.0 ms | tokens/s 109,226 | TFLOP/s/device 0.0 | "
            "MFU n/a | mem n/a | skipped 0 | nonfinite 0\n")
    scalars = scaling.parse_console(text)
    assert scalars["iteration-time"] == {1: pytest.approx(2.0125), 2: pytest.approx(0.15)}
    assert scalars["mfu"] == {1: pytest.approx(0.018)}
    assert scalars["mem-max-allocated-bytes"] == {1: pytest.approx(30.25 * 2**30)}


@pytest.mark.slow
def test_tiny_suite_writes_every_row(tmp_path):
    out = tmp_path / "scaling.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/scaling.py", "--tiny", "--json", str(out),
         "--work-dir", str(tmp_path / "work"), "--layouts", "dp,tp2pp2"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["device"] == "CPU"

    weak = {row["gpus"]: row for row in data["weak"]}
    assert sorted(weak) == [1, 2]
    for row in weak.values():
        assert row["status"] == "ok", row
        assert row["global_batch"] == 2 * row["gpus"] and row["timed_steps"] == 3
        assert row["tokens_per_s_per_gpu"] == pytest.approx(
            row["global_batch"] * 64 / (row["step_ms"] / 1e3) / row["gpus"])
        assert row["memory_gib"] is None and row["mfu"] is None  # not measured on CPU
    assert weak[1]["efficiency"] == 1.0
    assert weak[2]["efficiency"] == pytest.approx(
        weak[2]["tokens_per_s_per_gpu"] / weak[1]["tokens_per_s_per_gpu"])

    layouts = {row["layout"]: row for row in data["layouts"]}
    assert list(layouts) == ["dp", "tp2pp2"]
    row = layouts["dp"]
    assert row["status"] == "ok" and (row["tp"], row["pp"], row["dp"]) == (1, 1, 2), row
    assert row["global_batch"] == 4 and row["tokens_per_s_per_gpu"] > 0
    assert layouts["tp2pp2"]["status"].startswith("skipped: TP x PP = 4 does not divide 2")
    assert "tp2pp2" in proc.stdout and "does not divide" in proc.stdout

    (resume,) = data["resume"]
    assert resume["status"] == "ok", resume
    assert resume["uninterrupted"] == "2 GPUs TP1 PP1 DP2"
    assert resume["resumed_on"] == "1 GPU TP1 PP1 DP1"
    k = resume["stop_step"]
    assert 4 <= k < 12  # stopped at the step boundary after the signal, with steps to resume
    assert sorted(map(int, resume["losses_resumed"])) == list(range(1, 13))
    assert sorted(map(int, resume["losses_uninterrupted"])) == list(range(1, 13))
    assert resume["max_rel_gap_before"] == 0.0  # the same run up to the stop (bit-exact)
    # fp32 on CPU: DP=2 -> DP=1 changes only the order of the gradient sums
    assert resume["max_rel_gap"] is not None and resume["max_rel_gap"] < 1e-5, resume
    assert f"stopped at step {k}" in proc.stdout
    for row in [*data["weak"], layouts["dp"], resume]:
        assert (tmp_path / "work").exists() and row["log"] and open(row["log"]).read()
    if resume["plot"] is not None:  # matplotlib (the [evals] extra) installed
        assert resume["plot"] == str(tmp_path / "resume-2gpu-tp1pp1-to-1gpu-tp1pp1.png")
        assert (tmp_path / "resume-2gpu-tp1pp1-to-1gpu-tp1pp1.png").stat().st_size > 0
