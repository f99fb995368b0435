"""jrt-train as a user runs it: stop signals, Ctrl-C, exit codes, one-line errors, two runs at once.

Every test starts `python -m megatron_jrt.train` subprocesses on configs/mock-tiny.yaml
(megatron's import makes each start take ~5 s on 2 cores).
"""
import contextlib
import json
import signal
import subprocess
import time

import psutil
import pytest

from megatron_jrt.errors import ExitCode
from tests import runs

LONG = {"training.train_steps": 100000, "checkpoint.save_interval": 100000}


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a trainer and the helper processes dist_checkpointing started."""
    helpers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait(timeout=30)
    for helper in helpers:
        with contextlib.suppress(psutil.NoSuchProcess):
            helper.kill()


def test_ctrl_c_checkpoints_and_stops_and_a_second_one_aborts(tmp_path):
    from megatron_jrt.checkpoint import verify_checkpoint

    once = tmp_path / "once"
    proc = runs.start(once, **LONG)
    runs.wait_for_steps(proc, once, 2)
    proc.send_signal(signal.SIGINT)
    out, err = _finish(proc)
    assert proc.returncode == ExitCode.STOPPED, (out, err)
    assert "Ctrl-C: stopping at the end of this step" in err
    step = max(runs.losses(once))
    assert verify_checkpoint(once / "ckpt" / f"step_{step:07d}")["step"] == step

    twice = tmp_path / "twice"
    proc = runs.start(twice, **LONG)
    runs.wait_for_steps(proc, twice, 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    out, err = _finish(proc, timeout=60)
    assert proc.returncode == ExitCode.ABORTED, (out, err)
    assert time.monotonic() - started < 30
    assert "aborted by a second Ctrl-C" in err and "Traceback" not in err


def test_sigterm_without_a_save_dir_says_that_nothing_was_saved(tmp_path):
    run_dir = tmp_path / "run"
    proc = runs.start(run_dir, **LONG, **{"checkpoint.save_dir": ""})
    runs.wait_for_steps(proc, run_dir, 2)
    proc.send_signal(signal.SIGTERM)
    out, err = _finish(proc)
    assert proc.returncode == ExitCode.STOPPED_UNSAVED, (out, err)
    assert "WITHOUT a checkpoint (checkpoint.save_dir is empty)" in out
    assert "after a checkpoint" not in out and "resume with" not in out
    assert json.loads((run_dir / "exit.json").read_text())["name"] == "STOPPED_UNSAVED"


def test_the_time_limit_checkpoints_and_stops_like_a_signal_and_the_run_resumes(tmp_path):
    """training.exit_duration_minutes: past it (here at once) the next step boundary saves and
    the run exits 10, as after SIGUSR1; `resume: auto` goes on from there."""
    run_dir = tmp_path / "run"
    limit = {"training.exit_duration_minutes": 1e-5}
    stopped = subprocess.run(runs.train_cmd(run_dir, **limit), cwd=runs.REPO, env=runs.env(),
                             timeout=300, capture_output=True, text=True)
    assert stopped.returncode == ExitCode.STOPPED, stopped
    reason = "the time limit (training.exit_duration_minutes=1e-05)"
    assert f"reached {reason}: checkpointing at step 1 and stopping" in stopped.stdout
    assert f"stopped by {reason} after a checkpoint at step 1" in stopped.stdout
    resumed = subprocess.run(runs.train_cmd(run_dir, **{"checkpoint.resume": "auto"}),
                             cwd=runs.REPO, env=runs.env(), timeout=300, capture_output=True,
                             text=True)
    assert resumed.returncode == ExitCode.OK, resumed
    assert sorted(runs.losses(run_dir)) == [1, 2, 3, 4]


def test_an_error_is_one_line_with_its_exit_code_and_the_traceback_in_the_run_dir(tmp_path):
    """A checkpoint of another model: CheckpointError, exit 4, one line on the console."""
    first = tmp_path / "first"
    subprocess.run(runs.train_cmd(first, **{"training.train_steps": 2}), cwd=runs.REPO,
                   env=runs.env(), check=True, timeout=300, capture_output=True)
    run_dir = tmp_path / "other_model"
    proc = subprocess.run(runs.train_cmd(run_dir, **{
        "checkpoint.resume": str(first / "ckpt" / "step_0000002"),
        "model.overrides.hidden_size": 128}), cwd=runs.REPO, env=runs.env(), timeout=300,
        capture_output=True, text=True)
    assert proc.returncode == ExitCode.CHECKPOINT, proc
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("jrt-train: error: CheckpointError: ") and "hidden_size" in lines[0]
    traceback_file = run_dir / "logs" / "error-rank00000.txt"
    assert str(traceback_file) in lines[0]
    assert "Traceback (most recent call last)" in traceback_file.read_text()
    assert json.loads((run_dir / "exit.json").read_text())["code"] == ExitCode.CHECKPOINT
    assert "CheckpointError" in (run_dir / "train.log").read_text()


@pytest.mark.slow
def test_a_second_run_on_a_save_dir_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    """Without MASTER_PORT: single-process runs pick their own port, so only the lock decides."""
    shared = tmp_path / "first"
    first = runs.start(shared, master_port=False, **LONG)
    try:
        runs.wait_for_steps(first, shared, 1)
        second = subprocess.run(runs.train_cmd(tmp_path / "second", **{
            "checkpoint.save_dir": str(shared / "ckpt")}), cwd=runs.REPO,
            env=runs.env(master_port=False), timeout=300, capture_output=True, text=True)
        assert second.returncode == ExitCode.CHECKPOINT, second
        assert "is in use by another run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        beside = subprocess.run(runs.train_cmd(tmp_path / "beside", **{
            "training.train_steps": 2}), cwd=runs.REPO, env=runs.env(master_port=False),
            timeout=300, capture_output=True, text=True)
        assert beside.returncode == ExitCode.OK, beside  # no port collision with the first
    finally:
        _kill_tree(first)
    assert (shared / "ckpt" / ".lock").exists()  # kill -9 leaves it behind
    after = subprocess.run(runs.train_cmd(shared, **{
        "checkpoint.resume": "auto", "training.train_steps": 2}), cwd=runs.REPO,
        env=runs.env(master_port=False), timeout=300, capture_output=True, text=True)
    assert after.returncode == ExitCode.OK, after
    assert "took over the lock" in after.stdout and "its process is gone" in after.stdout
    assert not (shared / "ckpt" / ".lock").exists()  # released at the end


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_to_every_process_still_checkpoints(tmp_path, sig):
    """Slurm signals every process of a step; a terminal's Ctrl-C reaches the whole process
    group. megatron's checkpoint-writer helper process must survive it, or the stop's own
    save fails (megatron_workarounds.start_checkpoint_writer_helper)."""
    from megatron_jrt.checkpoint import verify_checkpoint

    run_dir = tmp_path / "run"
    proc = runs.start(run_dir, **{**LONG, "checkpoint.save_interval": 2})
    deadline = time.monotonic() + 120
    while not ((run_dir / "ckpt" / "latest").exists() and len(runs.losses(run_dir)) >= 3):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    parent = psutil.Process(proc.pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)
    out, err = _finish(proc)
    assert proc.returncode == ExitCode.STOPPED, (out, err)
    step = max(runs.losses(run_dir))
    assert verify_checkpoint(run_dir / "ckpt" / f"step_{step:07d}")["step"] == step
