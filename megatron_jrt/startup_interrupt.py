"""A Ctrl-C while a command is still importing torch and megatron (seconds): one line, exit 130.

Nothing has started then, so a KeyboardInterrupt traceback would only alarm. Installed at the
top of a command's module, before its heavy imports, and only when that module is the program
(its console script, `python -m`, `torchrun -m`): importing the module from a test or a
notebook changes no handler. `end_of_start_up` hands SIGINT back to Python once the command's
own handling (checkpoint at the step boundary, clean-up in `finally`) is in place.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def exit_on_ctrl_c_during_imports(prog: str, module_name: str) -> None:
    """From now until `end_of_start_up`, SIGINT prints `<prog>: interrupted ...` and exits 130,
    if `module_name` (the caller's __name__) runs as the program `prog`."""
    if module_name != "__main__" and Path(sys.argv[0]).name != prog:
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # ignored (nohup) or handled by whoever started us: theirs

    def exit_130(signum, frame):
        os.write(2, f"{prog}: interrupted (SIGINT) during start-up; nothing was run\n".encode())
        os._exit(130)

    exit_130.during_start_up = True
    signal.signal(signal.SIGINT, exit_130)


def end_of_start_up() -> None:
    """Python's KeyboardInterrupt for SIGINT again, if `exit_on_ctrl_c_during_imports` set it."""
    if getattr(signal.getsignal(signal.SIGINT), "during_start_up", False):
        signal.signal(signal.SIGINT, signal.default_int_handler)
