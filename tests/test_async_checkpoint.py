"""Background checkpoint writes (`checkpoint.async_save`): the same checkpoints as synchronous
saves, published only once every rank has written its files, and never when the run dies or
the write fails first.

To hold a save in the middle of its background write, the tests patch megatron's writer
(`_patched_writes`), in this process or, through `_gated_main`, in a `jrt-train` subprocess:
forked writers inherit the patch, and no test hook lives in the production code.
"""
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from megatron_jrt.errors import ExitCode
from tests import runs
from tests.multiproc import launch
from tests.test_run_control import _finish, _kill_tree


@contextlib.contextmanager
def _patched_writes(step_dir: str | None = None, *, sleep_s: float = 0.0,
                    gate: Callable[[str], Path] | None = None, log_dir: Path | None = None):
    """megatron's background write, slowed: before writing the files of `step_dir`
    (".tmp_step_0000002"; every save when None) it sleeps `sleep_s` seconds, and with a
    `gate` it first creates `<gate(step_dir)>.waiting` and waits until `gate(step_dir)`
    exists. With `log_dir`, `<step_dir>.rank<r>.written` there gets the time the write ended."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.write_preloaded_data_multiproc

    def write(transforms, use_msc, rank, buckets, results_queue):
        folder = Path(buckets[0][0]).parent.name
        if step_dir in (None, folder):
            if gate is not None:
                opens = gate(folder)
                opens.with_name(opens.name + ".waiting").touch()
                while not opens.exists():
                    time.sleep(0.05)
            time.sleep(sleep_s)
        original(transforms, use_msc, rank, buckets, results_queue)
        if log_dir is not None:
            (log_dir / f"{folder}.rank{rank}.written").write_text(repr(time.time()))

    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write)
    try:
        yield
    finally:
        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(original)


def _gated_main() -> int:
    """`python -c` entry: jrt-train whose write of one checkpoint waits at a gate file.

    argv: step_dir gate jrt-train-arguments...
    """
    from megatron_jrt.train import main

    step_dir, gate, *argv = sys.argv[1:]
    with _patched_writes(step_dir, gate=lambda _: Path(gate)):
        return main(argv)


def _start_gated(run_dir: Path, step_dir: str, gate: Path, **extra) -> subprocess.Popen:
    argv = ["--config", runs.CONFIG]
    for item in runs.overrides(run_dir, **extra):
        argv += ["--set", item]
    code = ("import sys; from tests.test_async_checkpoint import _gated_main; "
            "sys.exit(_gated_main())")
    return subprocess.Popen([sys.executable, "-c", code, step_dir, str(gate), *argv],
                            cwd=runs.REPO, env=runs.env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_until(proc: subprocess.Popen, done, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the run exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"not in time: {what}"
        time.sleep(0.05)


def _files(checkpoint: Path) -> dict:
    """checkpoint.json's size and sha256 per file, without `.metadata` (it names its folder)."""
    files = json.loads((checkpoint / "checkpoint.json").read_text())["body"]["files"]
    return {name: entry for name, entry in files.items() if name != ".metadata"}


# ---------------------------------------------------------------------------------------------

def _sync_and_async_runs(root: Path) -> dict:
    import io

    sync = runs.run_in_process(root / "sync", **{"checkpoint.async_save": False})
    printed = io.StringIO()
    # Step 2's files are written while steps 3 and 4 train (and change every tensor).
    with _patched_writes(".tmp_step_0000002", sleep_s=1.5), contextlib.redirect_stdout(printed):
        background = runs.run_in_process(root / "async", **{"checkpoint.async_save": True})
    resumed = {name: runs.run_in_process(root / f"{name}_resumed", **{
        "checkpoint.resume": str(root / name / "ckpt" / "step_0000002")}).losses
        for name in ("sync", "async")}
    return {"sync": sync.losses, "async": background.losses, "resumed": resumed,
            "printed": printed.getvalue()}


def test_async_and_sync_saves_write_the_same_checkpoints_and_resume_alike(tmp_path):
    out = launch(_sync_and_async_runs, 1, tmp_path, in_process=True)[0]
    printed = out["printed"]
    assert "checkpoint of step 2: training stalled" in printed, printed
    assert "step 2 was written in the background in" in printed, printed
    assert "published at step 4" in printed, printed  # not at step 2: training went on
    assert out["async"] == out["sync"]
    for step in ("step_0000002", "step_0000004"):  # tensors, RNG, data position, counters
        assert _files(tmp_path / "async/ckpt" / step) == _files(tmp_path / "sync/ckpt" / step)
    assert out["resumed"]["async"] == out["resumed"]["sync"] == out["sync"][2:4]


def test_sigkill_during_the_background_write_keeps_the_previous_checkpoint(tmp_path):
    """Kill -9 while step 4 is being written: step 2 stays the newest, resume continues exactly."""
    from megatron_jrt.checkpoint import verify_checkpoint

    run_dir, gate = tmp_path / "killed", tmp_path / "gate"
    ckpt = run_dir / "ckpt"
    proc = _start_gated(run_dir, ".tmp_step_0000004", gate, **{"training.train_steps": 1000})
    try:
        # Steps 5 and 6 train while step 4 is written (step 6's save then waits for it).
        _wait_until(proc, lambda: gate.with_name("gate.waiting").exists()
                    and len(runs.losses(run_dir)) >= 6, "step 6 during the write of step 4")
        assert (ckpt / ".tmp_step_0000004").is_dir() and not (ckpt / "step_0000004").exists()
        assert (ckpt / "latest").read_text().strip() == "step_0000002"
    finally:
        _kill_tree(proc)
    assert (ckpt / "latest").read_text().strip() == "step_0000002"
    assert not (ckpt / "step_0000004").exists()
    verify_checkpoint(ckpt / "step_0000002")
    straight = runs.losses(run_dir)  # the killed run's steps are those of an unbroken run

    resumed = subprocess.run(runs.train_cmd(run_dir, **{"checkpoint.resume": "auto"}),
                             cwd=runs.REPO, env=runs.env(), timeout=300, capture_output=True,
                             text=True)
    assert resumed.returncode == ExitCode.OK, resumed
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout, resumed.stdout
    assert ".tmp_step_0000004" in resumed.stdout  # "removed the leftovers of killed saves"
    after = runs.losses(run_dir)
    assert sorted(after) == [1, 2, 3, 4]
    assert [after[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]  # exact
    assert verify_checkpoint(ckpt / "step_0000004")["step"] == 4


def test_a_stop_signal_publishes_the_pending_save_and_exits_10(tmp_path):
    """SIGUSR1 while step 2 is still being written and step 3's save waits for it: both are
    published before the run stops, and it says that step 3 is its checkpoint."""
    from megatron_jrt.checkpoint import verify_checkpoint

    run_dir, gate = tmp_path / "stopped", tmp_path / "gate"
    ckpt = run_dir / "ckpt"
    proc = _start_gated(run_dir, ".tmp_step_0000002", gate, **{
        "training.train_steps": 100000, "checkpoint.save_interval": 1})
    try:
        _wait_until(proc, lambda: gate.with_name("gate.waiting").exists()
                    and len(runs.losses(run_dir)) >= 3, "step 3 during the write of step 2")
        assert (ckpt / "latest").read_text().strip() == "step_0000001"
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert not (ckpt / "step_0000002").exists()  # still pending when the signal came
        gate.touch()
        out, err = _finish(proc)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert proc.returncode == ExitCode.STOPPED, (out, err)
    assert "received SIGUSR1: checkpointing at step 3 and stopping" in out, out
    assert "step 3 was written in the background" in out, out
    assert "stopped by SIGUSR1 after a checkpoint at step 3" in out, out
    assert max(runs.losses(run_dir)) == 3
    assert (ckpt / "latest").read_text().strip() == "step_0000003"
    assert verify_checkpoint(ckpt / "step_0000002")["step"] == 2
    assert verify_checkpoint(ckpt / "step_0000003")["step"] == 3
    assert not list(ckpt.glob(".tmp_*"))


# ---------------------------------------------------------------------------------------------

def _failing_write(run_dir: Path) -> dict:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_jrt.checkpoint import CheckpointError

    original = filesystem_async._write_item

    @functools.wraps(original)  # megatron reads its signature
    def full_disk_at_step_4(*args, **kwargs):
        if any(".tmp_step_0000004" in str(getattr(a, "name", "")) for a in args):
            raise OSError(28, "No space left on device (injected)")
        return original(*args, **kwargs)

    filesystem_async._write_item = full_disk_at_step_4
    try:
        with pytest.raises(CheckpointError) as info:
            runs.run_in_process(run_dir, **{"training.train_steps": 8})
    finally:
        filesystem_async._write_item = original
    return {"error": info.value, "steps": max(runs.losses(run_dir))}


def test_a_failed_background_write_is_a_checkpoint_error_and_publishes_nothing(tmp_path):
    from megatron_jrt.errors import exit_code_for

    out = launch(_failing_write, 1, tmp_path / "run", in_process=True)[0]
    error = out["error"]
    assert exit_code_for(error) == ExitCode.CHECKPOINT
    assert "checkpoint of step 4: writing its files failed" in str(error), error
    assert "No space left on device (injected)" in str(error), error
    assert out["steps"] < 8  # found at a step boundary; the run did not train on to its end
    ckpt = tmp_path / "run" / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [".tmp_step_0000004", "latest",
                                                       "step_0000002"]
    assert (ckpt / "latest").read_text().strip() == "step_0000002"


def _short_of_host_memory(run_dir: Path) -> str:
    import io
    from types import SimpleNamespace

    from megatron_jrt.checkpoint import saver

    printed = io.StringIO()
    original = saver.psutil.virtual_memory
    saver.psutil.virtual_memory = lambda: SimpleNamespace(available=1000)
    try:
        with contextlib.redirect_stdout(printed):
            runs.run_in_process(run_dir, **{"training.train_steps": 2})
    finally:
        saver.psutil.virtual_memory = original
    return printed.getvalue()


def test_a_save_whose_host_copies_do_not_fit_is_synchronous(tmp_path):
    printed = launch(_short_of_host_memory, 1, tmp_path / "run", in_process=True)[0]
    assert "WARNING: checkpoint.async_save: step 2 is saved synchronously" in printed, printed
    assert "written in the background" not in printed, printed
    assert (tmp_path / "run" / "ckpt" / "latest").read_text().strip() == "step_0000002"


# ---------------------------------------------------------------------------------------------

def _two_ranks(root: Path) -> dict:
    import torch

    import megatron_jrt.training.step as step_module
    from megatron_jrt.checkpoint import store

    rank = int(os.environ["RANK"])
    published: dict[str, float] = {}
    real_publish, real_eval_step = store.publish, step_module.eval_step

    def timed_publish(tmp, final, body, **kwargs):
        published[final.name] = time.time()
        real_publish(tmp, final, body, **kwargs)

    def broken_eval_step(*args, **kwargs):
        raise RuntimeError("injected: evaluation failed")

    def rank1_after_rank0(log_dir: Path):
        """Rank 1 writes each checkpoint 1 s after rank 0 has finished writing its part."""
        log_dir.mkdir(exist_ok=True)
        gate = (lambda folder: log_dir / f"{folder}.rank0.written") if rank == 1 else None
        return _patched_writes(sleep_s=1.0 if rank == 1 else 0.0, gate=gate, log_dir=log_dir)

    store.publish = timed_publish
    try:
        with rank1_after_rank0(root / "written"):
            result = runs.run_in_process(root / "run", **{"checkpoint.async_save": True})
    finally:
        store.publish = real_publish
    # Evaluating step 2 fails on both ranks while its checkpoint is being written.
    step_module.eval_step = broken_eval_step
    try:
        with rank1_after_rank0(root / "written_eval"):
            with pytest.raises(RuntimeError, match="injected"):
                runs.run_in_process(root / "eval_fails", **{"training.eval_steps": 1,
                                                            "training.eval_interval": 2})
    finally:
        step_module.eval_step = real_eval_step
    torch.distributed.barrier()
    return {"published": published, "losses": result.losses}


def test_two_ranks_publish_only_after_both_have_written_also_when_both_fail(tmp_path):
    from megatron_jrt.checkpoint import verify_checkpoint

    ranks = launch(_two_ranks, 2, tmp_path, timeout=480)
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 4
    published = ranks[0]["published"]  # rank 0 publishes
    assert sorted(published) == ["step_0000002", "step_0000004"] and not ranks[1]["published"]
    for step in published:
        wrote = [float((tmp_path / "written" / f".tmp_{step}.rank{r}.written").read_text())
                 for r in (0, 1)]
        assert wrote[1] - wrote[0] > 1.0, wrote  # rank 0 was done long before rank 1 ...
        assert published[step] > wrote[1], (published, wrote)  # ... and it waited for rank 1
        assert verify_checkpoint(tmp_path / "run" / "ckpt" / step)["layout"]["dp"] == 2
    # An evaluation that fails on every rank loses no training: its step's checkpoint is
    # published before the error ends the run.
    assert verify_checkpoint(tmp_path / "eval_fails" / "ckpt" / "step_0000002")["step"] == 2


def _verdicts(wait_s: float) -> list[bool]:
    import torch

    from megatron_jrt.checkpoint import saver

    torch.distributed.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_* from launch()
    saver.FAILED_RANKS_WAIT_S = wait_s
    verdicts = []
    for rank1_delay in (wait_s + 1.0, 0.0):  # rank 1 fails after rank 0 gave up; in time
        checkpoints = saver.CheckpointSaver("", [], None, None, config_dict={}, async_save=True)
        if torch.distributed.get_rank() == 1:
            time.sleep(rank1_delay)
        verdicts.append(checkpoints._every_rank_failed(step=2))
        torch.distributed.barrier()
    return verdicts


def test_after_an_error_the_ranks_agree_whether_to_publish():
    """A rank that arrives after the others stopped waiting must not start the publication's
    collectives alone (it would hang): the first decision stands for every rank."""
    assert launch(_verdicts, 2, 1.0) == [[False, True], [False, True]]
