"""A Hugging Face JRT model directory (to-hf's output): written from, and read into, a state dict.

Written as `JRTForCausalLM.save_pretrained` writes it (config.json with auto_map, the custom
code files, safetensors sharded above `max_shard_size`), so every converter produces the same
directory; read back with safetensors alone (no model built, no custom code executed). The model
written is `model_from_state`'s, which jrt-generate also runs in memory from a checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from megatron_jrt.hf.configuration_jrt import JRTConfig

if TYPE_CHECKING:
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def model_from_state(state: dict[str, Tensor], config: JRTConfig) -> JRTForCausalLM:
    """A JRTForCausalLM in eval mode whose parameters are the tensors of `state` themselves
    (built on the meta device: no random init, no copy), lm_head tied to the embedding."""
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    with torch.device("meta"):
        model = JRTForCausalLM(config)
    model.load_state_dict({"lm_head.weight": state["model.embed_tokens.weight"], **state},
                          strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def write_hf_dir(state: dict[str, Tensor], config: JRTConfig, out: str | Path, *,
                 max_shard_size: str = "5GB") -> None:
    """save_pretrained of a JRTForCausalLM holding `state` (with or without lm_head: tied)."""
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    model = model_from_state(state, config)
    JRTConfig.register_for_auto_class()
    JRTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(Path(out), max_shard_size=max_shard_size)


def read_hf_dir(directory: str | Path) -> tuple[JRTConfig, dict[str, Tensor]]:
    """The config and tensors of HF directory `directory`, sharded or not, on CPU."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory}: no config.json; give a directory written by "
                         "`jrt-convert to-hf`")
    config = JRTConfig.from_pretrained(directory)
    if (directory / INDEX_FILE).is_file():
        weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise ValueError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE}; give a "
                         "directory written by `jrt-convert to-hf`")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(directory / name))
    return config, state
