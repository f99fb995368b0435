"""Tokeniser worker processes for `jrt-prep shards`, built so that stopping them cannot hang.

multiprocessing.Pool hung when a run was interrupted (see CPython issues #78178 and #73945): a worker
killed by Ctrl-C while writing its result leaves half a message in the result pipe, the pool's
result thread waits for the rest, and Pool.terminate() joins that thread forever (seen, in a stack
dump of a hung run); a worker killed while holding the task queue's lock makes terminate() wait on
that lock; and a worker that dies loses its task, which the caller then waits for forever.

Here each worker is a plain child process (`python -m data_prep.encode_workers`, started by fork+exec,
so it inherits no lock from a threaded caller: why commit 1370e84 left "fork") with a pipe of its own
each way, and the parent has no lock or helper thread:
- workers run in their own process group, so a terminal's Ctrl-C reaches only the parent;
- the parent sends a worker its next batch only after reading its previous result, so the two never
  both wait on a full pipe;
- stopping is SIGKILL and reap (a worker holds nothing worth saving), which waits on nothing a
  worker holds; a worker that dies is a WorkerError at the parent's next read from it or write to it;
- a worker whose parent is gone reads end-of-file and exits.
Messages are an 8-byte length and a pickle.
"""
import collections
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from data_prep.tokenizer import Tokenizer, load_tokenizer

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
_LENGTH = struct.Struct("<Q")


class WorkerError(ChildProcessError):
    """A tokeniser worker stopped before returning its batch (killed, e.g. for memory, or crashed)."""


def encode_documents(tok: Tokenizer, docs: list[str], dtype) -> list[np.ndarray]:
    """Token arrays of `docs` with end-of-document appended: one shard sample each."""
    ids = tok.encode_batch(docs) if hasattr(tok, "encode_batch") else [tok.encode(d) for d in docs]
    return [np.array(x + [tok.eod_id], dtype=dtype) for x in ids]


def _write_message(pipe: BinaryIO, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:  # an unbuffered pipe may take part of it per call
        view = view[pipe.write(view):]


def _read_exactly(pipe: BinaryIO, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = pipe.readinto(view)
        if not got:
            raise EOFError("the other end of the pipe is closed")
        view = view[got:]
    return buf


def _read_message(pipe: BinaryIO):
    (n,) = _LENGTH.unpack(_read_exactly(pipe, _LENGTH.size))
    return pickle.loads(_read_exactly(pipe, n))


def _worker_env() -> dict[str, str]:
    """The caller's environment with this package's root first on PYTHONPATH: the worker runs with -P,
    so a data_prep/ folder in the caller's working directory cannot shadow this one."""
    path = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


class _Worker:
    """One worker process and its two pipes, seen from the parent."""

    def __init__(self, spec: str, dtype):
        self.proc = subprocess.Popen([sys.executable, "-P", "-m", __name__, spec, np.dtype(dtype).name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     env=_worker_env(), process_group=0)

    def send(self, batch: list[str]) -> None:
        try:
            _write_message(self.proc.stdin, batch)
        except BrokenPipeError as e:
            raise self._stopped() from e

    def receive(self) -> list[np.ndarray]:
        try:
            return _read_message(self.proc.stdout)
        except EOFError as e:
            raise self._stopped() from e

    def _stopped(self) -> WorkerError:
        # its pipe is closed, so it has exited or is exiting: the wait is short
        return WorkerError(f"tokeniser worker (pid {self.proc.pid}) stopped before returning its batch "
                           f"(exit code {self.proc.wait()}: killed, e.g. for memory, or crashed, see above)")

    def stop(self) -> None:
        """SIGKILL, reap, close the pipes (unbuffered, so closing flushes nothing into a full pipe)."""
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class EncoderWorkers:
    """`count` tokeniser processes; a context manager, whose exit stops them, on any exception too."""

    def __init__(self, spec: str, dtype, count: int):
        self._workers: list[_Worker] = []
        try:
            for _ in range(count):
                self._workers.append(_Worker(spec, dtype))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "EncoderWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        while self._workers:
            self._workers.pop().stop()

    def encode(self, batches: Iterable[list[str]]) -> Iterator[np.ndarray]:
        """Token arrays of all `batches`' documents, in input order.

        Round robin, one batch in flight per worker: a worker gets its next batch as soon as its result
        is read, and encodes it while the caller consumes that result.
        """
        batches = iter(batches)
        in_flight: collections.deque[_Worker] = collections.deque()
        for worker in self._workers:
            _give_next(worker, batches, in_flight)
        while in_flight:
            worker = in_flight.popleft()
            arrays = worker.receive()
            _give_next(worker, batches, in_flight)
            yield from arrays


def _give_next(worker: _Worker, batches: Iterator[list[str]], in_flight: collections.deque) -> None:
    batch = next(batches, None)
    if batch is not None:
        worker.send(batch)
        in_flight.append(worker)


def _claim_pipes() -> tuple[BinaryIO, BinaryIO]:
    """stdin and stdout as the batch and result pipes; fd 1 then points at stderr, so that a stray
    print (a library's warning) cannot corrupt the results."""
    batches = open(os.dup(0), "rb", buffering=0)
    results = open(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    return batches, results


def serve(spec: str, dtype_name: str) -> None:
    """The worker: encode each batch from stdin and write its arrays to stdout, until the parent is gone."""
    batches, results = _claim_pipes()
    tok, dtype = load_tokenizer(spec), np.dtype(dtype_name)
    try:
        while True:
            _write_message(results, encode_documents(tok, _read_message(batches), dtype))
    except (EOFError, BrokenPipeError):
        return  # the parent has finished, or is gone


if __name__ == "__main__":
    serve(*sys.argv[1:])
