"""Capture and restore a run's state with megatron-core dist_checkpointing (collective calls).

What a checkpoint restores: model tensors (megatron ShardedTensors), the distributed
optimizer's state in megatron's ``fully_reshardable`` format (gathered over DP at save, on the
device: ``optimizer_gather``; one tensor per parameter state with the parameter's own sharding
in model space; megatron 0.16's ``fully_sharded_model_space`` fails with "flattened_range is not
supported"), so a checkpoint loads into any TP/PP/DP layout; the LR scheduler; step, consumed
samples and tokens; and per rank the RNG states and the data reader's position. Those per-rank parts are restored only
when the layout is unchanged (``CheckpointState.layout_changed``; the trainer then re-derives
the data position from the consumed samples).

Files, verification and publication are ``megatron_jrt.checkpoint.store``'s; here every rank
takes part, and every decision that could differ between ranks (a file that fails to verify,
too little free space) is agreed before anyone acts on it.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_jrt.checkpoint import store
from megatron_jrt.checkpoint.optimizer_gather import gathering_on_device
from megatron_jrt.checkpoint.store import METADATA, RANK_STATE_DIR, CheckpointError
from megatron_jrt.distributed import agree, on_rank0
from megatron_jrt.fsutil import atomic_write_bytes, sha256_file
from megatron_jrt.megatron_workarounds import init_torch_adam_state, load_optimizer_state
from megatron_jrt.platform import current_device

OPTIMIZER_SHARDING = "fully_reshardable"  # model-space tensors: reshard across TP, PP, DP
_HASHES = ".sha256"  # the writers' hashes, inside a checkpoint's tmp folder until publication


@dataclass
class CheckpointState:
    """What `load_checkpoint` restored besides the model and optimizer tensors."""

    path: Path
    step: int
    consumed_samples: int
    consumed_tokens: int
    config: dict  # what the saver passed as config_dict
    layout: dict  # the saving run's {"tp", "pp", "dp", "world"}
    layout_changed: bool  # TP, PP or DP differ from this run's
    data_state: dict | None = None  # this rank's reader state; None when DP changed
    rng_restored: bool = False
    warnings: list[str] = field(default_factory=list)


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


def _sharded_state_dict(model_chunks, optimizer, *, is_loading: bool) -> dict:
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        if is_loading:
            init_torch_adam_state(optimizer)
        gather = (contextlib.nullcontext() if is_loading
                  else gathering_on_device(optimizer, current_device()))
        with gather:
            state["optimizer"] = optimizer.sharded_state_dict(
                state, is_loading=is_loading,
                metadata={"distrib_optim_sharding_type": OPTIMIZER_SHARDING})
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


# ------------------------------------------------------------------ agreement across ranks

def _distributed_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    """sha256 of `names`, each rank hashing every world-th file (all ranks get the result)."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    mine = {n: sha256_file(directory / n) for i, n in enumerate(names) if i % world == rank}
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def _verify_all_ranks(path: Path) -> dict:
    """verify_checkpoint with hashing split across ranks; every rank raises if any rank failed."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    body, error = None, None
    try:
        body = store.verify_checkpoint(path, shard=(rank, world))
    except CheckpointError as exc:
        error = exc
    agree(error)
    return body


def resolve_resume(resume: str, save_dir: str, key: str = "checkpoint.resume"
                   ) -> tuple[Path | None, list[str]]:
    """(the checkpoint `checkpoint.resume` names or None: start fresh, warnings), verified.

    "none" -> None; "auto" -> the checkpoint published last in `save_dir` that verifies
    (None if there is none; a warning for each later damaged one); a path -> that checkpoint
    (a directory holding step directories is searched like "auto"), and an error if it does
    not verify. Collective: every rank gets the same answer. `key` names the setting in errors.
    """
    if resume == "none":
        return None, []
    target = Path(save_dir if resume == "auto" else resume)
    if resume != "auto" and (target / METADATA).exists():
        _verify_all_ranks(target)
        return target, []
    if resume != "auto" and not store.list_checkpoints(target):
        raise CheckpointError(f"{key}: {target} is not a checkpoint (no {METADATA}) "
                              "and holds no step_* checkpoints")
    return store.find_latest_complete(target, verify=_verify_all_ranks)


# ----------------------------------------------------------------------------------- save

@dataclass
class SaveInProgress:
    """A checkpoint whose state is captured and whose tensor files are still to be written.

    `request` is megatron's AsyncRequest: its async part writes this rank's tensor files
    (and hashes them, so that the publication does not read gigabytes back on the training
    thread); its finalize functions, collective and run after every rank's part finished,
    write dist_checkpointing's metadata and then publish. Run it with `request.execute_sync()`
    or an `AsyncCallsQueue` (``megatron_jrt.checkpoint.saver``).
    """

    step: int
    path: Path  # the published name, save_dir/step_XXXXXXX
    request: Any = None
    size: int = 0  # bytes of the checkpoint, known on rank 0 once published
    state_dict_s: float = 0.0  # building the sharded state dicts (the optimizer's gather too)


class SavePlanner:
    """megatron's save strategy for every save of one run (fully parallel over DP ranks).

    A run's checkpoints all have one structure (the same tensors, shapes and shardings), so
    the first save plans it (which rank writes what, the files' metadata; the sharding
    checked for gaps and overlaps) and later saves reuse that plan, as Megatron-LM's
    ``--ckpt-assume-constant-structure`` does.
    """

    def __init__(self, fully_parallel: bool = True):
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.serialization import (
            get_default_save_sharded_strategy,
        )
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        strategy = get_default_save_sharded_strategy()
        strategy.use_cached_ckpt_structure = True
        if fully_parallel:
            strategy = FullyParallelSaveStrategyWrapper(
                strategy, parallel_state.get_data_parallel_group(with_context_parallel=True),
                do_cache_distribution=True)
        self.strategy = strategy
        self.planned = False  # a save has planned (and validated) the structure


def prepare_save_dir(save_dir: Path, tmp: Path) -> None:
    """Before a save writes into `tmp` (collective; rank 0 acts): leftovers of killed saves
    removed, the free space checked against the previous checkpoint's size, `tmp` created."""
    def prepare() -> None:
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            store.remove_stale_tmp(save_dir)  # e.g. the leftover of a killed save of this step
            store.check_free_space(save_dir, store.previous_size(save_dir))
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise CheckpointError(f"checkpoint.save_dir {save_dir}: cannot write ({exc})") from exc

    on_rank0(prepare)


def start_save(save_dir: str | Path, step: int, model_chunks, optimizer, scheduler, *,
               config_dict: dict, data_state: dict | None, consumed_samples: int,
               consumed_tokens: int, keep_last: int = 0, keep_every: int = 0,
               planner: SavePlanner | None = None) -> SaveInProgress:
    """Capture the state of `step` into `save_dir/.tmp_step_XXXXXXX` (collective).

    Written now: the scheduler, step and counters (common.pt) and this rank's RNG states
    and reader state `data_state` (rank_state/); the model and optimizer tensors are
    referenced by the returned request, which writes them. Before anything is written, the
    free space is checked against the previous checkpoint's size and leftovers of killed
    saves are removed (so call it only when no other save of this run is in progress). The
    publication appended to the request writes checkpoint.json, renames, points `latest`
    at it, and with `keep_last` > 0 deletes older checkpoints except the last `keep_last`
    and every step divisible by `keep_every` (> 0). `planner`: the run's SavePlanner, whose
    plan later saves reuse (None: a new one).
    """
    from megatron.core import dist_checkpointing

    planner = planner or SavePlanner()
    save_dir = Path(save_dir)
    saving = SaveInProgress(step, save_dir / store.step_dir_name(step))
    tmp = store.tmp_dir(save_dir, step)
    prepare_save_dir(save_dir, tmp)

    started = time.perf_counter()
    state = _sharded_state_dict(model_chunks, optimizer, is_loading=False)
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["step"], state["consumed_samples"] = step, consumed_samples
    saving.state_dict_s = time.perf_counter() - started
    request = dist_checkpointing.save(state, str(tmp), sharded_strategy=planner.strategy,
                                      async_sharded_save=True,
                                      validate_access_integrity=not planner.planned)
    planner.planned = True
    _write_rank_state(tmp, data_state)  # after save(): it expects an empty folder

    fields = {"format_version": store.FORMAT_VERSION, "step": step,
              "consumed_samples": consumed_samples, "consumed_tokens": consumed_tokens,
              "layout": current_layout(),
              "optimizer_sharding": OPTIMIZER_SHARDING if optimizer is not None else None,
              "config": config_dict}
    if request.async_fn is not None:  # None: this rank writes no tensor file
        request = request._replace(async_fn=partial(_write_then_hash, request.async_fn, tmp))
    request.add_finalize_fn(partial(_publish, saving, tmp, fields, keep_last, keep_every))
    saving.request = request
    return saving


def _write_rank_state(tmp: Path, data_state: dict | None) -> None:
    (tmp / RANK_STATE_DIR).mkdir(exist_ok=True)
    rank = torch.distributed.get_rank()
    with open(tmp / RANK_STATE_DIR / f"rank_{rank:05d}.pt", "wb") as handle:
        torch.save({**_rank_coords(), "rng": _rng_state(), "data_state": data_state}, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_then_hash(write, tmp: Path, rank: int, buckets: list, results_queue) -> None:
    """megatron's write of this rank's tensor files, then their sha256 into tmp/.sha256/.

    Runs where the write runs (in the background writer with async_save), so the hashes
    the publication needs of the large files are ready when it starts. A file it cannot
    hash is left to the publication.
    """
    write(rank, buckets, results_queue)
    try:
        hashes = {Path(path).name: sha256_file(Path(path)) for path, _, _ in buckets}
        (tmp / _HASHES).mkdir(exist_ok=True)
        atomic_write_bytes(tmp / _HASHES / f"rank_{rank:05d}.json", json.dumps(hashes).encode())
    except OSError:
        pass


def _collect_hashes(tmp: Path) -> dict[str, str]:
    """The hashes the background writers computed (removing them); {} where none are left."""
    folder = tmp / _HASHES
    hashes: dict[str, str] = {}
    for file in sorted(folder.glob("rank_*.json")):
        hashes.update(json.loads(file.read_text()))
    shutil.rmtree(folder, ignore_errors=True)
    return hashes


def _publish(saving: SaveInProgress, tmp: Path, fields: dict, keep_last: int,
             keep_every: int) -> None:
    """Hash what the writers did not, write checkpoint.json, rename, `latest`, retention.

    Collective, once every rank's files are written; rank 0 publishes, its error is
    raised on every rank.
    """
    listing = None
    if torch.distributed.get_rank() == 0:
        known = _collect_hashes(tmp)
        names = store.list_files(tmp)
        listing = (names, {n: known[n] for n in names if n in known})
    box = [listing]
    torch.distributed.broadcast_object_list(box, src=0)
    names, known = box[0]
    hashes = {**known, **_distributed_hashes(tmp, [n for n in names if n not in known])}

    def publish() -> None:
        save_dir = saving.path.parent
        body = {**fields, "sequence": store.next_sequence(save_dir), "saved_at": store.saved_at(),
                "files": {n: {"size": (tmp / n).stat().st_size, "sha256": hashes[n]}
                          for n in names}}
        store.publish(tmp, saving.path, body, keep_last=keep_last, keep_every=keep_every)
        saving.size = store.checkpoint_size(body)

    on_rank0(publish)


# ----------------------------------------------------------------------------------- load

def check_model_config(path: Path, saved: dict, expected: dict, ignore: tuple[str, ...] = ()
                       ) -> None:
    """CheckpointError listing every model-config field that differs (except `ignore`)."""
    expected = json.loads(json.dumps(expected))  # tuples -> lists, as saved
    keys = sorted((set(saved) | set(expected)) - set(ignore))
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {expected.get(k)!r}"
            for k in keys if saved.get(k) != expected.get(k)]
    if diff:
        raise CheckpointError(f"{path}: incompatible model config (" + "; ".join(diff) + ")")


def check_engine(path: Path, body: dict, engine: str) -> None:
    """CheckpointError unless checkpoint `path` was written by `engine` (each engine's files
    are its own; checkpoints from before the engine seam are megatron's)."""
    saved = body.get("engine", "megatron")
    if saved != engine:
        raise CheckpointError(f"{path}: a checkpoint of the {saved} engine, this run has "
                              f"training.engine={engine}; resume it with training.engine={saved}")


def load_model_weights(path: str | Path, model_chunks, *, expected_model_config: dict,
                       verify: bool = True) -> dict:
    """Only the model tensors of checkpoint `path`, resharded to this layout.

    For `checkpoint.init_from`: no optimizer, scheduler, RNG or data state is read, so a
    training checkpoint and a weights-only one (`jrt-convert from-hf`) both work. Verifies
    the files first unless `verify=False` (`resolve_resume` just did). Returns the
    checkpoint's metadata body. Collective.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    body = _verify_all_ranks(path) if verify else store.read_metadata(path)
    check_engine(path, body, "megatron")
    # the initialisation scale does not matter to weights that replace the initialisation
    check_model_config(path, body["config"].get("model", {}), expected_model_config,
                       ignore=("init_std",))
    try:
        loaded = dist_checkpointing.load(_model_sharded_state_dict(model_chunks), str(path))
    except Exception as exc:  # noqa: BLE001 - re-raised with the checkpoint's name
        raise CheckpointError(f"{path}: cannot load the model tensors "
                              f"({exc.__class__.__name__}: {exc})") from exc
    _load_model(model_chunks, loaded)
    return body


def _load_model(model_chunks, loaded: dict) -> None:
    chunks = [_unwrap(c) for c in model_chunks]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"])


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
    body = _verify_all_ranks(path) if verify else store.read_metadata(path)
    check_engine(path, body, "megatron")
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
    _load_model(model_chunks, loaded)
    if "optimizer" in loaded:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])

    result = CheckpointState(path=path, step=int(body["step"]),
                             consumed_samples=int(body["consumed_samples"]),
                             consumed_tokens=int(body["consumed_tokens"]),
                             config=body["config"], layout=saved_layout, layout_changed=changed)
    if changed:
        result.warnings.append(
            f"checkpoint {path} was saved with TP={saved_layout['tp']} PP={saved_layout['pp']} "
            f"DP={saved_layout['dp']}; this run has TP={layout['tp']} PP={layout['pp']} "
            f"DP={layout['dp']}: model and optimizer are resharded; RNG states are re-seeded")
    elif (rank_file := path / RANK_STATE_DIR / f"rank_{torch.distributed.get_rank():05d}.pt"
          ).is_file():  # absent in a weights-only checkpoint (jrt-convert from-hf)
        rank_state = torch.load(rank_file, weights_only=False)
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
