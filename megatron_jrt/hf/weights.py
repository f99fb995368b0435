"""megatron_jrt checkpoint tensors <-> the Hugging Face JRT model's, and the config between them.

megatron's fused layouts (global tensors as a torch_dist checkpoint stores them, whatever the
TP/PP layout of the run that saved them):
- PLA `linear_qkv` [H * (f + f + dv), d]: per head [q | k | v]; `linear_kv_enc`
  [H * (f + dv), d]: per head [k_enc | v_enc] (megatron_jrt.mixers.pla).
- SWA `linear_qkv` [3d, d]: per head (one query group per head) [q | k | v]
  (megatron SelfAttention.get_query_key_value_tensors).
- MLP `linear_fc1` [2 * ffn, d]: [gate | up], silu on the first half (megatron MLP glu); the
  checkpoint holds the global halves (swiglu sharded factory), not the per-rank interleaving.
- BaseConv `in_proj` [4d, d] + bias: [u1 | u2] likewise; `conv_weight` [2d, 1, k] for u1.
- The embedding is padded to `padded_vocab_size` rows; the output layer is tied to it.

One table (`tensor_pairs`) says which HF tensors each megatron tensor fuses, so that
`megatron_to_hf` and `hf_to_megatron` are exact inverses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_jrt.hf.configuration_jrt import JRTConfig

MEGATRON_EMBEDDING = "embedding.word_embeddings.weight"
HF_EMBEDDING = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"

# Fields that JRTConfig and megatron_jrt.config.JRTModelConfig share under the same name.
_SHARED_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "layer_pattern",
                  "feature_dim", "prefix_length", "swa_window", "conv_kernel", "rotary_base",
                  "norm_eps", "max_sequence_length")

# Per mixer letter: megatron tensor (under decoder.layers.{i}.self_attention.) -> HF mixer
# tensors (under model.layers.{i}.mixer.) it fuses, in order, per head for the fused ones.
_MIXER_TENSORS: dict[str, dict[str, list[str]]] = {
    "P": {"linear_qkv.weight": ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
          "linear_kv_enc.weight": ["k_enc_proj.weight", "v_enc_proj.weight"],
          "linear_proj.weight": ["o_proj.weight"]},
    "S": {"linear_qkv.weight": ["q_proj.weight", "k_proj.weight", "v_proj.weight"],
          "linear_proj.weight": ["o_proj.weight"]},
    "C": {"in_proj.weight": ["in_proj.weight"], "in_proj.bias": ["in_proj.bias"],
          "conv_weight": ["conv_weight"],
          "out_proj.weight": ["out_proj.weight"], "out_proj.bias": ["out_proj.bias"]},
}


@dataclass(frozen=True)
class TensorPair:
    """One megatron tensor and the HF tensors it holds: `hf[0]` alone, or the parts `hf`
    stacked along dim 0 per group (`groups` heads, `rows[j]` rows of part j in each)."""

    megatron: str
    hf: tuple[str, ...]
    groups: int = 1
    rows: tuple[int, ...] = ()


def hf_config(model_config: dict) -> JRTConfig:
    """JRTConfig from checkpoint.json's `config.model` (a JRTModelConfig as a dict)."""
    try:
        fields = {key: model_config[key] for key in _SHARED_FIELDS}
    except KeyError as exc:
        raise ValueError(f"checkpoint.json: config.model has no {exc.args[0]!r}; the "
                         "checkpoint was not written by jrt-train") from None
    return JRTConfig(**fields, initializer_range=model_config.get("init_std", 0.02))


def megatron_model_config(config: JRTConfig, make_vocab_size_divisible_by: int = 8) -> dict:
    """checkpoint.json's `config.model` (a validated JRTModelConfig as a dict) for `config`."""
    from megatron_jrt.config import JRTModelConfig

    fields = {key: getattr(config, key) for key in _SHARED_FIELDS}
    if float(fields["rotary_base"]).is_integer():
        fields["rotary_base"] = int(fields["rotary_base"])  # JRTModelConfig's type
    model = JRTModelConfig(**fields, init_std=config.initializer_range,
                           make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    model.validate()
    return dataclasses.asdict(model)


def _mixer_rows(config: JRTConfig, letter: str, megatron_name: str) -> tuple[int, ...]:
    """Rows per head of each part of a fused per-head projection."""
    f, dh = config.feature_dim, config.head_dim
    if letter == "S":
        return (dh, dh, dh)
    return (f, f, dh) if megatron_name == "linear_qkv.weight" else (f, dh)


def tensor_pairs(config: JRTConfig) -> list[TensorPair]:
    """Every megatron tensor of a model of `config` but the embedding, with its HF tensors."""
    ffn = 2 * config.hidden_size
    pairs = [TensorPair("decoder.final_layernorm.weight", ("model.norm.weight",))]
    for i, letter in enumerate(config.layer_pattern):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        pairs += [
            TensorPair(f"{src}input_layernorm.weight", (f"{dst}mixer_norm.weight",)),
            TensorPair(f"{src}pre_mlp_layernorm.weight", (f"{dst}mlp_norm.weight",)),
            TensorPair(f"{src}mlp.linear_fc1.weight",
                       (f"{dst}mlp.gate_proj.weight", f"{dst}mlp.up_proj.weight"), 1, (ffn, ffn)),
            TensorPair(f"{src}mlp.linear_fc2.weight", (f"{dst}mlp.down_proj.weight",)),
        ]
        for name, targets in _MIXER_TENSORS[letter].items():
            hf = tuple(f"{dst}mixer.{target}" for target in targets)
            fused = len(hf) > 1
            pairs.append(TensorPair(f"{src}self_attention.{name}", hf,
                                    config.num_heads if fused else 1,
                                    _mixer_rows(config, letter, name) if fused else ()))
    return pairs


def megatron_names(config: JRTConfig) -> list[str]:
    """The megatron tensor names a model of `config` needs from a checkpoint."""
    return [MEGATRON_EMBEDDING] + [pair.megatron for pair in tensor_pairs(config)]


def _split(weight: Tensor, pair: TensorPair) -> list[Tensor]:
    """[groups * sum(rows), d] -> one [groups * rows[j], d] per part."""
    if not pair.rows:
        return [weight]
    grouped = weight.view(pair.groups, sum(pair.rows), weight.shape[-1])
    return [part.reshape(pair.groups * rows, -1).contiguous()
            for part, rows in zip(grouped.split(pair.rows, dim=1), pair.rows)]


def _join(parts: list[Tensor], pair: TensorPair) -> Tensor:
    """The inverse of `_split`."""
    if not pair.rows:
        return parts[0]
    return torch.cat([part.reshape(pair.groups, rows, part.shape[-1])
                      for part, rows in zip(parts, pair.rows)], dim=1).reshape(-1, parts[0].shape[-1])


def megatron_to_hf(tensors: dict[str, Tensor], config: JRTConfig) -> dict[str, Tensor]:
    """HF state dict (lm_head tied: the same tensor as the embedding) from megatron tensors;
    the embedding's vocabulary padding rows are dropped."""
    embedding = tensors[MEGATRON_EMBEDDING][:config.vocab_size].contiguous()
    out = {HF_EMBEDDING: embedding, HF_LM_HEAD: embedding}
    for pair in tensor_pairs(config):
        out.update(zip(pair.hf, _split(tensors[pair.megatron], pair)))
    return out


def hf_to_megatron(state: dict[str, Tensor], config: JRTConfig, padded_vocab_size: int
                   ) -> dict[str, Tensor]:
    """megatron tensors from an HF state dict (lm_head ignored: tied); the embedding gets
    zero rows up to `padded_vocab_size`, as megatron's vocabulary padding."""
    embedding = state[HF_EMBEDDING]
    padded = embedding.new_zeros(padded_vocab_size, embedding.shape[1])
    padded[:config.vocab_size] = embedding
    out = {MEGATRON_EMBEDDING: padded}
    for pair in tensor_pairs(config):
        out[pair.megatron] = _join([state[name] for name in pair.hf], pair).contiguous()
    return out
