"""One run per save_dir: a lock file naming its holder, taken before step 0.

Two trainers writing checkpoints into one folder corrupt each other's saves and retention.
``save_dir/.lock`` is created atomically (written under a temporary name, then hard-linked
into place, so it is never seen half-written) and holds the owner's host, pid, process start
time and Slurm job. A second run is refused with a message naming the holder. A lock left
by a run that died without releasing it (kill -9, a node failure) is taken over with a
warning when that is certain: on the same host when the process is gone, or in a requeued
attempt of the same Slurm job. Anything else needs a person: the message says which file
to delete.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil

from megatron_jrt.checkpoint.store import CheckpointError

LOCK_FILE = ".lock"


class SaveDirLocked(CheckpointError):
    """Another run holds the save_dir."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": psutil.Process().create_time(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0")}


def _process_alive(pid: int, started: float) -> bool:
    """True when `pid` runs and is the process that started at `started` (not a reused pid)."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _describe(holder: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, since {since}"


def _stale_reason(holder: dict, me: dict) -> str | None:
    """Why `holder`'s lock is certainly abandoned, or None when it may still be in use."""
    if holder.get("host") == me["host"] and not _process_alive(holder.get("pid", -1),
                                                               holder.get("started", 0.0)):
        return "its process is gone"
    if (me["slurm_job"] and holder.get("slurm_job") == me["slurm_job"]
            and holder.get("slurm_restart") != me["slurm_restart"]):
        return "it is an earlier attempt of this requeued Slurm job"
    return None


class SaveDirLock:
    """``with SaveDirLock(save_dir) as lock:`` ... ``lock.warning`` says if a stale one was taken."""

    def __init__(self, save_dir: str | Path):
        self.path = Path(save_dir) / LOCK_FILE
        self.warning: str | None = None
        self._mine: dict | None = None

    def acquire(self) -> "SaveDirLock":
        """Take the lock or raise SaveDirLocked naming the holder and what to do."""
        me = _me()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._try_create(me):
                self._mine = me
                return self
            holder = self._read()
            if holder is None:  # released between our attempt and the read
                continue
            reason = _stale_reason(holder, me)
            if reason is None:
                raise SaveDirLocked(
                    f"checkpoint.save_dir {self.path.parent} is in use by another run "
                    f"({_describe(holder)}); wait for it to end, give this run another save_dir, "
                    f"or delete {self.path} if that run is gone")
            self.warning = (f"took over the lock of checkpoint.save_dir {self.path.parent} from "
                            f"a dead run ({_describe(holder)}): {reason}")
            self.path.unlink(missing_ok=True)
        raise SaveDirLocked(f"{self.path}: could not take the lock (another run takes it "
                            "at the same moment); try again")

    def _try_create(self, me: dict) -> bool:
        tmp = self.path.with_name(f"{LOCK_FILE}.{me['host']}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, self.path)  # atomic, fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: not provably stale, so it is reported as held

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        if self._mine is not None and self._read() == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def __enter__(self) -> "SaveDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
