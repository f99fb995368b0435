"""The authors' released JRT checkpoints (JRT_SPEC.md section 7) -> our Hugging Face JRT model.

A release is a GPT2Config-style config.json with hydra mixer dicts and a pytorch_model.bin.
Their tensors map onto ours one to one except:
- `mlp.fc1` [2H, d]: FIRST half the value (our up_proj), SECOND the gate (our gate_proj);
- SWA `Wqkv` [3d, d]: [q | k | v] blocks, each head-major like our q/k/v_proj;
- BaseConv `conv.conv.weight` [2d, 1, k]: padded by k-1 and truncated, so weight[..., k-1]
  hits the current token, as in our left-padded conv: copied unflipped.
The layer pattern comes from which mixer tensors each layer holds; sizes from tensor shapes;
heads, feature dim, prefix length and window from the mixer dicts (spec defaults otherwise).
"""
from __future__ import annotations

import re

from torch import Tensor

from megatron_jrt.hf.configuration_jrt import JRTConfig

GPT2_EOD_ID = 50256
_LAYER_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_MIXER_LETTER_BY_TENSOR = {"mixer.proj_q.weight": "P", "mixer.Wqkv.weight": "S",
                           "mixer.in_proj.weight": "C"}
_MIXER_TARGET_WORD = {"P": "prefix_linear", "S": "slide", "C": "convolution"}
# Their per-layer tensor -> ours (under model.layers.{i}.), one to one.
_RENAMES = {"norm1.weight": "mixer_norm.weight", "norm2.weight": "mlp_norm.weight",
            "mlp.fc2.weight": "mlp.down_proj.weight",
            "mixer.proj_q.weight": "mixer.q_proj.weight", "mixer.proj_k.weight": "mixer.k_proj.weight",
            "mixer.proj_v.weight": "mixer.v_proj.weight",
            "mixer.proj_k_enc.weight": "mixer.k_enc_proj.weight",
            "mixer.proj_v_enc.weight": "mixer.v_enc_proj.weight",
            "mixer.out_proj.weight": "mixer.o_proj.weight",
            "mixer.in_proj.weight": "mixer.in_proj.weight", "mixer.in_proj.bias": "mixer.in_proj.bias",
            "mixer.conv.conv.weight": "mixer.conv_weight"}
_CONV_OUT_PROJ = {"mixer.out_proj.weight": "mixer.out_proj.weight",
                  "mixer.out_proj.bias": "mixer.out_proj.bias"}


def clean_state(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """Their loader's cleaning: strip `model.`, drop `metrics` keys, `conv1` -> `conv`."""
    return {key.removeprefix("model.").replace("conv1", "conv"): tensor
            for key, tensor in raw.items() if "metrics" not in key}


def _layer_tensors(state: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    layers: dict[int, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        if match := _LAYER_KEY.match(key):
            layers.setdefault(int(match[1]), {})[match[2]] = tensor
    return layers


def _mixer_dicts(release: dict) -> dict[str, dict]:
    """Hydra mixer dicts by our mixer letter, recognised by their `_target_`."""
    found = {}
    for name in ("mixer", "alt_mixer", "alt_mixer_2"):
        mixer = release.get(name) or {}
        for letter, word in _MIXER_TARGET_WORD.items():
            if word in str(mixer.get("_target_", "")).lower():
                found[letter] = mixer
    return found


def authors_config(release: dict, state: dict[str, Tensor]) -> JRTConfig:
    """JRTConfig of a release from its config.json dict and its cleaned tensors."""
    layers = _layer_tensors(state)
    pattern = ""
    for i in range(len(layers)):
        letters = [letter for name, letter in _MIXER_LETTER_BY_TENSOR.items() if name in layers.get(i, {})]
        if len(letters) != 1:
            raise ValueError(f"pytorch_model.bin: layer {i} holds no recognisable mixer "
                             f"(one of {sorted(_MIXER_LETTER_BY_TENSOR)}); not a JRT release")
        pattern += letters[0]
    vocab, d = state["transformer.embeddings.word_embeddings.weight"].shape
    ffn = layers[0]["mlp.fc2.weight"].shape[1]
    if ffn != 2 * d:
        raise ValueError(f"pytorch_model.bin: MLP width {ffn}, our model has 2 * d_model = "
                         f"{2 * d}; this release cannot be represented")
    mixers = _mixer_dicts(release)
    pla, swa = mixers.get("P", {}), mixers.get("S", {})
    heads = int(pla.get("num_heads", swa.get("num_heads", 16)))
    feature_dim = int(pla.get("feature_dim", 16))
    return JRTConfig(vocab_size=vocab, hidden_size=d, num_layers=len(pattern), num_heads=heads,
                     layer_pattern=pattern, feature_dim=feature_dim,
                     prefix_length=int(pla.get("enc_length") or 1024),
                     swa_window=int(swa.get("window_size", 256)) // 2,  # their code looks back half
                     conv_kernel=int(next((t.shape[-1] for t in state.values() if t.dim() == 3), 3)),
                     norm_eps=1e-5, max_sequence_length=int(release.get("n_positions", 2048)),
                     eos_token_id=GPT2_EOD_ID, pad_token_id=GPT2_EOD_ID)


def authors_to_hf(state: dict[str, Tensor], config: JRTConfig) -> dict[str, Tensor]:
    """Our HF state dict (lm_head tied, omitted) from a release's cleaned tensors."""
    d = config.hidden_size
    out = {"model.embed_tokens.weight": state["transformer.embeddings.word_embeddings.weight"],
           "model.norm.weight": state["transformer.ln_f.weight"]}
    for i, tensors in _layer_tensors(state).items():
        dst = f"model.layers.{i}."
        renames = {**_RENAMES, **(_CONV_OUT_PROJ if config.layer_pattern[i] == "C" else {})}
        out.update({dst + renames[name]: tensor for name, tensor in tensors.items()
                    if name in renames})
        value, gate = tensors["mlp.fc1.weight"].chunk(2, dim=0)
        out[f"{dst}mlp.up_proj.weight"], out[f"{dst}mlp.gate_proj.weight"] = value, gate
        if "mixer.Wqkv.weight" in tensors:
            q, k, v = tensors["mixer.Wqkv.weight"].split(d, dim=0)
            out.update({f"{dst}mixer.q_proj.weight": q, f"{dst}mixer.k_proj.weight": k,
                        f"{dst}mixer.v_proj.weight": v})
    return {name: tensor.contiguous() for name, tensor in out.items()}
