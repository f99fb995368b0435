"""Named tensors of a torch_dist checkpoint, merged to their global shapes, in one process.

torch.distributed.checkpoint stores every tensor's global shape and each rank's piece of it,
so preallocating the global tensors and loading with `no_dist=True` reassembles any TP/PP
layout without megatron and without a process group.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata


def read_tensors(checkpoint: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of checkpoint directory `checkpoint`, on CPU in their stored dtype."""
    stored = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    missing = [name for name in names if not isinstance(stored.get(name), TensorStorageMetadata)]
    if missing:
        raise ValueError(f"{checkpoint}: no tensor {missing[0]!r} ({len(missing)} of "
                         f"{len(names)} model tensors missing); is it a megatron_jrt checkpoint "
                         "of the model in its checkpoint.json?")
    state = {name: torch.empty(stored[name].size, dtype=stored[name].properties.dtype)
             for name in names}
    with warnings.catch_warnings():  # one process is the point, not a surprise to warn about
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state
