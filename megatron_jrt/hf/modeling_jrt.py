"""JRT-RNN as a Hugging Face causal LM, in plain torch (JRT_SPEC.md sections 2, 3 and 5).

This file is copied next to converted weights and loaded with `trust_remote_code=True`, so it
imports only torch, transformers and its own files (pla_kernels.py imports the project's kernels
lazily, where present). It computes what megatron_jrt's model computes (tests/test_hf.py holds
the two to 1e-4): pre-norm blocks of a mixer (prefix linear attention, sliding-window attention
or BaseConv) and a SwiGLU MLP, a final RMSNorm and a tied LM head. Generation keeps a
recurrent cache (`JRTCache`): O(1) memory per token.

Padding (`attention_mask` zeros, normally on the left) makes tokens invisible: PLA drops masked
keys from its encoder and causal sums, sliding-window attention masks them, BaseConv zeroes
them, and positions count real tokens only, so a padded row computes what it computes alone.
The encoder region of a row is its first `prefix_length` REAL tokens.

A cached read of many tokens (generate's prefill) goes through the blocks in chunks of at most
`config.prefill_chunk_tokens` columns, each chunk continuing the cache the one before left, so the
activations are those of one chunk, not of the whole prompt (JRTModel.forward).

On CUDA, PLA over a read that starts the sequences runs in this project's Triton kernels when
they import (pla_kernels.py, copied beside this file); otherwise, and everywhere else, in the
plain torch below, saying once on CUDA why.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_jrt import JRTConfig
from .pla_kernels import kernel_read

PLA_EPS = 1e-12
PLA_CHUNK = 64

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# ------------------------------------------------------------------------- recurrent cache

class JRTCache:
    """Per-layer recurrent state: PLA (S, z) in fp32, the BaseConv conv tail, the sliding-window
    keys/values (and key mask) of the last `swa_window` columns.

    `seq_length` counts the columns the model read; `hidden_columns` of them are read-twice
    padding the caller never passed, so `get_seq_length()` (what generate slices input_ids by)
    excludes them. `token_counts` [b] counts each row's real (unmasked) tokens: its positions."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[tuple[Tensor, ...] | None] = [None] * num_layers
        self.is_linear = [True] * num_layers  # fixed-size state per layer
        self.seq_length = 0
        self.hidden_columns = 0
        self.token_counts: Tensor | None = None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length - self.hidden_columns

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: keep the states of the chosen beams."""
        def pick(t: Tensor) -> Tensor:
            return t.index_select(0, beam_idx.to(t.device))

        self.layers = [None if state is None else tuple(pick(t) for t in state)
                       for state in self.layers]
        if self.token_counts is not None:
            self.token_counts = pick(self.token_counts)


# ------------------------------------------------------------------ prefix linear attention

def taylor_features(x: Tensor) -> Tensor:
    """[..., f] -> [..., 1 + f + f^2] with phi(q).phi(k) = 1 + s + s^2/2, s = q.k / sqrt(f)."""
    f = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / f ** 0.25,
                      outer / (math.sqrt(2.0) * math.sqrt(f))], dim=-1)


def causal_taylor_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, S: Tensor,
                            z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Causal Taylor linear attention starting from state (S [b,h,D,dv], z [b,h,D]).

    Chunk by chunk: earlier tokens through the state, the chunk's own by 1 + s + s^2/2 under a
    causal mask. A masked key (key_mask [b, n] False) adds nothing, as in kernels/pla/reference.
    Returns y [b,h,n,dv] and the state after the last token (all in S's dtype)."""
    f = q.shape[-1]
    q, k, v = q.to(S.dtype), k.to(S.dtype), v.to(S.dtype)
    keep = key_mask[:, None, :, None].to(S.dtype)  # [b, 1, n, 1]
    outputs = []
    for start in range(0, q.shape[2], PLA_CHUNK):
        qc, kc, vc, keep_c = (t[:, :, start:start + PLA_CHUNK] for t in (q, k, v, keep))
        phi_q, phi_k = taylor_features(qc), taylor_features(kc) * keep_c
        s = qc @ kc.transpose(-1, -2) / math.sqrt(f)
        scores = (1 + s + 0.5 * s * s).tril() * keep_c.transpose(-1, -2)
        numerator = phi_q @ S + scores @ vc
        denominator = (phi_q @ z.unsqueeze(-1)).squeeze(-1) + scores.sum(-1)
        outputs.append(numerator / (denominator + PLA_EPS).unsqueeze(-1))
        S = S + phi_k.transpose(-1, -2) @ vc
        z = z + phi_k.sum(-2)
    return torch.cat(outputs, dim=2), S, z


def encoder_mask(key_mask: Tensor, prefix_length: int) -> Tensor:
    """[b, n] bool: each row's first `prefix_length` real tokens (all real ones if fewer)."""
    return key_mask & (key_mask.cumsum(dim=1) <= prefix_length)


def state_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the PLA state: fp64 for fp64 activations, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class PrefixLinearAttention(nn.Module):
    """PLA: causal Taylor linear attention whose state starts at the sum over the encoder
    region (each row's first min(prefix_length, n) real tokens) of phi(k_enc) v_enc^T."""

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

    def encoder_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's keys [b, h, m, f] and values [b, h, m, dv] of x [b, m, d]."""
        return self._heads(self.k_enc_proj(x)), self._heads(self.v_enc_proj(x))

    def encoder_state(self, x: Tensor, key_mask: Tensor, dtype: torch.dtype
                      ) -> tuple[Tensor, Tensor]:
        """(S_e, z_e): the sums of phi(k_enc) v_enc^T and phi(k_enc) over the encoder region."""
        in_encoder = encoder_mask(key_mask, self.prefix_length)
        span = int(in_encoder.any(dim=0).nonzero().max()) + 1 if in_encoder.any() else 0
        k_enc, v_enc = (t.to(dtype) for t in self.encoder_kv(x[:, :span]))  # every row's region
        phi = taylor_features(k_enc) * in_encoder[:, None, :span, None].to(dtype)
        return phi.transpose(-1, -2) @ v_enc, phi.sum(-2)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None, positions: Tensor,
                key_mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """On CUDA the project's Triton kernels read from the sequences' start when they can
        (pla_kernels.kernel_read); this plain-torch form is the truth they are tested against."""
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        read = kernel_read(q, k, v, key_mask, x=x, encoder_kv=self.encoder_kv,
                           prefix_length=self.prefix_length, eps=PLA_EPS,
                           continuing=state is not None)
        if read is not None:
            y, state = read
        else:
            if state is None:  # the sequence starts here: sum the encoder region into the state
                state = self.encoder_state(x, key_mask, state_dtype(x))
            y, S, z = causal_taylor_attention(q, k, v, key_mask, *state)
            state = (S, z)
        b, _, n, _ = y.shape
        return self.o_proj(y.to(x.dtype).transpose(1, 2).reshape(b, n, -1)), state


# ------------------------------------------------------------------ sliding-window attention

def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, positions: Tensor, base: float) -> Tensor:
    """Rotary over the whole head, non-interleaved (megatron's rotate-half), fp32 angles.
    x [b, h, n, d]; positions [b, n]."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return x * angles.cos().to(x.dtype) + rotate_half(x) * angles.sin().to(x.dtype)


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, window: int
                             ) -> Tensor:
    """q [b,h,n,d] are the last n of the m positions of k, v; each query sees itself and the
    unmasked (key_mask [b, m]) of the `window` keys before it. A query always sees itself so
    that a padding query has a finite output. Query blocks keep memory O(n * window)."""
    n, m = q.shape[2], k.shape[2]
    first = m - n  # key index of query 0
    block = max(window, 1)
    outputs = []
    for start in range(0, n, block):
        stop = min(start + block, n)
        lo, hi = max(0, first + start - window), first + stop
        query_pos = torch.arange(first + start, first + stop, device=q.device).unsqueeze(1)
        key_pos = torch.arange(lo, hi, device=q.device).unsqueeze(0)
        in_window = (key_pos <= query_pos) & (key_pos >= query_pos - window)
        allowed = in_window & (key_mask[:, None, None, lo:hi] | (key_pos == query_pos))
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

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor, Tensor] | None, positions: Tensor,
                key_mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, positions, self.rotary_base), apply_rotary(k, positions,
                                                                          self.rotary_base)
        if state is not None:
            past_k, past_v, past_mask = state
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            key_mask = torch.cat([past_mask, key_mask], dim=1)
        y = sliding_window_attention(q, k, v, key_mask, self.window)
        return (self.o_proj(y.transpose(1, 2).reshape(b, n, -1)),
                (k[:, :, -self.window:], v[:, :, -self.window:], key_mask[:, -self.window:]))


# --------------------------------------------------------------------------------- BaseConv

class BaseConv(nn.Module):
    """out_proj(silu(causal depthwise conv(u1)) * u2) with [u1 | u2] = in_proj(x)."""

    def __init__(self, config: JRTConfig):
        super().__init__()
        d, self.kernel = config.hidden_size, config.conv_kernel
        self.in_proj = nn.Linear(d, 4 * d)
        self.conv_weight = nn.Parameter(torch.empty(2 * d, 1, config.conv_kernel))
        self.out_proj = nn.Linear(2 * d, d)

    def forward(self, x: Tensor, state: tuple[Tensor] | None, positions: Tensor,
                key_mask: Tensor) -> tuple[Tensor, tuple[Tensor]]:
        u1, u2 = self.in_proj(x).chunk(2, dim=-1)
        u1 = (u1 * key_mask.unsqueeze(-1).to(u1.dtype)).transpose(1, 2)  # [b, channels, n]
        tail = u1.new_zeros(*u1.shape[:2], self.kernel - 1) if state is None else state[0]
        u1 = torch.cat([tail.to(u1.dtype), u1], dim=-1)
        conv = F.conv1d(u1, self.conv_weight, groups=u1.shape[1])
        gated = F.silu(conv).transpose(1, 2) * u2
        return self.out_proj(gated), (u1[:, :, u1.shape[-1] - (self.kernel - 1):],)


MIXERS = {"P": PrefixLinearAttention, "S": SlidingWindowAttention, "C": BaseConv}


# ------------------------------------------------------------------------------ padding

def new_tokens_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[b, n] bool, False at padding, for the n tokens of `input_ids`: the last n columns of
    a mask over the whole sequence (what generate passes) or a mask of just these tokens."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.dim() != 2 or attention_mask.shape[1] < input_ids.shape[1]:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} must be 2-D and "
                         f"cover the {input_ids.shape[1]} tokens of input_ids")
    return attention_mask[:, -input_ids.shape[1]:].bool()


def read_twice_pad(prompt: Tensor, prefix_length: int) -> Tensor:
    """The prompt repeated to fill the encoder region, then the prompt itself (JRT_SPEC.md
    section 5; megatron_jrt.generate.read_twice_pad, repeated here as this file stands alone)."""
    if len(prompt) >= prefix_length:
        return prompt
    repeats = -(-prefix_length // len(prompt))
    return torch.cat([prompt.repeat(repeats)[-prefix_length:], prompt])


def read_twice_rows(input_ids: Tensor, attention_mask: Tensor | None, prefix_length: int
                    ) -> tuple[Tensor, Tensor]:
    """Each row's real tokens read-twice padded, left-padded (with 0) to one width: (ids, mask)."""
    real = new_tokens_mask(input_ids, attention_mask)
    if not bool(real.any(dim=1).all()):
        raise ValueError("a prompt row has no unmasked token")
    rows = [read_twice_pad(ids[keep], prefix_length) for ids, keep in zip(input_ids, real)]
    width = max(len(row) for row in rows)
    padded_ids = input_ids.new_zeros(len(rows), width)
    mask = torch.zeros_like(padded_ids)
    for index, row in enumerate(rows):
        padded_ids[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return padded_ids, mask


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

    def forward(self, x: Tensor, state, positions: Tensor, key_mask: Tensor
                ) -> tuple[Tensor, tuple]:
        mixed, state = self.mixer(self.mixer_norm(x), state, positions, key_mask)
        x = x + mixed
        return x + self.mlp(self.mlp_norm(x)), state


class JRTPreTrainedModel(PreTrainedModel):
    config_class = JRTConfig
    base_model_prefix = "model"
    _no_split_modules = ["JRTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' init functions, not the tensors' own: they skip tensors that
        from_pretrained has loaded (transformers 5.0 calls this after loading them)."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, 0.0, std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, BaseConv):
            init.normal_(module.conv_weight, 0.0, std)


class JRTModel(JRTPreTrainedModel):
    """Embedding, the blocks of `layer_pattern`, final RMSNorm: hidden states [b, n, d]."""

    def __init__(self, config: JRTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(JRTBlock(config, letter) for letter in config.layer_pattern)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def forward(self, input_ids: Tensor, cache: JRTCache | None = None,
                key_mask: Tensor | None = None, hidden_to_keep: int = 0) -> Tensor:
        """key_mask [b, n] bool, False at padding (None: no padding). With a cache, continue the
        sequences it holds and leave it after `input_ids`. Returns the last `hidden_to_keep`
        positions (all when 0).

        With a cache and more than config.prefill_chunk_tokens tokens, the blocks read the tokens
        chunk by chunk, each chunk continuing the cache (PLA from (S, z), SWA from its window,
        BaseConv from its tail): what one pass computes, in the memory of one chunk. The encoder
        region (each row's first prefix_length real tokens) must be read whole before a causal
        token uses it: when it does not end inside the first chunk (a prefix longer than the
        chunk, or left padding moving a row's region to the right), `_encoder_states` reads each
        row's encoder region alone first (b x prefix_length columns, up to the last PLA layer)
        and the chunks start from the PLA encoder states it leaves."""
        key_mask = new_tokens_mask(input_ids, key_mask)
        counts_before = self._token_counts(input_ids, cache)
        continuing = cache is not None and cache.seq_length > 0
        if continuing and bool(counts_before.min() < self.config.prefix_length):
            raise ValueError(
                f"cannot continue a cached sequence of {int(counts_before.min())} tokens: it must "
                f"start with at least prefix_length={self.config.prefix_length} tokens (later "
                "tokens cannot join the encoder region); pad the prompt (read-twice) or pass "
                "use_cache=False")
        n = input_ids.shape[1]
        chunk = getattr(self.config, "prefill_chunk_tokens", None) or 0
        if cache is None or chunk <= 0 or n <= chunk:  # one pass
            hidden = self._read(input_ids, key_mask, cache)
            return self.norm(hidden[:, -hidden_to_keep:] if hidden_to_keep else hidden)
        if not continuing and self._encoder_end(key_mask) > chunk:
            cache.layers = self._encoder_states(input_ids, key_mask)
        first_kept = n - hidden_to_keep if hidden_to_keep else 0
        outputs = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            hidden = self._read(input_ids[:, start:stop], key_mask[:, start:stop], cache)
            if stop > first_kept:
                outputs.append(self.norm(hidden[:, max(first_kept - start, 0):]))
        return torch.cat(outputs, dim=1)

    def _read(self, input_ids: Tensor, key_mask: Tensor, cache: JRTCache | None) -> Tensor:
        """The blocks over `input_ids` (from the cache's state, leaving it after them): the
        hidden states before the final norm."""
        counts_after = (self._token_counts(input_ids, cache).unsqueeze(1)
                        + key_mask.long().cumsum(dim=1))
        positions = (counts_after - 1).clamp(min=0)  # a real token's index among real tokens
        x = self.embed_tokens(input_ids)
        for index, layer in enumerate(self.layers):
            state = None if cache is None else cache.layers[index]
            x, state = layer(x, state, positions, key_mask)
            if cache is not None:
                cache.layers[index] = state
        if cache is not None:
            cache.seq_length += input_ids.shape[1]
            cache.token_counts = counts_after[:, -1]
        return x

    def _pla_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers)
                if isinstance(layer.mixer, PrefixLinearAttention)]

    def _encoder_end(self, key_mask: Tensor) -> int:
        """The column after the last encoder-region token of any row (0 without PLA layers)."""
        if not self._pla_layers():
            return 0
        in_encoder = encoder_mask(key_mask, self.config.prefix_length)
        return int(in_encoder.any(dim=0).nonzero().max()) + 1 if in_encoder.any() else 0

    def _encoder_states(self, input_ids: Tensor, key_mask: Tensor) -> list:
        """Per layer: a PLA layer's encoder state (S_e, z_e) for a sequence starting with
        `input_ids`, None for the others. Each row is read from its first real token through
        its last encoder token, the rows' columns shifted to start together, so the read is
        b x about prefix_length columns however the rows are padded. Padding before a row's
        first token is invisible and the blocks are causal, so each encoder token's hidden state
        and the sums over the region are those of the one-pass read."""
        n = input_ids.shape[1]
        columns = torch.arange(n, device=input_ids.device)
        in_encoder = encoder_mask(key_mask, self.config.prefix_length)
        starts = key_mask.int().argmax(dim=1)  # first real column (0 for an empty row)
        ends = (in_encoder.long() * (columns + 1)).max(dim=1).values
        width = max(int((ends - starts).max()), 1)
        index = starts.unsqueeze(1) + torch.arange(width, device=input_ids.device)
        inside = index < n
        index = index.clamp(max=n - 1)
        ids, mask = input_ids.gather(1, index), key_mask.gather(1, index) & inside
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        pla_layers = self._pla_layers()
        states: list = [None] * len(self.layers)
        x = self.embed_tokens(ids)
        for layer_index, layer in enumerate(self.layers[:pla_layers[-1] + 1]):
            state = None
            if layer_index in pla_layers:
                state = layer.mixer.encoder_state(layer.mixer_norm(x), mask, state_dtype(x))
                states[layer_index] = state
            if layer_index < pla_layers[-1]:  # the last PLA layer's output is not needed
                x, _ = layer(x, state, positions, mask)
        return states

    @staticmethod
    def _token_counts(input_ids: Tensor, cache: JRTCache | None) -> Tensor:
        """Real tokens each row has read before `input_ids`."""
        if cache is None or cache.token_counts is None:
            return input_ids.new_zeros(input_ids.shape[0])
        return cache.token_counts


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
        """Feed only the tokens the cache has not read yet. A cached generation whose prompt has
        a row of fewer than prefix_length real tokens reads that row read-twice padded first
        (positions before prefix_length cannot start generation), unless
        config.read_twice_short_prompts is False. The returned sequences hold the prompt as
        given."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and cache.seq_length:
            input_ids = input_ids[:, cache.get_seq_length():]
        elif use_cache and self._needs_read_twice(input_ids, attention_mask):
            cache = cache if cache is not None else JRTCache(self.config.num_layers)
            padded_ids, attention_mask = read_twice_rows(input_ids, attention_mask,
                                                         self.config.prefix_length)
            cache.hidden_columns = padded_ids.shape[1] - input_ids.shape[1]
            input_ids = padded_ids
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask,
                "use_cache": use_cache, "logits_to_keep": kwargs.get("logits_to_keep", 0)}

    def _needs_read_twice(self, input_ids: Tensor, attention_mask: Tensor | None) -> bool:
        real_tokens = new_tokens_mask(input_ids, attention_mask).sum(dim=1)
        return (getattr(self.config, "read_twice_short_prompts", True)
                and bool((real_tokens < self.config.prefix_length).any()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                cache: JRTCache | None = None, past_key_values: JRTCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits [b, n, vocab] (the last `logits_to_keep` positions when > 0); a recurrent
        cache with `use_cache`; the mean next-token cross entropy with `labels`.
        `attention_mask` [b, cached + n] or [b, n]: 0 marks padding, which no token sees."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = JRTCache(self.config.num_layers)
        hidden = self.model(input_ids, cache if use_cache else None,
                            new_tokens_mask(input_ids, attention_mask),
                            hidden_to_keep=logits_to_keep)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten().to(logits.device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: cache if use_cache else None})


__all__ = ["JRTCache", "JRTModel", "JRTForCausalLM", "JRTPreTrainedModel"]
