"""Checkpoints: bit-exact resume after SIGKILL, a failed save, damaged files, wrong configs.

All runs are configs/mock-tiny.yaml (fp32 on CPU) with steps sized so that a save is the
main cost (the first dist_checkpointing save of a process spawns a helper, ~6 s).
"""
import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests import runs
from tests.multiproc import launch
from tests.runs import REPO


def _tensors(ckpt: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (model and optimizer), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    """4 steps straight == 2 steps, SIGKILL, resume auto, 2 more: losses and weights exact."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The killed run would train 1000 steps (same LR schedule: decay_steps is fixed).
    proc = subprocess.Popen(runs.train_cmd(killed, **{"training.train_steps": 1000}), cwd=REPO,
                            env=runs.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "ckpt" / "latest"
    deadline = time.monotonic() + 240
    helpers = []
    try:
        while not latest.exists():
            assert proc.poll() is None, "the training process died before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint published in time"
            time.sleep(0.05)
        # dist_checkpointing's save worker outlives a SIGKILLed trainer (on a cluster the job's cgroup
        # reaps it); reap it here too
        helpers = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)  # not a polite exit
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for helper in helpers:
            with contextlib.suppress(psutil.NoSuchProcess):
                helper.kill()
    assert proc.returncode == -signal.SIGKILL
    assert latest.read_text().strip() == "step_0000002"

    # The straight run meanwhile (2 cores: run one after the other).
    subprocess.run(runs.train_cmd(straight), cwd=REPO, env=runs.env(), check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    before = runs.losses(killed)
    (killed / "losses.jsonl").unlink()
    subprocess.run(runs.train_cmd(killed, **{"checkpoint.resume": "auto"}), cwd=REPO, env=runs.env(),
                   check=True, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reference, resumed = runs.losses(straight), runs.losses(killed)
    assert sorted(resumed) == [3, 4], resumed  # resumed after step 2, not from scratch
    assert [before[s] for s in (1, 2)] == [reference[s] for s in (1, 2)]
    assert [resumed[s] for s in (3, 4)] == [reference[s] for s in (3, 4)]  # exact

    a = _tensors(straight / "ckpt" / "step_0000004", tmp_path)
    b = _tensors(killed / "ckpt" / "step_0000004", tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("optimizer") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different  # model weights and Adam moments, bit for bit


# ---------------------------------------------------------------------------------------------
# In-process (one rank): a save that fails before publication, then damage and bad configs.

def _failing_save_then_resume(run_dir: Path):
    from megatron_jrt.checkpoint import store

    original = store.write_metadata

    def fail_at_step_4(directory, body):
        if body["step"] == 4:  # model, optimizer and rank files are written; not published
            raise OSError("injected failure while writing checkpoint step 4")
        original(directory, body)

    store.write_metadata = fail_at_step_4
    try:
        with pytest.raises(OSError, match="injected failure"):
            runs.run_in_process(run_dir)
    finally:
        store.write_metadata = original
    ckpt = run_dir / "ckpt"
    state = {"dirs": sorted(p.name for p in ckpt.iterdir()),
             "latest": (ckpt / "latest").read_text().strip(),
             "first_losses": runs.losses(run_dir)}
    store.verify_checkpoint(ckpt / "step_0000002")  # intact
    (run_dir / "losses.jsonl").unlink()
    result = runs.run_in_process(run_dir, **{"checkpoint.resume": "auto"})
    state["start_step"], state["resumed_losses"] = result.start_step, runs.losses(run_dir)
    state["dirs_after"] = sorted(p.name for p in ckpt.iterdir())
    return state


def _incompatible_resume(run_dir: Path, resume: str) -> str:
    from megatron_jrt.checkpoint import CheckpointError

    with pytest.raises(CheckpointError) as info:
        runs.run_in_process(run_dir, **{"model.overrides.hidden_size": 128, "checkpoint.resume": resume})
    return str(info.value)


def test_failed_save_keeps_previous_checkpoint_and_errors_name_the_problem(tmp_path, capsys):
    import shutil

    from checkpoints_tools.inspect_checkpoint import main as inspect_main
    from megatron_jrt.checkpoint import CheckpointError, find_latest_complete, verify_checkpoint

    run_dir = tmp_path / "run"
    state = launch(_failing_save_then_resume, 1, run_dir, in_process=True)[0]
    assert state["dirs"] == [".tmp_step_0000004", "latest", "step_0000002"], state
    assert state["latest"] == "step_0000002"
    assert state["start_step"] == 2
    assert sorted(state["resumed_losses"]) == [3, 4]
    first = state["first_losses"]  # the failed run trained steps 3-4 before its save failed
    assert [state["resumed_losses"][s] for s in (3, 4)] == [first[s] for s in (3, 4)]
    assert state["dirs_after"] == ["latest", "step_0000002", "step_0000004"]  # tmp cleaned

    ckpt = run_dir / "ckpt"
    # inspect: prints the step, layout, tensors and verifies.
    capsys.readouterr()
    assert inspect_main([str(ckpt / "step_0000004"), "--tensors", "3"]) == 0
    out = capsys.readouterr().out
    for text in ("step: 4", "consumed samples: 16", "layout: TP=1 PP=1 DP=1",
                 "decoder.layers.0", "train.data.seq_length: 64", "verified: ok"):
        assert text in out, (text, out)

    # A checkpoint of another model config: refused, naming the field.
    message = launch(_incompatible_resume, 1, tmp_path / "bad_cfg", str(ckpt / "step_0000002"),
                     in_process=True)[0]
    assert "incompatible model config" in message, message
    assert "hidden_size: checkpoint 64, this run 128" in message, message

    # A truncated shard file: named, and auto-resume falls back to step 2 with a warning.
    damaged = ckpt / "step_0000004"
    shard = sorted(damaged.glob("*.distcp"))[0]
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: .* truncated"):
        verify_checkpoint(damaged)
    found, problems = find_latest_complete(ckpt)
    assert found == ckpt / "step_0000002" and shard.name in problems[0]
    assert inspect_main([str(damaged)]) == 1
    assert f"verified: FAILED: {shard}" in capsys.readouterr().out
    # One flipped byte, same size: caught by sha256.
    flipped = bytearray(original)
    flipped[len(flipped) // 3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: sha256 .* corrupted"):
        verify_checkpoint(damaged)
    # A damaged completeness marker, and a missing one (a save that never finished).
    meta = damaged / "checkpoint.json"
    meta.write_text(meta.read_text().replace('"step": 4', '"step": 5'))
    with pytest.raises(CheckpointError, match="checkpoint.json: damaged"):
        verify_checkpoint(damaged)
    meta.unlink()
    with pytest.raises(CheckpointError, match="no checkpoint.json; the checkpoint is incomplete"):
        verify_checkpoint(damaged)
    # Nothing complete at all: an error, never a silent start from scratch.
    shutil.rmtree(ckpt / "step_0000002")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        find_latest_complete(ckpt)


def test_sigusr1_checkpoints_and_exits_cleanly(tmp_path):
    """SIGUSR1 (Slurm's warning before the time limit): save at the next step, exit STOPPED."""
    from megatron_jrt.errors import ExitCode

    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(runs.train_cmd(run_dir, **{"training.train_steps": 100000,
                                                   "checkpoint.save_interval": 100000}),
                            cwd=REPO, env=runs.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    try:
        while not (run_dir / "losses.jsonl").exists() or len(runs.losses(run_dir)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == ExitCode.STOPPED, out
    assert "received SIGUSR1: checkpointing at step" in out and "stopped by SIGUSR1" in out, out
    assert json.loads((run_dir / "exit.json").read_text())["name"] == "STOPPED"
    latest = (run_dir / "ckpt" / "latest").read_text().strip()
    from megatron_jrt.checkpoint import verify_checkpoint

    body = verify_checkpoint(run_dir / "ckpt" / latest)
    assert body["step"] == max(runs.losses(run_dir)) >= 2
