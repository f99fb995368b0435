"""Prefix linear attention (PLA), the spec as plain PyTorch (JRT_SPEC.md section 2).

PLA is causal linear attention with the 2nd-order Taylor feature map whose recurrent
state starts at the prefix sum (S_e, z_e) of the encoder keys/values instead of zero:

    y_i = phi(q_i) [S_e + sum_{j<=i} phi(k_j) v_j^T] / (phi(q_i) . [z_e + sum_{j<=i} phi(k_j)] + eps)

Two forms live here and must agree (tests/test_pla_reference.py):
  * `_chunked_pla`: the parallel form used for training. Within a chunk of C tokens the
    scores are phi(q).phi(k) = 1 + s + s^2/2 (s = q.k / sqrt(f)) computed directly; across
    chunks the contribution is phi(q) @ S_prev with S_prev the state before the chunk.
  * `pla_decode_step`: the recurrent step (O(1) per token).

All tensors are head-major: q, k [B, H, N, f]; v [B, H, N, dv]; k_enc [B, H, M, f];
v_enc [B, H, M, dv]. State and accumulation are fp32 (fp64 when the inputs are fp64,
which the tests use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_CHUNK = 64


def feature_dim(f: int) -> int:
    """Rows of the unpacked Taylor state: 1 + f + f^2 (273 for f = 16)."""
    return 1 + f + f * f


def taylor_feature_map(x: Tensor) -> Tensor:
    """[..., f] -> [..., 1 + f + f*f]: [1, x / f^(1/4), vec(x x^T) / (sqrt(2) sqrt(f))],
    so that phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(f)."""
    f = x.shape[-1]
    one = torch.ones_like(x[..., :1])
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([one, x / f**0.25, x2 / (math.sqrt(2.0) * math.sqrt(f))], dim=-1)


@dataclass
class PLAState:
    """Recurrent state per head (fp32): S [B, H, 1+f+f^2, dv], z [B, H, 1+f+f^2]."""

    S: Tensor
    z: Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def encoder_state(k_enc: Tensor, v_enc: Tensor, key_mask: Tensor | None = None) -> PLAState:
    """Prefix reduction S_e = sum_j phi(k_e,j) v_e,j^T, z_e = sum_j phi(k_e,j).

    key_mask [B, M] bool (True = real token) drops padding keys from both sums."""
    acc = _acc_dtype(v_enc)
    phi = taylor_feature_map(k_enc.to(acc))
    if key_mask is not None:
        phi = phi * key_mask[:, None, :, None].to(acc)
    S = torch.einsum("bhmD,bhmd->bhDd", phi, v_enc.to(acc))
    return PLAState(S=S, z=phi.sum(-2))


def _chunked_pla(q, k, v, S0, z0, key_mask, eps, chunk=DEFAULT_CHUNK):
    """Parallel chunked causal Taylor linear attention from the initial state (S0, z0).

    Returns (y in the accumulation dtype, final S, final z). key_mask [B, >= N] bool or None."""
    acc = S0.dtype
    B, H, N, f = q.shape
    dv = v.shape[-1]
    C = min(chunk, max(N, 1))
    nc = -(-N // C)
    pad = nc * C - N
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    m = torch.ones(B, N, dtype=acc, device=q.device) if key_mask is None else key_mask[:, :N].to(acc)
    if pad:
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
        m = torch.nn.functional.pad(m, (0, pad))  # the tail padding is masked out
    q = q.view(B, H, nc, C, f)
    k = k.view(B, H, nc, C, f)
    v = v.view(B, H, nc, C, dv)
    m = m.view(B, 1, nc, C)

    # inter-chunk: state before each chunk = initial state + exclusive prefix of chunk sums
    phik = taylor_feature_map(k) * m.unsqueeze(-1)
    kv = torch.einsum("bhncD,bhncd->bhnDd", phik, v)
    kz = phik.sum(-2)
    S_prev = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1].cumsum(2)], 2) + S0[:, :, None]
    z_prev = torch.cat([torch.zeros_like(kz[:, :, :1]), kz[:, :, :-1].cumsum(2)], 2) + z0[:, :, None]
    phiq = taylor_feature_map(q)
    num = torch.einsum("bhncD,bhnDd->bhncd", phiq, S_prev)
    den = torch.einsum("bhncD,bhnD->bhnc", phiq, z_prev)

    # intra-chunk: phi(q).phi(k) = 1 + s + s^2/2, causal (j <= i), pad keys dropped
    s = q @ k.transpose(-1, -2) / math.sqrt(f)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    A = (1 + s + 0.5 * s * s) * causal * m.unsqueeze(-2)
    num = num + A @ v
    den = den + A.sum(-1)

    y = (num / (den + eps).unsqueeze(-1)).reshape(B, H, nc * C, dv)[:, :, :N]
    S_fin = S_prev[:, :, -1] + kv[:, :, -1]
    z_fin = z_prev[:, :, -1] + kz[:, :, -1]
    return y, S_fin, z_fin


def _enc_mask(key_mask: Tensor | None, M: int) -> Tensor | None:
    return None if key_mask is None else key_mask[:, :M]


def pla_reference(q, k, v, k_enc, v_enc, eps: float = 1e-12, key_mask: Tensor | None = None,
                  chunk: int = DEFAULT_CHUNK) -> Tensor:
    """Full-sequence PLA (parallel chunked form). Output [B, H, N, dv] in v's dtype."""
    st = encoder_state(k_enc, v_enc, _enc_mask(key_mask, k_enc.shape[2]))
    y, _, _ = _chunked_pla(q, k, v, st.S, st.z, key_mask, eps, chunk)
    return y.to(v.dtype)


def pla_prefill_reference(q, k, v, k_enc, v_enc, eps: float = 1e-12, key_mask: Tensor | None = None,
                          chunk: int = DEFAULT_CHUNK) -> tuple[Tensor, PLAState]:
    """Output and the state after all N tokens (S_e + sum over all N causal terms)."""
    st = encoder_state(k_enc, v_enc, _enc_mask(key_mask, k_enc.shape[2]))
    y, S, z = _chunked_pla(q, k, v, st.S, st.z, key_mask, eps, chunk)
    return y.to(v.dtype), PLAState(S=S, z=z)


def pla_decode_step(q: Tensor, k: Tensor, v: Tensor, state: PLAState, eps: float = 1e-12) -> Tensor:
    """One token: S += phi(k) v^T; z += phi(k) (in place); y = phi(q) S / (phi(q) . z + eps).

    q, k [B, H, f]; v [B, H, dv]. Returns y [B, H, dv] in v's dtype."""
    acc = state.S.dtype
    phik = taylor_feature_map(k.to(acc))
    state.S.add_(phik.unsqueeze(-1) * v.to(acc).unsqueeze(-2))
    state.z.add_(phik)
    phiq = taylor_feature_map(q.to(acc))
    num = torch.einsum("bhD,bhDd->bhd", phiq, state.S)
    den = torch.einsum("bhD,bhD->bh", phiq, state.z)
    return (num / (den + eps).unsqueeze(-1)).to(v.dtype)


def pla_recurrent(q, k, v, k_enc, v_enc, eps: float = 1e-12, key_mask: Tensor | None = None):
    """The recurrent form over a whole sequence (slow; for tests). Returns (y, final state)."""
    st = encoder_state(k_enc, v_enc, _enc_mask(key_mask, k_enc.shape[2]))
    acc = st.S.dtype
    ys = []
    for i in range(q.shape[2]):
        if key_mask is None:
            ys.append(pla_decode_step(q[:, :, i], k[:, :, i], v[:, :, i], st, eps))
            continue
        # a pad token adds nothing to the state (its phi(k) is zeroed)
        keep = key_mask[:, i].to(acc)[:, None]
        phik = taylor_feature_map(k[:, :, i].to(acc)) * keep[..., None]
        st.S.add_(phik.unsqueeze(-1) * v[:, :, i].to(acc).unsqueeze(-2))
        st.z.add_(phik)
        phiq = taylor_feature_map(q[:, :, i].to(acc))
        num = torch.einsum("bhD,bhDd->bhd", phiq, st.S)
        den = torch.einsum("bhD,bhD->bh", phiq, st.z)
        ys.append((num / (den + eps).unsqueeze(-1)).to(v.dtype))
    return torch.stack(ys, 2), st
