"""Silence megatron-core's warnings that a user cannot act on, for our command-line tools.

Each missing optional accelerator is warned about once per megatron module that probes it
(jrt-train's "accelerators:" line says it once instead), megatron probes the .grad of non-leaf
tensors, and torch warns about the renamed collectives megatron calls. Call
`silence_megatron_noise()` before megatron is first imported: most are import-time warnings.
"""
from __future__ import annotations

import warnings

MEGATRON_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (UserWarning, "Transformer Engine and Apex are not installed"),
    (UserWarning, "Apex is not installed"),
    (UserWarning, "full scope is deprecated"),
    (UserWarning, "The .grad attribute of a Tensor that is not a leaf"),
    (FutureWarning, "`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)`"),
)


def silence_megatron_noise() -> None:
    """Install "ignore" filters for MEGATRON_NOISE (process-wide, like `python -W`)."""
    for category, message in MEGATRON_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
