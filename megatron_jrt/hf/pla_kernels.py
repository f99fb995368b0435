"""The project's Triton PLA kernels (kernels.pla) for the HF model's prefill, where they can run.

modeling_jrt.py computes prefix linear attention in plain torch: a loop over 64-token chunks,
correct everywhere, but a launch-bound prefill next to the fused kernels jrt-train uses. On
CUDA, a read that starts the sequences (a forward without a cache, or generate's prefill of a
prompt that fits one `config.prefill_chunk_tokens` chunk) goes through `kernels.pla.pla_prefill`
instead (Triton; Gluon on Hopper with bf16 and head dim 64), which returns the output and the
fp32 state (S, z) in the layout the model's cache keeps.

This file is copied next to converted weights, where the project may not be installed, so
kernels.pla is imported on the first CUDA read, inside `try` (transformers refuses a custom-code
file whose other imports are missing). When the kernels cannot take a read, the plain path runs
and the model says why, once per reason:
- kernels.pla (or its Triton) does not import: the reason is the import error;
- the read continues a cached state (prefill chunks after the first): the kernels' PLA starts
  from the encoder region, they take no initial state;
- `triton_pla.supports` refuses the shape or dtype (feature dim 16, head dim <= 256, bf16 / fp16 /
  fp32 only);
- the attention mask is not left padding. Left padding is cut off: the rows with the same
  padding are one kernel call, each row's encoder region its first prefix_length real tokens.
Decode steps (one token) stay plain torch and silent.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from transformers.utils import logging

logger = logging.get_logger(__name__)

KERNEL_DEVICE_TYPES = ("cuda",)  # where the Triton kernels run (tests add "cpu")

EncoderKV = Callable[[Tensor], tuple[Tensor, Tensor]]  # x [b, m, d] -> (k_enc, v_enc) head-major

_said: set[str] = set()  # the reasons for the plain path already logged in this process


class ProjectKernels(NamedTuple):
    pla: ModuleType | None  # kernels.pla: pla_prefill and prefix_linear_attention
    supports: Callable[[Tensor, Tensor], bool] | None  # kernels.pla.triton_pla.supports(q, v)
    error: str  # why they did not import ("" when they did)


@functools.cache
def project_kernels() -> ProjectKernels:
    """kernels.pla and its Triton kernels' shape check, imported once."""
    try:  # transformers' import check of custom code skips `try` blocks
        import kernels.pla as pla
        from kernels.pla.triton_pla import supports
    except Exception as exc:  # no megatron-jrt installed, no Triton, no GPU backend
        return ProjectKernels(None, None, f"{type(exc).__name__}: {exc}")
    return ProjectKernels(pla, supports, "")


def _plain(device: torch.device, reason: str) -> None:
    """None, after logging once why this read on `device` takes the plain-torch path."""
    if reason not in _said:
        _said.add(reason)
        logger.warning(f"JRT: prefix linear attention on {device.type} runs in plain torch "
                       f"(slower prefill): {reason}")


def left_padding_starts(key_mask: Tensor) -> Tensor | None:
    """Each row's first real column [b] when every row is padding then real tokens (at least
    one), else None."""
    n = key_mask.shape[1]
    starts = n - key_mask.sum(dim=1)
    columns = torch.arange(n, device=key_mask.device)
    if bool((starts < n).all()) and torch.equal(key_mask, columns >= starts.unsqueeze(1)):
        return starts
    return None


def kernel_read(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, *, x: Tensor,
                encoder_kv: EncoderKV, prefix_length: int, eps: float, continuing: bool
                ) -> tuple[Tensor, tuple[Tensor, Tensor]] | None:
    """PLA of one read by the project's kernels, or None when the plain path must compute it.

    q, k [b, h, n, f], v [b, h, n, dv] head-major; x [b, n, d] the mixer's input, whose first
    prefix_length real tokens per row `encoder_kv` projects to the encoder's keys and values;
    key_mask [b, n] bool, False at padding. Returns y [b, h, n, dv] in v's dtype (zero at
    padding, which no later layer reads) and the fp32 state (S, z) after the read. With grad
    enabled y comes from the differentiable kernel and the state is not differentiable."""
    if q.device.type not in KERNEL_DEVICE_TYPES:
        return None
    kernels = project_kernels()
    if kernels.pla is None:
        return _plain(q.device, f"the project's kernels do not import ({kernels.error}); "
                                "install megatron-jrt where the model runs to use them")
    if continuing:
        if q.shape[2] > 1:  # a decode step is one token: not worth a kernel
            _plain(q.device, "a read that continues a cached state (a prompt longer than "
                             "config.prefill_chunk_tokens, after its first chunk): the kernels "
                             "start from the encoder region; raise prefill_chunk_tokens to read "
                             "longer prompts with them, in more memory")
        return None
    if not kernels.supports(q, v):
        return _plain(q.device, f"the kernels do not support feature dim {q.shape[-1]}, head "
                                f"dim {v.shape[-1]}, {q.dtype}")
    starts = left_padding_starts(key_mask)
    if starts is None:
        return _plain(q.device, "the attention_mask is not left padding")
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, x))

    def read_rows(rows: Tensor | slice, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """(y, S, z) of `rows`, whose real tokens start at column `start`, in one call."""
        part = [t[rows, :, start:] for t in (q, k, v)]
        k_enc, v_enc = encoder_kv(x[rows, start:start + prefix_length])
        if differentiable:
            y = kernels.pla.prefix_linear_attention(*part, k_enc, v_enc, eps)
            with torch.no_grad():
                _, state = kernels.pla.pla_prefill(*part, k_enc, v_enc, eps)
        else:
            y, state = kernels.pla.pla_prefill(*part, k_enc, v_enc, eps)
        return y, state.S, state.z

    groups = starts.unique().tolist()
    if groups == [0]:  # no padding: one call on the tensors as they are
        y, S, z = read_rows(slice(None), 0)
        return y, (S, z)
    y = v.new_zeros(v.shape)
    S = z = None
    for start in groups:
        rows = (starts == start).nonzero().squeeze(1)
        y_rows, S_rows, z_rows = read_rows(rows, start)
        if S is None:
            S = S_rows.new_zeros(len(starts), *S_rows.shape[1:])
            z = z_rows.new_zeros(len(starts), *z_rows.shape[1:])
        y[rows, :, start:], S[rows], z[rows] = y_rows, S_rows, z_rows
    return y, (S, z)
