"""JRT-RNN as a Hugging Face causal LM, in plain torch (JRT_SPEC.md sections 2, 3 and 5).

This file is copied next to converted weights and loaded with `trust_remote_code=True`, so it
imports only torch, transformers and its own config. It computes what megatron_jrt's model
computes (tests/test_hf.py holds the two to 1e-4): pre-norm blocks of a mixer (prefix linear
attention, sliding-window attention or BaseConv) and a SwiGLU MLP, a final RMSNorm and a tied
LM head. Generation keeps a recurrent cache (`JRTCache`): O(1) memory per token.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_jrt import JRTConfig

PLA_EPS = 1e-12
PLA_CHUNK = 64

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ------------------------------------------------------------------------- recurrent cache

class JRTCache:
    """Per-layer recurrent state after `seq_length` tokens: PLA (S, z) in fp32, the BaseConv
    conv tail, the sliding-window keys/values of the last `swa_window` tokens."""

    is_compileable = False
    is_linear = True  # fixed-size state: generate must feed only the new tokens

    def __init__(self, num_layers: int):
        self.layers: list[tuple[Tensor, ...] | None] = [None] * num_layers
        self.seq_length = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the states of the chosen beams."""
        self.layers = [None if state is None else tuple(t.index_select(0, beam_idx.to(t.device))
                                                        for t in state)
                       for state in self.layers]


# ------------------------------------------------------------------ prefix linear attention

def taylor_features(x: Tensor) -> Tensor:
    """[..., f] -> [..., 1 + f + f^2] with phi(q).phi(k) = 1 + s + s^2/2, s = q.k / sqrt(f)."""
    f = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / f ** 0.25,
                      outer / (math.sqrt(2.0) * math.sqrt(f))], dim=-1)


def causal_taylor_attention(q: Tensor, k: Tensor, v: Tensor, S: Tensor, z: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Causal Taylor linear attention starting from state (S [b,h,D,dv], z [b,h,D]).

    Chunk by chunk: earlier tokens through the state, the chunk's own by 1 + s + s^2/2 under a
    causal mask. Returns y [b,h,n,dv] and the state after the last token (all in S's dtype)."""
    f = q.shape[-1]
    q, k, v = q.to(S.dtype), k.to(S.dtype), v.to(S.dtype)
    outputs = []
    for start in range(0, q.shape[2], PLA_CHUNK):
        qc, kc, vc = (t[:, :, start:start + PLA_CHUNK] for t in (q, k, v))
        phi_q, phi_k = taylor_features(qc), taylor_features(kc)
        s = qc @ kc.transpose(-1, -2) / math.sqrt(f)
        scores = (1 + s + 0.5 * s * s).tril()
        numerator = phi_q @ S + scores @ vc
        denominator = (phi_q @ z.unsqueeze(-1)).squeeze(-1) + scores.sum(-1)
        outputs.append(numerator / (denominator + PLA_EPS).unsqueeze(-1))
        S = S + phi_k.transpose(-1, -2) @ vc
        z = z + phi_k.sum(-2)
    return torch.cat(outputs, dim=2), S, z


class PrefixLinearAttention(nn.Module):
    """PLA: causal Taylor linear attention whose state starts at the sum over the encoder
    region (the first min(prefix_length, n) tokens) of phi(k_enc) v_enc^T."""

    def __init__(self, config: JRTConfig):
        super().__init__()
        d, h, f = config.hidden_size, config.num_heads, config.feature_dim
        self.num_heads, self.prefix_length = h, config.prefix_length
        self.q_proj = nn.Linear(d, h * f, bias=False)
        self.k_proj = nn.Linear(d, h * f, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.k_enc_proj = nn.Linear(d, h * f, bias=False)
        self.v_enc_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def _heads(self, x: Tensor) -> Tensor:
        """[b, n, h * e] -> [b, h, n, e]"""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None, position: int
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
        if state is None:  # the sequence starts here: sum the encoder region into the state
            prefix = x[:, :self.prefix_length]
            k_enc = self._heads(self.k_enc_proj(prefix)).to(accumulate)
            v_enc = self._heads(self.v_enc_proj(prefix)).to(accumulate)
            phi = taylor_features(k_enc)
            state = (phi.transpose(-1, -2) @ v_enc, phi.sum(-2))
        y, S, z = causal_taylor_attention(q, k, v, *state)
        b, _, n, _ = y.shape
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(b, n, -1)), (S, z)


# ------------------------------------------------------------------ sliding-window attention

def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary over the whole head, non-interleaved (megatron's rotate-half), fp32 angles."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """q [b,h,n,d] are the last n of the m positions of k, v; each query sees itself and the
    `window` keys before it. Query blocks of `window` keep memory O(n * window)."""
    n, m = q.shape[2], k.shape[2]
    first = m - n  # key index of query 0
    block = max(window, 1)
    outputs = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        lo, hi = max(0, first + start - window), first + stop
        query_pos = torch.arange(first + start, first + stop, device=q.device).unsqueeze(1)
        key_pos = torch.arange(lo, hi, device=q.device).unsqueeze(0)
        allowed = (key_pos <= query_pos) & (key_pos >= query_pos - window)
        outputs.append(F.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=allowed))
    return torch.cat(outputs, dim=2)


class SlidingWindowAttention(nn.Module):
    """Softmax attention over the last `swa_window` keys and self, rotary positions."""

    def __init__(self, config: JRTConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads, self.window, self.rotary_base = (config.num_heads, config.swa_window,
                                                         config.rotary_base)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None, position: int
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        positions = torch.arange(position, position + n, device=x.device)
        q, k = apply_rotary(q, positions, self.rotary_base), apply_rotary(k, positions,
                                                                          self.rotary_base)
        if state is not None:
            k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
        y = sliding_window_attention(q, k, v, self.window)
        return (self.o_proj(y.transpose(1, 2).reshape(b, n, -1)),
                (k[:, :, -self.window:], v[:, :, -self.window:]))


# --------------------------------------------------------------------------------- BaseConv

class BaseConv(nn.Module):
    """out_proj(silu(causal depthwise conv(u1)) * u2) with [u1 | u2] = in_proj(x)."""

    def __init__(self, config: JRTConfig):
        super().__init__()
        d, self.kernel = config.hidden_size, config.conv_kernel
        self.in_proj = nn.Linear(d, 4 * d)
        self.conv_weight = nn.Parameter(torch.empty(2 * d, 1, config.conv_kernel))
        self.out_proj = nn.Linear(2 * d, d)

    def forward(self, x: Tensor, state: tuple[Tensor] | None, position: int
                ) -> tuple[Tensor, tuple[Tensor]]:
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        u1 = u1.transpose(1, 2)  # [b, channels, n]
        tail = u1.new_zeros(*u1.shape[:2], self.kernel - 1) if state is None else state[0]
        u1 = torch.cat([tail.to(u1.dtype), u1], dim=-1)
        conv = F.conv1d(u1, self.conv_weight, groups=u1.shape[1])
        gated = F.silu(conv).transpose(1, 2) * u2
        return self.out_proj(gated), (u1[:, :, u1.shape[-1] - (self.kernel - 1):],)


MIXERS = {"P": PrefixLinearAttention, "S": SlidingWindowAttention, "C": BaseConv}


# ------------------------------------------------------------------------------ the model

class SwiGLU(nn.Module):
    def __init__(self, config: JRTConfig):
        super().__init__()
        d = config.hidden_size
        self.gate_proj = nn.Linear(d, 2 * d, bias=False)
        self.up_proj = nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class JRTBlock(nn.Module):
    def __init__(self, config: JRTConfig, letter: str):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mixer = MIXERS[letter](config)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, state, position: int) -> tuple[Tensor, tuple]:
        mixed, state = self.mixer(self.mixer_norm(x), state, position)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class JRTPreTrainedModel(PreTrainedModel):
    config_class = JRTConfig
    base_model_prefix = "model"
    _no_split_modules = ["JRTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, BaseConv):
            module.conv_weight.normal_(0.0, std)


class JRTModel(JRTPreTrainedModel):
    """Embedding, the blocks of `layer_pattern`, final RMSNorm: hidden states [b, n, d]."""

    def __init__(self, config: JRTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(JRTBlock(config, letter) for letter in config.layer_pattern)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def forward(self, input_ids: Tensor, cache: JRTCache | None = None) -> Tensor:
        """With a cache, continue the sequence it holds and leave it after `input_ids`."""
        position = 0 if cache is None else cache.seq_length
        if 0 < position < self.config.prefix_length:
            raise ValueError(
                f"cannot continue a cached sequence of {position} tokens: it must start with at "
                f"least prefix_length={self.config.prefix_length} tokens (later tokens cannot "
                "join the encoder region); pad the prompt (read-twice) or pass use_cache=False")
        x = self.embed_tokens(input_ids)
        for index, layer in enumerate(self.layers):
            state = None if cache is None else cache.layers[index]
            x, state = layer(x, state, position)
            if cache is not None:
                cache.layers[index] = state
        if cache is not None:
            cache.seq_length += input_ids.shape[1]
        return self.norm(x)


class JRTForCausalLM(JRTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JRTConfig):
        super().__init__(config)
        self.model = JRTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # JRTCache, not a key/value cache

    def prepare_inputs_for_generation(self, input_ids: Tensor, cache: JRTCache | None = None,
                                      past_key_values: JRTCache | None = None,
                                      attention_mask: Tensor | None = None,
                                      use_cache: bool | None = None, **kwargs) -> dict:
        """Feed only the tokens the cache has not read yet."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length():]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask,
                "use_cache": use_cache}

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: JRTCache | None = None, past_key_values: JRTCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits [b, n, vocab] (the last `logits_to_keep` positions when > 0); a recurrent
        cache with `use_cache`; the mean next-token cross entropy with `labels`."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("padding masks are not supported: JRT-RNN reads prompts "
                                      "unpadded (one prompt per call, or equal lengths)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = JRTCache(self.config.num_layers)
        hidden = self.model(input_ids, cache if use_cache else None)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: cache if use_cache else None})


__all__ = ["JRTCache", "JRTModel", "JRTForCausalLM", "JRTPreTrainedModel"]
