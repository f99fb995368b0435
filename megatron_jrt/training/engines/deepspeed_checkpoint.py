"""Checkpoints of DeepSpeed runs, in the store's crash-safe flow (`megatron_jrt.checkpoint`).

DeepSpeed writes its own files (`engine.save_checkpoint`: model states, one ZeRO optimizer
shard per rank, its zero_to_fp32.py, moved in from the save_dir) into the store's temporary folder
``save_dir/.tmp_step_XXXXXXX``; the per-rank RNG and reader states and the publication
(hashes, checkpoint.json, rename, `latest`, retention) are the megatron engine's, so
resume=auto, verification and retention work the same. checkpoint.json says
``engine: deepspeed`` and the ZeRO stage; each engine refuses the other's checkpoints.

Saves are synchronous (checkpoint.async_save does not apply). A resume needs the same
data-parallel size and ZeRO stage (DeepSpeed's ds_to_universal is not wired in).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from megatron_jrt.checkpoint import store
from megatron_jrt.checkpoint.state import (CheckpointState, SaveInProgress, _publish,
                                           _set_rng_state, _write_rank_state, check_engine,
                                           check_model_config, current_layout, prepare_save_dir)
from megatron_jrt.checkpoint.store import RANK_STATE_DIR, CheckpointError

ENGINE = "deepspeed"
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


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
