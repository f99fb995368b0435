"""A trained checkpoint as a model to evaluate: one process, the whole model, in eval mode.

The weights are resharded from whatever TP/PP layout saved them (megatron_jrt.checkpoint).
Fields that change no weight (`prefix_length`, `max_sequence_length`) may differ from the
training run's: a JRT model reads a longer test context with a longer prefix. Call
`megatron_jrt.distributed.init_distributed()` first (one rank, TP = PP = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_jrt.config import JRTModelConfig

WEIGHTLESS_FIELDS = ("prefix_length", "max_sequence_length")


@dataclass(frozen=True)
class TrainedModel:
    model: torch.nn.Module  # megatron_jrt.model.JRTModel, eval mode, on the current device
    config: JRTModelConfig  # as built (with any weightless changes)
    train_config: dict  # the run's config as saved ({} for a weights-only checkpoint)
    path: Path  # the checkpoint directory read

    def rebuilt(self, **changes) -> "TrainedModel":
        """The same weights in a model built with other weightless fields."""
        config = _changed(self.config, changes)
        if config == self.config:
            return self
        model = _build(config)
        model.load_state_dict(self.model.state_dict())
        return TrainedModel(model.eval(), config, self.train_config, self.path)


def load_trained_model(path: str | Path, **changes) -> TrainedModel:
    """Checkpoint `path` (or the newest complete one of a save_dir), verified, with `changes`."""
    from megatron_jrt.checkpoint import (CheckpointError, load_model_weights, read_metadata,
                                         resolve_resume)

    found, problems = resolve_resume(str(path), "", key="--model")
    if found is None:
        raise CheckpointError(f"--model {path}: no complete checkpoint; " + "; ".join(problems))
    body = read_metadata(found)
    saved = body["config"]["model"]
    config = _changed(JRTModelConfig(**saved), changes)
    model = _build(config)
    load_model_weights(found, [model], expected_model_config=saved, verify=False)
    return TrainedModel(model.eval(), config, body["config"].get("train", {}), found)


def _changed(config: JRTModelConfig, changes: dict) -> JRTModelConfig:
    weighty = sorted(set(changes) - set(WEIGHTLESS_FIELDS))
    if weighty:
        raise ValueError(f"{', '.join(weighty)} would change the weights; only "
                         f"{', '.join(WEIGHTLESS_FIELDS)} may differ from the checkpoint's")
    return config.replace(**changes)


def _build(config: JRTModelConfig) -> torch.nn.Module:
    from megatron_jrt.model import build_model

    model = build_model(config, config.to_transformer_config())
    return model.cuda() if torch.cuda.is_available() else model
