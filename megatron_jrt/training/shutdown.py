"""Stop requests (SIGTERM, SIGUSR1, Ctrl-C, or the run's own time limit): checkpoint at the next
step boundary.

The handler only records the signal; `requested()` (collective, once per step) agrees across
ranks with an all-reduce, so every rank saves and stops at the same step even when only one
rank got the signal. Slurm: `#SBATCH --signal=USR1@120` sends SIGUSR1 to every task two
minutes before the time limit (`B:USR1` would signal only the batch shell). A second Ctrl-C
aborts at once (KeyboardInterrupt), for when the save itself is not wanted.
`training.exit_duration_minutes` (Megatron-LM's --exit-duration-in-mins) stops the same way once
that much wall time has passed since `train()` started, for schedulers that send no signal and
for sweeps with a time budget.
"""
from __future__ import annotations

import signal
import sys
import threading
import time

import torch

from megatron_jrt.platform import current_device


class ShutdownSignal:
    """Install with `install()`, poll with `requested()` every step, undo with `restore()`.

    `time_limit_minutes` > 0: `requested()` also turns true that long after construction.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, time_limit_minutes: float = 0.0):
        self.received: str | None = None  # what stopped the run: a signal's name, or the limit
        self.timed_out = False
        self._limit_minutes = time_limit_minutes
        self._deadline = (time.monotonic() + 60 * time_limit_minutes
                          if time_limit_minutes > 0 else None)
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
        """True on every rank when any rank has received a stop signal or reached the time
        limit (collective; a signal anywhere wins over the limit)."""
        late = self._deadline is not None and time.monotonic() >= self._deadline
        flag = torch.tensor([2.0 if self.received else 1.0 if late else 0.0],
                            device=current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() == 1.0:
            self.timed_out = True
            self.received = (f"the time limit (training.exit_duration_minutes="
                             f"{self._limit_minutes:g})")
        elif flag.item() == 2.0 and self.received is None:
            self.received = "a peer rank's signal"
        return flag.item() > 0

    @property
    def why(self) -> str:
        """What stopped the run, for the log line."""
        return f"{'reached' if self.timed_out else 'received'} {self.received}"

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
