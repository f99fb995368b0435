"""Stop requests from outside (SIGTERM, SIGUSR1, Ctrl-C): checkpoint at the next step boundary.

The handler only records the signal; `requested()` (collective, once per step) agrees across
ranks with an all-reduce, so every rank saves and stops at the same step even when only one
rank got the signal. Slurm: `#SBATCH --signal=USR1@120` sends SIGUSR1 to every task two
minutes before the time limit (`B:USR1` would signal only the batch shell). A second Ctrl-C
aborts at once (KeyboardInterrupt), for when the save itself is not wanted.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch

from megatron_jrt.platform import current_device


class ShutdownSignal:
    """Install with `install()`, poll with `requested()` every step, undo with `restore()`."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> "ShutdownSignal":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if self.received is None:
            self.received = name
        if name == "SIGINT":
            print("\nCtrl-C: stopping at the end of this step (with a checkpoint when "
                  "checkpoint.save_dir is set); press Ctrl-C again to abort now",
                  file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """True on every rank when any rank has received a stop signal (collective)."""
        flag = torch.tensor([1.0 if self.received else 0.0], device=current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0 and self.received is None:
            self.received = "a peer rank's signal"
        return flag.item() > 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
