"""The run directory's own record: the console in ``train.log``, tracebacks, ``exit.json``.

The console of a long run scrolls away or lives in a scheduler's file per attempt; the run
directory keeps, across restarts, what rank 0 printed (appended to ``train.log``), the full
traceback of every rank that failed (``logs/error-rank00003.txt``) and how the last attempt
ended (``exit.json``). Every writer here is best-effort: a full disk must not turn an error
report into a second error.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import TextIO

from megatron_jrt.errors import ExitCode
from megatron_jrt.fsutil import atomic_write_bytes

LOG_FILE = "train.log"
EXIT_FILE = "exit.json"
LOSSES_FILE = "losses.jsonl"  # one JSON row per step: step, loss and its terms


class _Tee:
    """A text stream that writes to the console stream and, while it can, to the log file."""

    def __init__(self, console: TextIO, log: TextIO):
        self._console, self._log = console, log

    def write(self, text: str) -> int:
        if self._log is not None:
            try:
                self._log.write(text)
            except (OSError, ValueError):  # a full disk, a closed file: keep the console
                self._log = None
        return self._console.write(text)

    def flush(self) -> None:
        if self._log is not None:
            try:
                self._log.flush()
            except (OSError, ValueError):
                self._log = None
        self._console.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the console's
        return getattr(self._console, name)


class ConsoleLog:
    """While active, stdout and stderr also go to ``<run_dir>/train.log`` (append)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path = Path(run_dir) / LOG_FILE
        self.enabled = enabled
        self._file: TextIO | None = None
        self._saved: tuple[TextIO, TextIO] | None = None

    def __enter__(self) -> "ConsoleLog":
        if self.enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", buffering=1)
            except OSError:
                return self  # the start-up checks report an unwritable run_dir
            self._file.write(f"==== jrt-train {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                             f"{' '.join(sys.argv)}\n")
            self._saved = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
            self._saved = None
        if self._file is not None:
            self._file.close()
            self._file = None


def write_traceback(run_dir: Path, rank: int, error: BaseException) -> Path | None:
    """The full traceback of `error` in ``logs/error-rankNNNNN.txt``; None if it cannot be written."""
    path = Path(run_dir) / "logs" / f"error-rank{rank:05d}.txt"
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}")
        return path
    except OSError:
        return None


def write_exit(run_dir: Path, code: ExitCode, message: str) -> None:
    """``exit.json``: how this attempt ended, for launchers that cannot see the exit code."""
    body = {"code": int(code), "name": code.name, "message": message,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        atomic_write_bytes(Path(run_dir) / EXIT_FILE, (json.dumps(body) + "\n").encode())
    except OSError:
        pass


def read_losses(path: Path) -> list[dict]:
    """The rows of ``losses.jsonl`` in order (none when it is absent), without the torn last
    line a killed run can leave."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_losses(path: Path, step: int) -> None:
    """Drop the rows of ``losses.jsonl`` after `step` (the steps a resumed run trains again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if _row_step(line) <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


def _row_step(line: str) -> float:
    """The step of a losses.jsonl row; inf for a torn last line of a killed run (dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")
