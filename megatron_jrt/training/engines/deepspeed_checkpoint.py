"""Checkpoints of DeepSpeed runs, in the store's crash-safe flow (`megatron_jrt.checkpoint`).

DeepSpeed writes its own files (`engine.save_checkpoint`: model states, one ZeRO optimizer
shard per rank, its zero_to_fp32.py, moved in from the save_dir) into the store's temporary folder
``save_dir/.tmp_step_XXXXXXX``; the per-rank RNG and reader states and the publication
(hashes, checkpoint.json, rename, `latest`, retention) are the megatron engine's, so
resume=auto, verification and retention work the same. checkpoint.json says
``engine: deepspeed`` and the ZeRO stage; each engine refuses the other's checkpoints.

Saves are synchronous (checkpoint.async_save does not apply). A resume needs the same
data-parallel size and ZeRO stage (DeepSpeed's ds_to_universal is not wired in).

Read back without DeepSpeed's engine or a process group (`jrt-convert to-hf`, `jrt-generate`,
`jrt-ckpt inspect`): `read_fp32_weights` consolidates the fp32 master weights from every rank's
ZeRO partitions with DeepSpeed's own zero_to_fp32; `weight_shapes` lists them cheaply.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from megatron_jrt.checkpoint import store
from megatron_jrt.checkpoint.state import (CheckpointState, SaveInProgress, _publish,
                                           _set_rng_state, _write_rank_state, check_engine,
                                           check_model_config, current_layout, prepare_save_dir)
from megatron_jrt.checkpoint.store import RANK_STATE_DIR, CheckpointError

ENGINE = "deepspeed"
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
# ZeRO-1/2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_R_mp_rank_00_model_states.pt per rank
MODEL_STATES = "*mp_rank_00_model_states.pt"


class DeepSpeedSaver:
    """Synchronous saves of a DeepSpeed run (`engines.base.Saver`; every call collective)."""

    def __init__(self, save_dir: str | Path, engine, *, config_dict: dict, keep_last: int,
                 keep_every: int):
        self._save_dir = Path(save_dir)
        self._engine = engine  # engines.deepspeed_engine.DeepSpeedEngine
        self._config_dict = config_dict
        self._keep = (keep_last, keep_every)

    def save(self, step: int, *, data_state: dict | None, consumed_samples: int,
             consumed_tokens: int) -> None:
        """Write `step` under its temporary name, then publish it (on return it is `latest`)."""
        started = time.perf_counter()
        tmp = store.tmp_dir(self._save_dir, step)
        prepare_save_dir(self._save_dir, tmp)
        engine = self._engine
        engine.engine.save_checkpoint(str(self._save_dir), tag=tmp.name, save_latest=False,
                                      client_state={"scheduler": engine.scheduler.state_dict()})
        _write_rank_state(tmp, data_state)
        if torch.distributed.get_rank() == 0:
            _move_recovery_scripts(self._save_dir, tmp)
        torch.distributed.barrier()  # every rank's files are written before they are listed
        saving = SaveInProgress(step, self._save_dir / store.step_dir_name(step))
        fields = {"format_version": store.FORMAT_VERSION, "step": step,
                  "consumed_samples": consumed_samples, "consumed_tokens": consumed_tokens,
                  "layout": current_layout(), "engine": ENGINE, "zero_stage": engine.zero_stage,
                  "optimizer_sharding": f"deepspeed_zero{engine.zero_stage}",
                  "config": self._config_dict}
        _publish(saving, tmp, fields, *self._keep)
        if torch.distributed.get_rank() == 0:
            print(f"saved checkpoint {saving.path} ({saving.size / 1e6:.1f} MB, "
                  f"{time.perf_counter() - started:.1f} s)", flush=True)

    def poll(self, step: int) -> None:
        """Nothing is pending between steps: saves are synchronous."""

    def finish(self) -> None:
        """Nothing is pending: saves are synchronous."""

    def __enter__(self) -> "DeepSpeedSaver":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        return None


def _move_recovery_scripts(save_dir: Path, tmp: Path) -> None:
    """DeepSpeed copies zero_to_fp32.py (and zero_to_torch.py) into the save_dir itself;
    they belong to the checkpoint, whose files they read."""
    for script in RECOVERY_SCRIPTS:
        if (save_dir / script).is_file():
            os.replace(save_dir / script, tmp / script)


def load_deepspeed_checkpoint(path: Path, engine, expected_model_config: dict
                              ) -> CheckpointState:
    """Restore a DeepSpeed checkpoint (verified by `resolve_resume`) into `engine` (collective).

    Model, ZeRO optimizer shards and the LR schedule's position through DeepSpeed; this rank's
    RNG states and reader state from rank_state/.
    """
    path = Path(path)
    body = store.read_metadata(path)
    check_engine(path, body, ENGINE)
    check_model_config(path, body["config"].get("model", {}), expected_model_config)
    layout, saved = current_layout(), body["layout"]
    if saved["dp"] != layout["dp"] or body.get("zero_stage") != engine.zero_stage:
        raise CheckpointError(
            f"{path}: saved with DP={saved['dp']} and ZeRO stage {body.get('zero_stage')}, this "
            f"run has DP={layout['dp']} and training.zero_stage={engine.zero_stage}; resuming a "
            "DeepSpeed checkpoint with another rank count or stage is not supported yet")
    loaded, client_state = engine.engine.load_checkpoint(str(path.parent), tag=path.name,
                                                         load_lr_scheduler_states=False)
    if loaded is None or client_state is None or "scheduler" not in client_state:
        raise CheckpointError(f"{path}: DeepSpeed could not load it (no model states)")
    engine.scheduler.load_state_dict(client_state["scheduler"])
    result = CheckpointState(path=path, step=int(body["step"]),
                             consumed_samples=int(body["consumed_samples"]),
                             consumed_tokens=int(body["consumed_tokens"]),
                             config=body["config"], layout=saved, layout_changed=False)
    rank_file = path / RANK_STATE_DIR / f"rank_{torch.distributed.get_rank():05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False)
    _set_rng_state(rank_state["rng"])
    result.rng_restored, result.data_state = True, rank_state["data_state"]
    return result


def _model_states(path: Path) -> list[Path]:
    """The model-states files of DeepSpeed checkpoint `path`, or a CheckpointError."""
    files = sorted(path.glob(MODEL_STATES))
    if not files:
        raise CheckpointError(f"{path}: no DeepSpeed model states ({MODEL_STATES}) although "
                              "its checkpoint.json says engine deepspeed; the files are not "
                              "the ones jrt-train wrote")
    return files


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name and shape of every model parameter of DeepSpeed checkpoint `path`, from its
    model states (memory-mapped, nothing consolidated); in parameter-group order."""
    path = Path(path)
    states = torch.load(_model_states(path)[0], map_location="cpu", mmap=True,
                        weights_only=False)  # DeepSpeed's own pickle (config, torch.Size)
    return {name: tuple(shape) for group in states["param_shapes"]
            for name, shape in group.items()}


def read_fp32_weights(path: str | Path) -> dict[str, Tensor]:
    """The model's fp32 weights from DeepSpeed checkpoint `path` (ZeRO 1, 2 or 3, any number of
    ranks), consolidated by DeepSpeed's zero_to_fp32 in this process, on CPU, under the
    module's parameter names (megatron's). DeepSpeed's messages go to stderr, so that the
    stdout of the calling command stays its own.

    ValueError when deepspeed is not installed; CheckpointError when zero_to_fp32 fails."""
    path = Path(path)
    _model_states(path)
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as exc:
            raise ValueError(f"{path}: a checkpoint of the DeepSpeed engine; reading it needs "
                             f"the deepspeed package: pip install -e \".[deepspeed]\" ({exc})"
                             ) from None
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except Exception as exc:  # noqa: BLE001 - one line naming the checkpoint
            raise CheckpointError(f"{path}: DeepSpeed's zero_to_fp32 cannot consolidate it "
                                  f"({exc.__class__.__name__}: {exc})") from None
