"""megatron_jrt checkpoint tensors -> the Hugging Face JRT model's, and the config between them.

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
"""
from __future__ import annotations

from torch import Tensor

from megatron_jrt.hf.configuration_jrt import JRTConfig

MEGATRON_EMBEDDING = "embedding.word_embeddings.weight"
MEGATRON_FINAL_NORM = "decoder.final_layernorm.weight"

# Per mixer letter: megatron tensor (under decoder.layers.{i}.self_attention.) -> HF mixer
# tensors (under model.layers.{i}.mixer.) it splits into, in order; the split is along dim 0,
# per head for the names in `_PER_HEAD`.
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
_PER_HEAD = {"linear_qkv.weight", "linear_kv_enc.weight"}


def hf_config(model_config: dict) -> JRTConfig:
    """JRTConfig from checkpoint.json's `config.model` (a JRTModelConfig as a dict)."""
    try:
        fields = {key: model_config[key] for key in (
            "vocab_size", "hidden_size", "num_layers", "num_heads", "layer_pattern",
            "feature_dim", "prefix_length", "swa_window", "conv_kernel", "rotary_base",
            "norm_eps", "max_sequence_length")}
    except KeyError as exc:
        raise ValueError(f"checkpoint.json: config.model has no {exc.args[0]!r}; the "
                         "checkpoint was not written by jrt-train") from None
    return JRTConfig(**fields, initializer_range=model_config.get("init_std", 0.02))


def megatron_names(config: JRTConfig) -> list[str]:
    """The megatron tensor names a model of `config` needs from a checkpoint."""
    names = [MEGATRON_EMBEDDING, MEGATRON_FINAL_NORM]
    for i, letter in enumerate(config.layer_pattern):
        layer = f"decoder.layers.{i}."
        names += [f"{layer}input_layernorm.weight", f"{layer}pre_mlp_layernorm.weight",
                  f"{layer}mlp.linear_fc1.weight", f"{layer}mlp.linear_fc2.weight"]
        names += [f"{layer}self_attention.{name}" for name in _MIXER_TENSORS[letter]]
    return names


def _split_sizes(config: JRTConfig, letter: str, megatron_name: str) -> list[int]:
    """Rows per head of each part of a fused per-head projection."""
    f, dh = config.feature_dim, config.head_dim
    if letter == "S":
        return [dh, dh, dh]
    return [f, f, dh] if megatron_name == "linear_qkv.weight" else [f, dh]


def _split_per_head(weight: Tensor, heads: int, sizes: list[int]) -> list[Tensor]:
    """[heads * sum(sizes), d] laid out per head -> one [heads * size, d] per part."""
    per_head = weight.view(heads, sum(sizes), weight.shape[-1])
    return [part.reshape(heads * size, -1).contiguous()
            for part, size in zip(per_head.split(sizes, dim=1), sizes)]


def megatron_to_hf(tensors: dict[str, Tensor], config: JRTConfig) -> dict[str, Tensor]:
    """HF state dict (lm_head tied: the same tensor as the embedding) from megatron tensors;
    the embedding's vocabulary padding rows are dropped."""
    embedding = tensors[MEGATRON_EMBEDDING][:config.vocab_size].contiguous()
    out = {"model.embed_tokens.weight": embedding, "lm_head.weight": embedding,
           "model.norm.weight": tensors[MEGATRON_FINAL_NORM]}
    for i, letter in enumerate(config.layer_pattern):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[f"{dst}mixer_norm.weight"] = tensors[f"{src}input_layernorm.weight"]
        out[f"{dst}mlp_norm.weight"] = tensors[f"{src}pre_mlp_layernorm.weight"]
        gate, up = tensors[f"{src}mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[f"{dst}mlp.gate_proj.weight"] = gate.contiguous()
        out[f"{dst}mlp.up_proj.weight"] = up.contiguous()
        out[f"{dst}mlp.down_proj.weight"] = tensors[f"{src}mlp.linear_fc2.weight"]
        for name, targets in _MIXER_TENSORS[letter].items():
            weight = tensors[f"{src}self_attention.{name}"]
            parts = (_split_per_head(weight, config.num_heads, _split_sizes(config, letter, name))
                     if name in _PER_HEAD else [weight])
            out.update({f"{dst}mixer.{target}": part for target, part in zip(targets, parts)})
    return out
