"""The checkpoints of a training run: written synchronously or in the background, published
when every rank has written its part.

A save has two halves (``state.start_save``). The first runs on the training thread: the
state is captured (scheduler, counters, RNG and reader states are written at once; model and
optimizer tensors are copied device -> host and handed to a forked writer process, megatron's
`AsyncCallsQueue`). With ``checkpoint.async_save`` training continues while the writer writes
and hashes the files. The second half, the publication (dist_checkpointing's metadata, then
checkpoint.json, the rename, `latest`, retention), is collective and runs only once every
rank's writer has finished, at the first step boundary that finds it so (`poll`: one
all-reduce). Until then the files sit under the temporary name, so a kill during the
background write leaves the previous checkpoint the newest, exactly as a kill during a
synchronous save does.

One save is in progress at most: a new save, and the end of the run (also a stop by a
signal), first wait for the pending one and publish it. An error of the background write
is a CheckpointError on every rank (exit 4), and nothing is published.
"""
from __future__ import annotations

import itertools
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import psutil
import torch

from megatron_jrt.checkpoint.state import SaveInProgress, SavePlanner, start_save
from megatron_jrt.checkpoint.store import CheckpointError
from megatron_jrt.megatron_workarounds import (deaf_to_stop_signals, join_background_writes,
                                               kill_background_writes)

HOST_MEMORY_SHARE = 0.5  # an async save's host copies may fill this share of free host memory
FAILED_RANKS_WAIT_S = 30.0  # after an error, how long a rank waits to learn that all failed
_SAVERS = itertools.count()  # savers made in this process: the same sequence on every rank


@dataclass
class SaveTiming:
    """What one save cost the training thread, and how long writing it took."""

    step: int
    background: bool  # written by a background process (async_save)
    waited_s: float  # for the previous save to be published first
    capture_s: float  # state dicts (the optimizer's gather too), planning, the small files
    state_dict_s: float  # of capture_s: the state dicts
    stall_s: float  # the training thread in save(), waiting excluded (capture included)
    write_s: float | None = None  # after the capture until published (background: as seen
    # at step boundaries, so up to a step too long)
    published_at_step: int | None = None


class CheckpointSaver:
    """Saves `step` checkpoints of one run into `save_dir` (every method is collective).

    Use as a context manager around the training loop, for a pending save when the loop
    ends with an error: an error that every rank raised (a failing evaluation, a non-finite
    loss) publishes it, as a synchronous save would have published it already; an error of
    one rank leaves it unpublished (the ranks still training would never join the
    publication's collectives), and a second Ctrl-C kills the writer at once.
    """

    def __init__(self, save_dir: str | Path, model_chunks, optimizer, scheduler, *,
                 config_dict: dict, async_save: bool, keep_last: int = 0, keep_every: int = 0):
        self._save_dir = save_dir
        self._run = (model_chunks, optimizer, scheduler)
        self._options = {"config_dict": config_dict, "keep_last": keep_last,
                         "keep_every": keep_every}
        self._async = async_save
        self._queue = None  # megatron's AsyncCallsQueue, made at the first background save
        self._planner: SavePlanner | None = None  # made at the first save
        self._pending: tuple[SaveInProgress, SaveTiming, float] | None = None
        self._step = 0  # the last step boundary seen
        self._serial = next(_SAVERS)
        self.timings: list[SaveTiming] = []  # one per save, for logs and benchmarks

    # --------------------------------------------------------------------------- saving

    def save(self, step: int, *, data_state: dict | None, consumed_samples: int,
             consumed_tokens: int) -> None:
        """Checkpoint `step`: everything in it is captured now, at this step boundary.

        Synchronous: published on return. Background: published by a later `poll`, `save`
        or `finish`. `data_state` is this rank's reader state.
        """
        self._step = step
        entered = time.perf_counter()
        self.finish()
        started = time.perf_counter()
        self._planner = self._planner or SavePlanner()
        saving = start_save(self._save_dir, step, *self._run, data_state=data_state,
                            consumed_samples=consumed_samples, consumed_tokens=consumed_tokens,
                            planner=self._planner, **self._options)
        captured = time.perf_counter()
        timing = SaveTiming(step=step, background=self._async and self._fits_host_memory(saving),
                            waited_s=started - entered, capture_s=captured - started,
                            state_dict_s=saving.state_dict_s, stall_s=0.0)
        self.timings.append(timing)
        if timing.background:
            self._schedule(saving)
            timing.stall_s = time.perf_counter() - started
            self._pending = (saving, timing, time.perf_counter())
            waited = (f", after {timing.waited_s:.2f} s waiting for the previous save"
                      if timing.waited_s >= 0.01 else "")
            _print(f"checkpoint of step {step}: training stalled {timing.stall_s:.2f} s "
                   f"(capture {timing.capture_s:.2f} s, of which state dicts "
                   f"{timing.state_dict_s:.2f} s; device->host copy and writer start "
                   f"{timing.stall_s - timing.capture_s:.2f} s){waited}; writing it in the "
                   "background")
            return
        _raising_checkpoint_errors(saving, saving.request.execute_sync)
        timing.stall_s = time.perf_counter() - started
        timing.write_s, timing.published_at_step = timing.stall_s - timing.capture_s, step
        _print(f"saved checkpoint {saving.path} ({saving.size / 1e6:.1f} MB, "
               f"{timing.stall_s:.1f} s)")

    def poll(self, step: int) -> None:
        """At a step boundary: publish the pending save if every rank has written it."""
        self._step = step
        if self._pending is not None:
            self._finalize(blocking=False)

    def finish(self) -> None:
        """Wait until the pending save is written on every rank, and publish it."""
        if self._pending is not None:
            self._finalize(blocking=True)

    def __enter__(self) -> "CheckpointSaver":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._pending is None or error is None:
            return
        step = self._pending[0].step
        if not isinstance(error, Exception):  # a second Ctrl-C: stop now
            kill_background_writes(self._queue)
        else:
            join_background_writes(self._queue)
            if self._every_rank_failed(step):
                try:
                    self.finish()
                except Exception as failed:  # noqa: BLE001 - the run's own error is reported
                    _print(f"WARNING: the checkpoint of step {step} is not published: {failed}")
                return
        self._pending = None

    def _every_rank_failed(self, step: int) -> bool:
        """Whether every rank has left the loop with an error, its writer done: only then may
        they run the publication's collectives. The same answer on every rank that asks,
        through the process group's key-value store (a rank still training never asks): the
        last rank to arrive decides yes, a rank that waited FAILED_RANKS_WAIT_S decides no,
        and the first decision stands."""
        world = torch.distributed.get_world_size()
        store = torch.distributed.distributed_c10d._get_default_store()
        prefix = f"megatron_jrt/checkpoint/{self._serial}/{step}"
        arrived = store.add(f"{prefix}/failed", 1)
        deadline = time.monotonic() + FAILED_RANKS_WAIT_S
        while True:
            if arrived >= world or time.monotonic() > deadline:
                wanted = "publish" if arrived >= world else "abandon"
                return store.compare_set(f"{prefix}/verdict", "", wanted) == b"publish"
            if store.check([f"{prefix}/verdict"]):
                return store.get(f"{prefix}/verdict") == b"publish"
            time.sleep(0.05)
            arrived = store.add(f"{prefix}/failed", 0)

    # ----------------------------------------------------------------------- background

    def _fits_host_memory(self, saving: SaveInProgress) -> bool:
        """Whether every host can hold its ranks' host copies of this save (the same answer
        on every rank); if not, the save is synchronous, with a warning."""
        buckets = saving.request.async_fn_args[1] if saving.request.async_fn else []
        staged = sum(tensor.numel() * tensor.element_size()
                     for _, _, (_, tensors) in buckets for _, tensor in tensors)
        mine = (socket.gethostname(), staged, psutil.virtual_memory().available)
        every: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(every, mine)
        needed: dict[str, int] = {}
        free: dict[str, int] = {}
        for host, nbytes, available in every:
            needed[host] = needed.get(host, 0) + nbytes
            free[host] = min(free.get(host, available), available)
        short = [h for h in needed if needed[h] > HOST_MEMORY_SHARE * free[h]]
        if short:
            host = short[0]
            _print(f"WARNING: checkpoint.async_save: step {saving.step} is saved synchronously: "
                   f"host {host} would need {needed[host] / 1e9:.1f} GB for its copies, more "
                   f"than {HOST_MEMORY_SHARE:.0%} of its {free[host] / 1e9:.1f} GB free memory")
        return not short

    def _schedule(self, saving: SaveInProgress) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        if self._queue is None:
            self._queue = AsyncCallsQueue(persistent=False)  # fork after the host copy
        request = saving.request
        if request.async_fn is not None:
            request = request._replace(async_fn=partial(deaf_to_stop_signals, request.async_fn))
        sys.stdout.flush()  # the forked writer would print what is still buffered again
        sys.stderr.flush()
        self._queue.schedule_async_request(request)

    def _finalize(self, *, blocking: bool) -> None:
        saving, timing, scheduled = self._pending
        try:
            finished = _raising_checkpoint_errors(
                saving, self._queue.maybe_finalize_async_calls, blocking=blocking, no_dist=False)
        except BaseException:
            if not self._queue.async_calls:  # megatron dropped it (its publication failed)
                self._pending = None
            raise
        if not finished:
            return
        self._pending = None
        timing.write_s = time.perf_counter() - scheduled
        timing.published_at_step = self._step
        _print(f"saved checkpoint {saving.path} ({saving.size / 1e6:.1f} MB; step {saving.step} "
               f"was written in the background in {timing.write_s:.1f} s and published at "
               f"step {self._step})")


def _raising_checkpoint_errors(saving: SaveInProgress, action, **kwargs):
    """`action(**kwargs)`, a failed write turned into a CheckpointError on every rank.

    torch's CheckpointException (raised on every rank by megatron's finalisation when a
    rank's writer failed or died) is a BaseException, outside `except Exception`.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return action(**kwargs)
    except CheckpointException as exc:
        # The failures are known on the coordinator (rank 0, the rank that reports them).
        why = "; ".join(f"rank {rank}: {type(failure).__name__}: {failure}"
                        for rank, (failure, _) in sorted(exc.failures.items())) or "another rank"
        error = CheckpointError(
            f"checkpoint of step {saving.step}: writing its files failed ({why}); it is not "
            f"published, the newest checkpoint in {saving.path.parent} is unchanged")
        error.all_ranks = True
        raise error from None


def _print(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        print(message, flush=True)
