"""Checkpoints: megatron-core dist_checkpointing, published atomically, verified on load.

``store`` owns the files (write to a temporary folder, hash, publish by rename, retain,
verify, find the newest); ``state`` captures and restores the run (collective calls);
``saver`` runs a training run's saves, synchronously or in the background; ``lock`` keeps
two runs out of one save_dir. docs/CHECKPOINTS.md describes the rules.
"""
from megatron_jrt.checkpoint.lock import SaveDirLock, SaveDirLocked
from megatron_jrt.checkpoint.saver import CheckpointSaver
from megatron_jrt.checkpoint.state import (CheckpointState, check_model_config, current_layout,
                                           load_checkpoint, load_model_weights, resolve_resume)
from megatron_jrt.checkpoint.store import (FORMAT_VERSION, LATEST, METADATA, CheckpointError,
                                           find_latest_complete, list_checkpoints, read_metadata,
                                           step_dir_name, verify_checkpoint)

__all__ = ["CheckpointError", "CheckpointState", "CheckpointSaver", "SaveDirLock", "SaveDirLocked",
           "load_checkpoint", "load_model_weights", "find_latest_complete",
           "resolve_resume", "verify_checkpoint", "read_metadata", "list_checkpoints",
           "step_dir_name", "check_model_config", "current_layout", "FORMAT_VERSION", "METADATA",
           "LATEST"]
