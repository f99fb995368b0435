"""Start-up checks: everything a run will need is tried before step 0, not found at step 1000.

Each check runs where its answer is decided (rank 0 for shared folders, every rank for its
own data reader) and the outcome is agreed across ranks (`distributed.agree`), so a failure
stops every rank with the same one-line error instead of leaving peers waiting.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_jrt.checkpoint import CheckpointError, SaveDirLock, list_checkpoints
from megatron_jrt.checkpoint.store import remove_stale_tmp
from megatron_jrt.config import ConfigError
from megatron_jrt.distributed import agree, on_rank0
from megatron_jrt.errors import DataError


def prepare_run_dir(run_dir: Path, write_config: Callable[[Path], None]) -> None:
    """Create `logging.run_dir` and write the run's config into it (ConfigError if it cannot)."""
    def prepare() -> None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            write_config(run_dir / "config.yaml")
        except OSError as exc:
            raise ConfigError(f"logging.run_dir: cannot write {run_dir} ({exc.strerror or exc}); "
                              "choose a writable folder") from exc

    on_rank0(prepare)


def lock_save_dir(save_dir: str, resume: str) -> tuple[SaveDirLock | None, list[str]]:
    """Take `checkpoint.save_dir`'s lock on rank 0 and clear leftovers of killed saves.

    Returns (the lock on rank 0, None elsewhere or without a save_dir; notices to print).
    Creating the lock file is also the check that the folder is writable. A fresh start
    (`resume: none`) into a folder that holds checkpoints is said, not silently done.
    """
    if not save_dir:
        return None, []

    def take() -> tuple[SaveDirLock, list[str]]:
        try:
            lock = SaveDirLock(save_dir).acquire()
        except OSError as exc:
            raise CheckpointError(f"checkpoint.save_dir: cannot write {save_dir} "
                                  f"({exc.strerror or exc}); choose a writable folder") from exc
        notices = [lock.warning] if lock.warning else []
        found = list_checkpoints(save_dir)
        if found and resume == "none":
            notices.append(f"checkpoint.save_dir {save_dir} holds checkpoints up to step "
                           f"{found[-1][0]}, but checkpoint.resume is 'none': this run starts "
                           "at step 0 and its saves count as newer; set checkpoint.resume=auto "
                           "to continue instead")
        removed = remove_stale_tmp(Path(save_dir))
        if removed:
            notices.append(f"removed the leftovers of killed saves in {save_dir}: "
                           + ", ".join(removed))
        return lock, notices

    taken = on_rank0(take)
    return taken if taken is not None else (None, [])


def open_data(open_split: Callable[[str], object], splits: list[str], *,
              eval_steps: int) -> None:
    """Open every data split the run will read; DataError naming the split and the fix."""
    error = None
    for split in splits:
        try:
            open_split(split)
        except (ValueError, FileNotFoundError, OSError) as exc:
            hint = ("; or set training.eval_steps=0 to train without validation"
                    if split == "valid" and eval_steps else "")
            error = DataError(f"{exc}{hint}")
            error.__cause__ = exc
            break
    agree(error)
