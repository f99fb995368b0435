"""Named model tensors of a checkpoint of either engine, merged to their global shapes, in one
process without a process group: the one reading seam of to-hf, jrt-generate and inspect.

- megatron (torch_dist): torch.distributed.checkpoint stores every tensor's global shape and
  each rank's piece of it, so preallocating the global tensors and loading with `no_dist=True`
  reassembles any TP/PP layout without megatron.
- deepspeed (`training.engine: deepspeed`, TP = PP = 1): DeepSpeed's zero_to_fp32 consolidates
  the fp32 master weights from every rank's ZeRO 1/2/3 partitions
  (`engines.deepspeed_checkpoint.read_fp32_weights`); the names are the same module's.

Which engine wrote a checkpoint is its checkpoint.json's `engine` (absent: megatron, from
before the engine seam); the files must match it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from checkpoints_tools.locate import VerifiedCheckpoint

ENGINES = ("megatron", "deepspeed")
TORCH_DIST_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the tensors


def checkpoint_engine(checkpoint: VerifiedCheckpoint) -> str:
    """"megatron" or "deepspeed": the engine that wrote `checkpoint`; CheckpointError naming
    the path when its checkpoint.json names another, or a layout that engine never writes, or
    when the files are not that engine's."""
    from megatron_jrt.checkpoint import CheckpointError

    path, body = checkpoint.path, checkpoint.body
    engine = body.get("engine", "megatron")
    if engine not in ENGINES:
        raise CheckpointError(f"{path}: written by engine {engine!r}, this version reads "
                              f"{' and '.join(ENGINES)} checkpoints; convert it with the "
                              "megatron-jrt version that wrote it")
    layout = body["layout"]
    if engine == "deepspeed" and (layout["tp"], layout["pp"]) != (1, 1):
        raise CheckpointError(f"{path}: checkpoint.json says engine deepspeed with "
                              f"TP={layout['tp']} PP={layout['pp']}, which jrt-train never "
                              "writes (DeepSpeed runs are TP=PP=1); it does not belong to "
                              "these files")
    if engine == "megatron" and not (path / TORCH_DIST_METADATA).is_file():
        raise CheckpointError(f"{path}: no torch_dist metadata ({TORCH_DIST_METADATA}) "
                              "although its checkpoint.json says engine megatron; the files "
                              "are not the ones jrt-train wrote")
    return engine


def read_model_tensors(checkpoint: VerifiedCheckpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """The model tensors `names` (megatron names, global shapes) of `checkpoint`, either
    engine's, on CPU: in their stored dtype (megatron) or fp32 (DeepSpeed's master weights)."""
    if checkpoint_engine(checkpoint) == "megatron":
        return read_tensors(checkpoint.path, names)
    from megatron_jrt.training.engines.deepspeed_checkpoint import read_fp32_weights

    state = read_fp32_weights(checkpoint.path)
    _check_names(checkpoint.path, names, state)
    return {name: state[name] for name in names}


def _check_names(checkpoint: Path, names: list[str], stored) -> None:
    missing = [name for name in names if name not in stored]
    if missing:
        raise ValueError(f"{checkpoint}: no tensor {missing[0]!r} ({len(missing)} of "
                         f"{len(names)} model tensors missing); is it a megatron_jrt checkpoint "
                         "of the model in its checkpoint.json?")


def read_tensors(checkpoint: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of torch_dist checkpoint directory `checkpoint`, on CPU in their
    stored dtype."""
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    _check_names(checkpoint, names, {name: value for name, value in stored.items()
                                     if isinstance(value, TensorStorageMetadata)})
    state = {name: torch.empty(stored[name].size, dtype=stored[name].properties.dtype)
             for name in names}
    with warnings.catch_warnings():  # one process is the point, not a surprise to warn about
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state
