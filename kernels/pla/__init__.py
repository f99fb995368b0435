"""Prefix linear attention (PLA): one public API, kernels selected behind it.

Triton kernels (kernels/pla/triton_pla.py) on CUDA when Triton is importable and the
shape is supported; the PyTorch reference (kernels/pla/reference.py) otherwise. CPU tensors
and masked batches take the reference by design; a CUDA call that falls back because the
kernels failed to import or do not support its shape warns once per reason (about 1.3x
slower training is worth knowing about, not worth stopping for).

All tensors are head-major: q, k [B, H, N, f]; v [B, H, N, dv]; k_enc [B, H, M, f];
v_enc [B, H, M, dv] (M <= N; the caller slices x[:, :M]). key_mask [B, N] bool
(True = real token; may be longer than N to cover an encoder region M > N) drops
left-padding keys from the encoder state and causal sums.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from kernels.optional import OptionalKernels
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

_KERNELS = OptionalKernels("kernels.pla.triton_pla", "PLA", "about 1.3x slower training")


def triton_available() -> bool:
    return _KERNELS.available()


def _cuda_triton() -> ModuleType | None:
    """The Triton module for a CUDA call; None after warning once that it failed to import."""
    return _KERNELS.load_for_cuda()


def _warn_unsupported(call: str) -> None:
    _KERNELS.warn_fallback_once("shape", f"the Triton kernels do not support {call}")


def _triton_for(q: Tensor, v: Tensor, key_mask: Tensor | None) -> ModuleType | None:
    """The Triton module when it runs this full-sequence call, else None (the reference)."""
    if not q.is_cuda or key_mask is not None:
        return None
    mod = _cuda_triton()
    if mod is not None and not mod.supports(q, v):
        _warn_unsupported(f"q {list(q.shape)} {q.dtype}, v {list(v.shape)}")
        return None
    return mod


def prefix_linear_attention(q: Tensor, k: Tensor, v: Tensor, k_enc: Tensor, v_enc: Tensor,
                            eps: float = 1e-12, key_mask: Tensor | None = None) -> Tensor:
    """PLA over a full sequence: [B, H, N, dv] in v's dtype; differentiable."""
    if (mod := _triton_for(q, v, key_mask)) is not None:
        return mod.pla_triton(q, k, v, k_enc, v_enc, eps)
    return reference.pla_reference(q, k, v, k_enc, v_enc, eps, key_mask)


def pla_prefill(q: Tensor, k: Tensor, v: Tensor, k_enc: Tensor, v_enc: Tensor,
                eps: float = 1e-12, key_mask: Tensor | None = None) -> tuple[Tensor, PLAState]:
    """Forward-only PLA that also returns the fp32 state after all N tokens, for decoding.

    The state is unpacked ([B, H, 1 + f + f^2, dv]) whichever kernel ran."""
    if (mod := _triton_for(q, v, key_mask)) is not None:
        return mod.pla_prefill_triton(q, k, v, k_enc, v_enc, eps)
    return reference.pla_prefill_reference(q, k, v, k_enc, v_enc, eps, key_mask)


def pla_decode_step(q: Tensor, k: Tensor, v: Tensor, state: PLAState, eps: float = 1e-12) -> Tensor:
    """One token for a batch: q, k [B, H, f]; v [B, H, dv]. Updates state in place
    (S += phi(k) v^T; z += phi(k)) and returns y [B, H, dv] = phi(q) S / (phi(q) . z + eps)."""
    if q.is_cuda and (mod := _cuda_triton()) is not None:
        if state.S.dtype == torch.float32 and mod.supports_decode(q, v, state):
            return mod.pla_decode_step_triton(q, k, v, state, eps)
        _warn_unsupported(f"decoding q {list(q.shape)}, v {list(v.shape)} with a "
                          f"{state.S.dtype} state")
    return reference.pla_decode_step(q, k, v, state, eps)
