"""What a `jrt-train` run ends with: documented exit codes and the errors that map to them.

Launchers decide on these (the Slurm scripts requeue on STOPPED and retry ERROR a few times);
the run also writes the code, its name and the message to ``<run_dir>/exit.json``, because
torchrun reports any non-zero worker exit as its own exit 1.
"""
from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # trained to training.train_steps
    ERROR = 1  # anything unforeseen (a bug, a crashed peer): see the traceback file
    CONFIG = 2  # a config value or relation is wrong (ConfigError)
    DATA = 3  # shards, manifest, tokenizer or a split cannot serve the run (DataError, ...)
    CHECKPOINT = 4  # save_dir unusable or locked, a checkpoint missing or damaged, disk full
    NONFINITE = 5  # training.max_consecutive_nonfinite steps in a row had a NaN/inf loss
    STOPPED = 10  # a stop signal (SIGTERM, SIGUSR1, Ctrl-C): checkpointed, resume with auto
    STOPPED_UNSAVED = 11  # a stop signal without checkpoint.save_dir: nothing was saved
    ABORTED = 130  # a second Ctrl-C: stopped at once, no checkpoint


class DataError(ValueError):
    """The data the config points at cannot serve the run; the message names file and fix."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss."""


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code of a run that ended with `error`."""
    try:
        from data_prep.reader import ManifestError, ShardError
        from megatron_jrt.checkpoint import CheckpointError
        from megatron_jrt.config import ConfigError
    except ImportError:  # a broken install: `error` may be this very import failing
        return ExitCode.ERROR

    for kinds, code in (((ConfigError,), ExitCode.CONFIG),
                        ((DataError, ManifestError, ShardError), ExitCode.DATA),
                        ((CheckpointError,), ExitCode.CHECKPOINT),
                        ((NonFiniteLossError,), ExitCode.NONFINITE),
                        ((KeyboardInterrupt,), ExitCode.ABORTED)):
        if isinstance(error, kinds):
            return code
    return ExitCode.ERROR
