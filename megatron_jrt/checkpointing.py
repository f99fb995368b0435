"""Checkpoints: megatron-core dist_checkpointing, published atomically, verified on load.

A checkpoint is one directory ``save_dir/step_0000100/``:

    __0_0.distcp ... .metadata   model + optimizer tensors (dist_checkpointing, torch_dist)
    common.pt                    scheduler, step, consumed samples (dist_checkpointing common)
    metadata.json                dist_checkpointing's own (backend, version)
    rank_state/rank_00003.pt     per-rank RNG states and data-reader state
    checkpoint.json              written last: step, layout, config, size + sha256 of every file

How a save stays crash-safe: every file is written into ``save_dir/.tmp_step_0000100/``;
``checkpoint.json`` is written last inside it, then the directory is renamed to its final name
(one atomic ``os.rename``) and fsynced, and only then ``save_dir/latest`` (a one-line text file,
written tmp + rename) is updated. A save killed at any moment leaves at most a ``.tmp_*``
directory, which is never read and is removed by the next save; the previous checkpoint is
untouched. Retention (keep the last K, plus every N-th step) deletes only after publication.

How a load stays honest: ``verify_checkpoint`` compares every file against checkpoint.json
(size, then sha256) and names the first bad file; ``find_latest_complete`` walks the step
directories newest first and skips (with a warning) any that is incomplete or damaged, so
``resume: auto`` falls back to the previous good checkpoint and never restarts from scratch
silently. A checkpoint whose model config differs from the run's is refused with the fields
that differ.

Resharding: model tensors are megatron ShardedTensors and the distributed optimizer state is
saved in megatron's ``fully_reshardable`` format (gathered over DP at save, stored as one
tensor per parameter state with the parameter's own sharding in model space; megatron 0.16's
``fully_sharded_model_space`` fails with "flattened_range is not supported"), so a checkpoint
loads into any TP/PP/DP layout. RNG states and the data
reader's position are per rank; they are restored only when the layout is unchanged (see
``CheckpointState.layout_changed``; the trainer then re-derives the data position from the
consumed samples).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.fsutil import atomic_write_bytes, fsync_dir, sha256_file
from megatron_jrt.platform import current_device, distributed_optimizer_checkpoint_metadata

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA = "checkpoint.json"  # ours; dist_checkpointing owns "metadata.json"
LATEST = "latest"
RANK_STATE_DIR = "rank_state"
OPTIMIZER_SHARDING = "fully_reshardable"  # model-space tensors: reshard across TP, PP, DP
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, damaged or incompatible; the message says which."""


@dataclass
class CheckpointState:
    """What `load_checkpoint` restored besides the model and optimizer tensors."""

    path: Path
    step: int
    consumed_samples: int
    config: dict  # what the saver passed as config_dict
    layout: dict  # the saving run's {"tp", "pp", "dp", "world"}
    layout_changed: bool  # TP, PP or DP differ from this run's
    data_state: dict | None = None  # this rank's reader state; None when DP changed
    rng_restored: bool = False
    warnings: list[str] = field(default_factory=list)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


# ---------------------------------------------------------------------------------- layout

def current_layout() -> dict:
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size(),
            "world": torch.distributed.get_world_size()}


def _rank_coords() -> dict:
    from megatron.core import parallel_state

    return {"rank": torch.distributed.get_rank(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank()}


def _unwrap(chunk):
    """The model inside DDP / Float16Module wrappers (their sharded_state_dict is the module's)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_sharded_state_dict(model_chunks) -> dict:
    chunks = [_unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _init_torch_adam_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors, "step" included, before a load.

    megatron's DistributedOptimizer.state_dict() (called while building the loading state
    dict) reads "step" from every parameter's state when neither apex nor TE is installed,
    but its init_state_fn creates only exp_avg / exp_avg_sq. The values are overwritten by
    the load.
    """
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def _sharded_state_dict(model_chunks, optimizer, *, is_loading: bool) -> dict:
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if is_loading:
            _init_torch_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING,
                      **distributed_optimizer_checkpoint_metadata()})
    return state


# ------------------------------------------------------------------------------ RNG states

def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(),
             "tracker": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# ------------------------------------------------------------------------------ file utils

def _list_files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != METADATA)


def _distributed_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """sha256 of `names`, each rank hashing every world-th file (all ranks get the result)."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mine = {n: sha256_file(directory / n) for i, n in enumerate(names) if i % world == rank}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def _metadata_text(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True)
    return json.dumps({"sha256": hashlib.sha256(canonical.encode()).hexdigest(), "body": body},
                      indent=1, sort_keys=True) + "\n"


def _write_metadata(directory: Path, body: dict) -> None:
    """checkpoint.json, the completeness marker: the last file written into a checkpoint."""
    with open(directory / METADATA, "w") as handle:
        handle.write(_metadata_text(body))
        handle.flush()
        os.fsync(handle.fileno())


def read_metadata(path: str | Path) -> dict:
    """The metadata body of checkpoint `path`; CheckpointError if absent or damaged."""
    file = Path(path) / METADATA
    if not file.is_file():
        raise CheckpointError(f"{path}: no {METADATA}; the checkpoint is incomplete (its save "
                              "did not finish) or this is not a checkpoint directory")
    try:
        raw = json.loads(file.read_text())
        body, digest = raw["body"], raw["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{file}: damaged ({exc.__class__.__name__}: {exc})") from None
    if hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest() != digest:
        raise CheckpointError(f"{file}: damaged (its content does not match its sha256)")
    if body.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format_version {body.get('format_version')}, this code "
                              f"reads {FORMAT_VERSION}")
    return body


def verify_checkpoint(path: str | Path, *, hashes: bool = True, shard: tuple[int, int] = (0, 1)
                      ) -> dict:
    """Check every file of checkpoint `path` against checkpoint.json; return the metadata body.

    Raises CheckpointError naming the first missing, truncated or altered file (size first,
    then sha256 unless `hashes=False`). `shard=(i, n)` hashes only every n-th file from i
    (for splitting the work between ranks); sizes are always checked for all files.
    """
    path = Path(path)
    body = read_metadata(path)
    files = body["files"]
    for index, name in enumerate(sorted(files)):
        expected = files[name]
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing (listed in {METADATA})") from None
        if size != expected["size"]:
            raise CheckpointError(f"{file}: {size} bytes, {METADATA} says {expected['size']}; "
                                  "the file is truncated or was rewritten")
        if hashes and index % shard[1] == shard[0] and sha256_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: sha256 differs from {METADATA}; the file is corrupted")
    return body


def _verify_all_ranks(path: Path) -> dict:
    """verify_checkpoint with hashing split across ranks; every rank raises if any rank failed."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    body, error = None, None
    try:
        body = verify_checkpoint(path, shard=(rank, world))
    except CheckpointError as exc:
        error = str(exc)
    errors: list[Any] = [None] * world
    torch.distributed.all_gather_object(errors, error)
    errors = [e for e in errors if e]
    if errors:
        raise CheckpointError(errors[0])
    return body


# -------------------------------------------------------------------------- finding them

def list_checkpoints(save_dir: str | Path) -> list[tuple[int, Path]]:
    """Published step directories (complete or not), oldest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in save_dir.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def find_latest_complete(save_dir: str | Path, *, verify=None) -> tuple[Path | None, list[str]]:
    """(newest checkpoint that verifies, warnings about newer ones that did not).

    (None, []) when `save_dir` holds no step directory at all; CheckpointError when it holds
    some but none verifies (never a silent restart from scratch). `verify(path)` defaults to
    `verify_checkpoint`.
    """
    verify = verify or verify_checkpoint
    found = list_checkpoints(save_dir)
    problems: list[str] = []
    for _, path in reversed(found):
        try:
            verify(path)
            return path, problems
        except CheckpointError as exc:
            problems.append(f"skipping checkpoint {path}: {exc}")
    if found:
        raise CheckpointError(f"{save_dir}: no complete checkpoint; " + "; ".join(problems))
    return None, []


def resolve_resume(resume: str, save_dir: str) -> Path | None:
    """The checkpoint that `checkpoint.resume` names (None: start fresh), verified on all ranks.

    "none" -> None; "auto" -> newest complete checkpoint in `save_dir` (None if there is none,
    warnings for skipped damaged ones); a path -> that checkpoint (a directory holding step
    directories is searched like "auto"), and an error if it does not verify.
    """
    if resume == "none":
        return None
    target = Path(save_dir if resume == "auto" else resume)
    if resume != "auto" and (target / METADATA).exists():
        _verify_all_ranks(target)
        return target
    if resume != "auto" and not list_checkpoints(target):
        raise CheckpointError(f"checkpoint.resume: {target} is not a checkpoint (no {METADATA}) "
                              "and holds no step_* checkpoints")
    path, problems = find_latest_complete(target, verify=_verify_all_ranks)
    for problem in problems:
        _warn(problem)
    return path


def _warn(message: str) -> None:
    if torch.distributed.get_rank() == 0:
        warnings.warn(message, stacklevel=3)
        print(f"WARNING: {message}", flush=True)


# ----------------------------------------------------------------------------------- save

def save_checkpoint(save_dir: str | Path, step: int, model_chunks, optimizer, scheduler, *,
                    config_dict: dict, data_state: dict | None, consumed_samples: int,
                    keep_last: int = 0, keep_every: int = 0, fully_parallel: bool = True
                    ) -> Path:
    """Save a checkpoint of `step` into `save_dir/step_XXXXXXX` (collective: call on all ranks).

    `data_state` is this rank's reader state at the step boundary. Returns the published path.
    With `keep_last` > 0, older checkpoints are then deleted except the last `keep_last`
    and every step divisible by `keep_every` (> 0).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    save_dir = Path(save_dir)
    final = save_dir / step_dir_name(step)
    tmp = save_dir / f".tmp_{step_dir_name(step)}"
    rank, started = torch.distributed.get_rank(), time.perf_counter()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # the leftover of a killed save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()

    state = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["step"], state["consumed_samples"] = step, consumed_samples
    strategy = get_default_save_sharded_strategy()
    if fully_parallel:
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True), True)
    dist_checkpointing.save(state, str(tmp), sharded_strategy=strategy)

    (tmp / RANK_STATE_DIR).mkdir(exist_ok=True)
    rank_file = tmp / RANK_STATE_DIR / f"rank_{rank:05d}.pt"
    with open(rank_file, "wb") as handle:
        torch.save({**_rank_coords(), "rng": _rng_state(), "data_state": data_state}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    torch.distributed.barrier()

    names = _list_files(tmp) if rank == 0 else None
    box = [names]
    torch.distributed.broadcast_object_list(box, src=0)
    hashes = _distributed_hashes(tmp, box[0])
    if rank == 0:
        body = {"format_version": FORMAT_VERSION, "step": step,
                "consumed_samples": consumed_samples, "layout": current_layout(),
                "optimizer_sharding": OPTIMIZER_SHARDING if optimizer is not None else None,
                "config": config_dict, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "files": {n: {"size": (tmp / n).stat().st_size, "sha256": hashes[n]}
                          for n in box[0]}}
        _write_metadata(tmp, body)
        fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step already exists: replace it
            trash = save_dir / f".trash_{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            shutil.rmtree(trash)
        os.rename(tmp, final)
        fsync_dir(save_dir)
        atomic_write_bytes(save_dir / LATEST, (final.name + "\n").encode())
        if keep_last > 0:
            _apply_retention(save_dir, keep_last, keep_every)
        print(f"saved checkpoint {final} ({_size(body):.1f} MB, "
              f"{time.perf_counter() - started:.1f} s)", flush=True)
    torch.distributed.barrier()
    return final


def _size(body: dict) -> float:
    return sum(f["size"] for f in body["files"].values()) / 1e6


def _apply_retention(save_dir: Path, keep_last: int, keep_every: int) -> None:
    found = list_checkpoints(save_dir)
    keep = {step for step, _ in found[-keep_last:]}
    if keep_every > 0:
        keep |= {step for step, _ in found if step % keep_every == 0}
    for step, path in found:
        if step not in keep:
            trash = save_dir / f".trash_{path.name}"
            os.rename(path, trash)  # never leave a half-deleted step_* directory behind
            shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------- load

def check_model_config(path: Path, saved: dict, expected: dict) -> None:
    """CheckpointError listing every model-config field that differs."""
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as saved
    keys = sorted(set(saved) | set(expected))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {expected.get(k)!r}"
            for k in keys if saved.get(k) != expected.get(k)]
    if diff:
        raise CheckpointError(f"{path}: incompatible model config (" + "; ".join(diff) + ")")


def _load_optimizer(optimizer, state) -> None:
    """optimizer.load_state_dict, around a megatron 0.16 bug with torch Adam (no apex/TE).

    DistributedOptimizer.load_state_dict puts "step" into every parameter's Adam state and
    then, loading the `fully_reshardable` parameter state, copies every state key from the
    checkpoint, which has no "step" (it lives in the param groups): KeyError 'step'. So the
    parameter state is loaded here with the "step" entries set aside.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [state] if len(subs) == 1 else [state[k] for k in sorted(state)]
    for sub, sub_state in zip(subs, states):
        torch_adam = isinstance(getattr(sub, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))
        if not (isinstance(sub, DistributedOptimizer) and torch_adam
                and sub_state.get("param_state_sharding_type") == "fully_reshardable"):
            sub.load_state_dict(sub_state)
            continue
        sub_state = dict(sub_state)
        param_state = sub_state.pop("param_state")
        sub_state.pop("param_state_sharding_type")
        sub.load_state_dict(sub_state)  # param groups and step
        steps = {id(s): s.pop("step") for s in sub.optimizer.state.values() if "step" in s}
        try:
            sub.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for s in sub.optimizer.state.values():
                if id(s) in steps:
                    # load_state_dict gave all parameters ONE step tensor, and torch Adam
                    # increments it in place per parameter: give each its own.
                    s["step"] = steps[id(s)].clone()
    if len(subs) > 1:
        optimizer._synchronize_steps()


def load_checkpoint(path: str | Path, model_chunks, optimizer, scheduler, *,
                    expected_model_config: dict | None = None, verify: bool = True
                    ) -> CheckpointState:
    """Load checkpoint `path` into the (DDP-wrapped) model chunks, optimizer and scheduler.

    Collective. Verifies the files first (unless `verify=False`, e.g. when
    `resolve_resume` just did), refuses a checkpoint whose `config_dict["model"]` differs
    from `expected_model_config`, then restores tensors (resharding to this run's layout),
    the scheduler, and, when the layout is unchanged, this rank's RNG states.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    body = _verify_all_ranks(path) if verify else read_metadata(path)
    if expected_model_config is not None:
        check_model_config(path, body["config"].get("model", {}), expected_model_config)
    layout = current_layout()
    saved_layout = body["layout"]
    changed = any(saved_layout[k] != layout[k] for k in ("tp", "pp", "dp"))

    state = _sharded_state_dict(model_chunks, optimizer, is_loading=True)
    if body.get("optimizer_sharding") is None or optimizer is None:
        state.pop("optimizer", None)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the checkpoint's name
        raise CheckpointError(f"{path}: cannot load model/optimizer tensors "
                              f"({exc.__class__.__name__}: {exc})") from exc
    chunks = [_unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
    if "optimizer" in loaded:
        _load_optimizer(optimizer, loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])

    result = CheckpointState(path=path, step=int(body["step"]),
                             consumed_samples=int(body["consumed_samples"]),
                             config=body["config"], layout=saved_layout, layout_changed=changed)
    if changed:
        result.warnings.append(
            f"checkpoint {path} was saved with TP={saved_layout['tp']} PP={saved_layout['pp']} "
            f"DP={saved_layout['dp']}; this run has TP={layout['tp']} PP={layout['pp']} "
            f"DP={layout['dp']}: model and optimizer are resharded; RNG states are re-seeded")
    else:
        rank = torch.distributed.get_rank()
        rank_state = torch.load(path / RANK_STATE_DIR / f"rank_{rank:05d}.pt", weights_only=False)
        _set_rng_state(rank_state["rng"])
        result.rng_restored = True
        result.data_state = rank_state["data_state"]
    if saved_layout["dp"] == layout["dp"] and result.data_state is None and changed:
        # TP/PP changed but not DP: a DP rank's reader state is the same on all its ranks.
        from megatron.core import parallel_state

        dp_rank = parallel_state.get_data_parallel_rank()
        for file in sorted((path / RANK_STATE_DIR).glob("rank_*.pt")):
            rank_state = torch.load(file, weights_only=False)
            if rank_state["dp_rank"] == dp_rank:
                result.data_state = rank_state["data_state"]
                break
    return result


# -------------------------------------------------------------------------------- signals

class ShutdownSignal:
    """SIGTERM / SIGUSR1 -> "checkpoint and stop at the next step boundary".

    The handler only sets a flag; `requested()` (collective, every step) agrees across ranks
    with an all-reduce, so all ranks save and stop at the same step even if only one rank got
    the signal. Slurm: `#SBATCH --signal=B:USR1@120` sends SIGUSR1 two minutes before the limit.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def install(self) -> "ShutdownSignal":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0 and self.received is None:
            self.received = "a peer rank's signal"
        return flag.item() > 0

    def restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


__all__ = ["ShutdownSignal", "CheckpointError", "CheckpointState", "save_checkpoint", "load_checkpoint",
           "find_latest_complete", "resolve_resume", "verify_checkpoint", "read_metadata",
           "list_checkpoints", "step_dir_name", "check_model_config", "current_layout",
           "FORMAT_VERSION", "METADATA", "LATEST"]
