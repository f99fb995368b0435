"""The language-model loss over a vocabulary split across tensor-parallel ranks: one public API,
kernels selected behind it.

The fused Triton kernels (kernels/cross_entropy/triton_cross_entropy.py) on CUDA; the PyTorch
reference (kernels/cross_entropy/reference.py) on CPU, and on CUDA when Triton failed to import
or the dtype is not supported (fp64). A CUDA call that falls back warns once per reason.

logits [s, b, v_local] are this rank's slice of the vocabulary (rank r of the group holds the
global ids [r * v_local, (r + 1) * v_local)); labels [s, b] are global ids; the loss is
logsumexp over the global vocabulary - the label's logit, fp32 [s, b], as megatron-core's
`vocab_parallel_cross_entropy` and `fused_vocab_parallel_cross_entropy` compute it.
"""
from __future__ import annotations

from types import ModuleType

import torch.distributed as dist
from torch import Tensor

from kernels.cross_entropy.reference import vocab_parallel_cross_entropy_reference
from kernels.optional import OptionalKernels

__all__ = ["triton_available", "vocab_parallel_cross_entropy",
           "vocab_parallel_cross_entropy_reference"]

_KERNELS = OptionalKernels("kernels.cross_entropy.triton_cross_entropy", "Cross entropy",
                           "with fp32 copies of the logits")


def triton_available() -> bool:
    return _KERNELS.available()


def _triton_for(logits: Tensor) -> ModuleType | None:
    if not logits.is_cuda:
        return None
    mod = _KERNELS.load_for_cuda()
    if mod is None:
        return None
    if not mod.supports(logits):
        _KERNELS.warn_fallback_once("dtype", f"the Triton kernel does not support logits "
                                    f"{list(logits.shape)} {logits.dtype}")
        return None
    return mod


def vocab_parallel_cross_entropy(logits: Tensor, labels: Tensor,
                                 tp_group: dist.ProcessGroup | None = None, *,
                                 inplace_backward: bool = False) -> Tensor:
    """Per-token loss [s, b] (fp32; fp64 for fp64 logits) of logits [s, b, v_local] and
    labels [s, b]; tp_group None means this rank holds the whole vocabulary. Differentiable
    in the logits; the gradient has their dtype. `inplace_backward` (Triton path only; the
    reference ignores it): the backward writes the gradient over the logits, saving a
    logits-sized buffer at the loss's backward, for callers that never read the logits after
    the loss (megatron_jrt.model)."""
    if (mod := _triton_for(logits)) is not None:
        return mod.vocab_parallel_cross_entropy_triton(logits, labels, tp_group, inplace_backward)
    return vocab_parallel_cross_entropy_reference(logits, labels, tp_group)
