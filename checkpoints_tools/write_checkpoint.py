"""Write megatron model tensors as a jrt-train checkpoint, in one process, with no process group.

torch.distributed.checkpoint stores each tensor whole (`no_dist=True`); megatron's torch_dist
loader then cuts any TP/PP layout out of it. Besides the tensors, dist_checkpointing needs its
`metadata.json` (backend) and `common.pt` (the non-tensor part of the state dict), and each
megatron linear layer an `_extra_state` object (None for the local layers jrt-train builds).
The checkpoint holds the model only: no optimizer state, no LR schedule, no per-rank RNG or
data state (no rank_state/), so it suits starting a run from its weights, not resuming one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor

from megatron_jrt.checkpoint import store
from megatron_jrt.checkpoint.store import CheckpointError
from megatron_jrt.fsutil import sha256_file
from megatron_jrt.hf.weights import MEGATRON_EMBEDDING

STEP = 0
DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
COMMON_STATE = {"scheduler": None, "step": STEP, "consumed_samples": 0}
MODEL_ONLY_LAYOUT = {"tp": 1, "pp": 1, "dp": 1, "world": 1}


def _extra_states(tensors: dict[str, Tensor]) -> dict[str, list[None]]:
    """The `_extra_state` ShardedObject of every linear layer (each 2-D weight but the
    embedding), as megatron's torch_dist strategy stores it: the list of the objects' data,
    here [None], which dcp.save serialises with torch.save."""
    return {f"{name.removesuffix('.weight')}._extra_state/shard_0_1": [None]
            for name, tensor in tensors.items()
            if name.endswith(".weight") and tensor.dim() == 2 and name != MEGATRON_EMBEDDING}


def write_model_checkpoint(tensors: dict[str, Tensor], model_config: dict, save_dir: str | Path
                           ) -> Path:
    """Publish `save_dir/step_0000000` holding `tensors` (megatron names, global shapes) with
    checkpoint.json config {"model": model_config, "train": {}}; the checkpoint's path."""
    save_dir = Path(save_dir)
    if store.list_checkpoints(save_dir):
        raise CheckpointError(f"{save_dir}: already holds step_* checkpoints; write the "
                              "converted one into a new or empty directory")
    tmp, final = store.tmp_dir(save_dir, STEP), save_dir / store.step_dir_name(STEP)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dcp.save({**tensors, **_extra_states(tensors)}, checkpoint_id=str(tmp), no_dist=True)
    torch.save(COMMON_STATE, tmp / "common.pt")
    (tmp / "metadata.json").write_text(json.dumps(DIST_METADATA))
    body = {"format_version": store.FORMAT_VERSION, "step": STEP,
            "sequence": store.next_sequence(save_dir), "consumed_samples": 0,
            "consumed_tokens": 0, "layout": MODEL_ONLY_LAYOUT, "optimizer_sharding": None,
            "config": {"model": model_config, "train": {}}, "saved_at": store.saved_at(),
            "files": {name: {"size": (tmp / name).stat().st_size,
                             "sha256": sha256_file(tmp / name)}
                      for name in store.list_files(tmp)}}
    store.publish(tmp, final, body, keep_last=0, keep_every=0)
    return final
