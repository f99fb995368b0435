"""tests/multiproc.launch ends every rank, and what the ranks started, when one rank hangs or fails,
and says which rank it was.

The hanging rank ignores SIGTERM (as a trainer does whose handler waits for a step boundary that never
comes) and has started a child process of its own (as megatron's checkpoint writer is).
"""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.multiproc import launch


def _hang(pid_dir: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "600"])
    rank = os.environ["RANK"]
    (Path(pid_dir) / f"rank{rank}.tmp").write_text(f"{os.getpid()} {child.pid}")
    os.replace(Path(pid_dir) / f"rank{rank}.tmp", Path(pid_dir) / f"rank{rank}")
    while True:
        time.sleep(1)


def _one_rank_hangs(pid_dir: str) -> str:
    if os.environ["RANK"] == "1":
        _hang(pid_dir)
    return "done"


def _ranks_fail_and_one_hangs(pid_dir: str) -> None:
    rank = os.environ["RANK"]
    deadline = time.monotonic() + 60
    while rank != "2" and not (Path(pid_dir) / "rank2").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # fail once rank 2 hangs, with its child started
    if rank == "0":
        raise ValueError("rank 0 gives up")
    if rank == "1":
        os._exit(3)  # a crash: no result, no traceback
    _hang(pid_dir)


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _assert_all_gone(pid_file: Path) -> None:
    pids = [int(x) for x in pid_file.read_text().split()]  # the rank and its child
    deadline = time.monotonic() + 5
    while any(map(_running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if _running(p)]
    for p in left:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    assert not left, f"still running after launch returned: {left}"


def test_a_rank_that_times_out_is_named_and_every_rank_is_ended(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failed:
        launch(_one_rank_hangs, 2, str(tmp_path), timeout=20)
    message = str(failed.value)
    assert message.startswith("launch: rank 1 of 2 failed"), message
    assert "rank 1 returned nothing: timed out after 20 s; killed" in message, message
    _assert_all_gone(tmp_path / "rank1")


def test_a_failed_rank_ends_the_others_after_a_short_grace(tmp_path):
    """A rank that raises and one that crashes: the third, hanging, is killed FAILURE_GRACE_S (5 s)
    later, not at the 300 s timeout."""
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        launch(_ranks_fail_and_one_hangs, 3, str(tmp_path), timeout=300)
    seconds = time.monotonic() - t0
    message = str(failed.value)
    assert message.startswith("launch: rank 0, 1 of 3 failed"), message
    assert "--- rank 0 raised ---" in message and "ValueError: rank 0 gives up" in message, message
    assert "rank 1 returned nothing: exited with code 3 without a result" in message, message
    assert "rank 2 returned nothing: still running after another rank failed; killed" in message, message
    assert seconds < 60, seconds  # start-up (torch imports) + the grace, far from the timeout
    _assert_all_gone(tmp_path / "rank2")
