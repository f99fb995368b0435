"""Prefix linear attention (PLA): one public API, kernels selected behind it.

Triton kernels (kernels/pla/triton_pla.py) on CUDA when Triton is importable and the
shape is supported; the PyTorch reference (kernels/pla/reference.py) otherwise.
All tensors are head-major: q, k [B, H, N, f]; v [B, H, N, dv]; k_enc [B, H, M, f];
v_enc [B, H, M, dv] (M <= N; the caller slices x[:, :M]). key_mask [B, N] bool
(True = real token; may be longer than N to cover an encoder region M > N) drops
left-padding keys from the encoder state and causal sums.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kernels.pla import reference
from kernels.pla.reference import PLAState, encoder_state, feature_dim, taylor_feature_map

__all__ = [
    "PLAState",
    "encoder_state",
    "feature_dim",
    "taylor_feature_map",
    "prefix_linear_attention",
    "pla_prefill",
    "pla_decode_step",
    "triton_available",
]

_triton = None
_triton_error: Exception | None = None


def _load_triton():
    global _triton, _triton_error
    if _triton is None and _triton_error is None:
        try:
            from kernels.pla import triton_pla as mod
            _triton = mod
        except Exception as e:  # no triton, or no GPU backend
            _triton_error = e
    return _triton


def triton_available() -> bool:
    return _load_triton() is not None


def _use_triton(q: Tensor, v: Tensor, key_mask: Tensor | None) -> bool:
    if not q.is_cuda or key_mask is not None:
        return False
    mod = _load_triton()
    return mod is not None and mod.supports(q, v)


def prefix_linear_attention(q: Tensor, k: Tensor, v: Tensor, k_enc: Tensor, v_enc: Tensor,
                            eps: float = 1e-12, key_mask: Tensor | None = None) -> Tensor:
    """PLA over a full sequence: [B, H, N, dv] in v's dtype; differentiable."""
    if _use_triton(q, v, key_mask):
        return _triton.pla_triton(q, k, v, k_enc, v_enc, eps)
    return reference.pla_reference(q, k, v, k_enc, v_enc, eps, key_mask)


def pla_prefill(q: Tensor, k: Tensor, v: Tensor, k_enc: Tensor, v_enc: Tensor,
                eps: float = 1e-12, key_mask: Tensor | None = None) -> tuple[Tensor, PLAState]:
    """Forward-only PLA that also returns the fp32 state after all N tokens, for decoding.

    The state is unpacked ([B, H, 1 + f + f^2, dv]) whichever kernel ran."""
    if _use_triton(q, v, key_mask):
        return _triton.pla_prefill_triton(q, k, v, k_enc, v_enc, eps)
    return reference.pla_prefill_reference(q, k, v, k_enc, v_enc, eps, key_mask)


def pla_decode_step(q: Tensor, k: Tensor, v: Tensor, state: PLAState, eps: float = 1e-12) -> Tensor:
    """One token for a batch: q, k [B, H, f]; v [B, H, dv]. Updates state in place
    (S += phi(k) v^T; z += phi(k)) and returns y [B, H, dv] = phi(q) S / (phi(q) . z + eps)."""
    if q.is_cuda and state.S.dtype == torch.float32:
        mod = _load_triton()
        if mod is not None and mod.supports_decode(q, v, state):
            return mod.pla_decode_step_triton(q, k, v, state, eps)
    return reference.pla_decode_step(q, k, v, state, eps)
