"""A megatron_jrt checkpoint read as the Hugging Face model's config, tensors and tokenizer.

`jrt-convert to-hf` writes what this returns to a directory; `jrt-generate` builds the model from
it in memory. One reader, so that both see the same weights and the same tokenizer: the tensors
merged from any TP/PP layout, or consolidated from a DeepSpeed run's ZeRO partitions, in one
process without a process group (read_tensors), mapped by
megatron_jrt.hf.weights (vocabulary padding dropped, the LM head the embedding's tensor), and the
tokenizer the run trained with (its recorded `data.tokenizer`) unless the caller names another.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from checkpoints_tools.locate import verified_checkpoint
from checkpoints_tools.read_tensors import checkpoint_engine, read_model_tensors
from megatron_jrt.hf.configuration_jrt import JRTConfig

if TYPE_CHECKING:
    from data_prep.tokenizer import Tokenizer


@dataclass(frozen=True)
class HFCheckpoint:
    path: Path  # the checkpoint read (a save_dir's newest when given a save_dir)
    config: JRTConfig  # eos / pad ids from the tokenizer when there is one
    state: dict[str, Tensor]  # HF names; lm_head.weight is the embedding's tensor (tied)
    tokenizer: Tokenizer | None  # None when the caller names none and the run's is absent
    recorded_tokenizer: str  # the run's data.tokenizer as saved ("" for mock-data runs)


def recorded_tokenizer(body: dict) -> str:
    """The run's data.tokenizer from a checkpoint.json body ("" when none was recorded)."""
    return body["config"].get("train", {}).get("data", {}).get("tokenizer", "")


def _present(spec: str) -> bool:
    """Whether a tokenizer spec (a .model path or gpt2:/dir) names something on this machine."""
    return bool(spec) and Path(spec.removeprefix("gpt2:")).exists()


def read_as_hf(checkpoint: str | Path, *, tokenizer: str | None = None) -> HFCheckpoint:
    """Checkpoint `checkpoint` (or a save_dir's newest that verifies) as the HF model's parts.

    `tokenizer` (a SentencePiece .model or "gpt2:/dir") replaces the run's recorded one, which
    is used only when it exists here. ValueError naming the tokenizer when it does not load or
    has more ids than the model; CheckpointError when no checkpoint verifies."""
    from data_prep.tokenizer import load_tokenizer
    from megatron_jrt.hf.weights import hf_config, megatron_names, megatron_to_hf

    found = verified_checkpoint(checkpoint)
    checkpoint_engine(found)  # before the tokenizer: a checkpoint it cannot read says so first
    config = hf_config(found.body["config"]["model"])
    recorded = recorded_tokenizer(found.body)
    spec = tokenizer or (recorded if _present(recorded) else None)
    named = f"--tokenizer {spec}" if tokenizer else f"the run's data.tokenizer {spec}"
    loaded = None
    if spec:
        try:
            loaded = load_tokenizer(spec)
        except (OSError, ImportError) as exc:
            raise ValueError(f"{named}: {exc}") from None
        config.eos_token_id, config.pad_token_id = loaded.eod_id, loaded.pad_id
        if loaded.vocab_size > config.vocab_size:
            raise ValueError(f"{named}: {loaded.vocab_size} ids, the model has "
                             f"{config.vocab_size}; give the tokenizer the run trained with")
    state = megatron_to_hf(read_model_tensors(found, megatron_names(config)), config)
    return HFCheckpoint(found.path, config, state, loaded, recorded)
