"""Rotary embedding fused with the split of megatron's packed qkv (kernels/rotary) and the
attention layers that use it.

CPU: the reference against megatron's own split and rotary (bit-equal); the Triton kernel under
the interpreter (TRITON_INTERPRET=1, in a subprocess) against the reference, forward and
backward; the dispatcher's fallbacks; the attention layer's forward against megatron's
SelfAttention.forward (bit-equal output and gradients), and megatron's path for a setting the
kernel does not implement. GPU tests (marked gpu): the model's shapes in bf16, a grouped-query
layout, and the layer's forward in bf16 against megatron's.

Tolerances on ||out - ref|| / ||ref|| against the fp32 reference: bf16 / fp16 1e-2 (one
rounding; the reference also rounds cos and sin to the input dtype as megatron does), fp32 1e-6.
"""
import pytest
import torch

import kernels.rotary as kr
from kernels.rotary import rotate, split_heads, split_rotary_qkv, split_rotary_qkv_reference
from tests.fakes import OnCuda, fallback_warnings, kernel_state_fixture, run_under_interpreter
from tests.multiproc import launch

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-6}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def angles(s: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """megatron's RotaryEmbedding output for positions 0..s-1: [s, 1, 1, rotary_dim] fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    f = torch.outer(torch.arange(s, dtype=torch.float32), inv_freq)
    return torch.cat([f, f], dim=-1)[:, None, None, :]


def make(s, b, groups, q_per_group, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixed = torch.randn(s, b, groups * (q_per_group + 2) * d, generator=g)
    return mixed.to(device=device, dtype=dtype), angles(s, d).to(device)


def check_kernel(T, s, b, groups, q_per_group, d, dtype, device, layout="contiguous", seed=0):
    """q, k, v and d(mixed) of T.split_rotary_qkv_triton vs the fp32 reference -> errors.
    layout "transposed": mixed is [b, s, width] seen as [s, b, width] (strided rows)."""
    mixed, freqs = make(s, b, groups, q_per_group, d, dtype, device, seed)
    if layout == "transposed":
        mixed = mixed.transpose(0, 1).contiguous().transpose(0, 1)
    ours_in, ref_in = mixed.detach().requires_grad_(), mixed.float().requires_grad_()
    ours = T.split_rotary_qkv_triton(ours_in, freqs, groups, d)
    ref = split_rotary_qkv_reference(ref_in, freqs, groups, d)
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(t.shape, generator=g).to(device) for t in ref]
    torch.autograd.backward(ours, [t.to(dtype) for t in grads])
    torch.autograd.backward(ref, grads)
    for o, r in zip(ours, ref):
        assert o.dtype == dtype and o.shape == r.shape and o.is_contiguous()
    assert ours_in.grad.dtype == dtype and ours_in.grad.shape == mixed.shape
    errs = {name: rel(o, r) for name, o, r in zip("qkv", ours, ref)}
    errs["dmixed"] = rel(ours_in.grad, ref_in.grad)
    bad = {key: e for key, e in errs.items() if not e < TOL[dtype]}
    assert not bad, f"{(s, b, groups, q_per_group, d)} {dtype} {layout}: {errs}"
    return errs


# ---- the reference is megatron's math ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 8])  # the whole head, and megatron's rotary_percent 0.5
def test_reference_rotation_is_megatrons(dtype, rotary_dim):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2)
    t = torch.randn(11, 3, 2, 16).to(dtype)
    freqs = angles(11, rotary_dim)
    # cp_group: unused by the bshd path, given so that no process group is needed
    assert torch.equal(rotate(t, freqs),
                       apply_rotary_pos_emb(t, freqs, config=config, cp_group=object()))


def test_reference_split_follows_megatrons_group_layout():
    """Per query group: its query heads, then its key head, then its value head
    (q1 q2 k1 v1 | q3 q4 k2 v2, megatron's get_query_key_value_tensors)."""
    s, b, groups, qpg, d = 3, 2, 2, 2, 4
    heads = torch.arange(groups * (qpg + 2)).repeat_interleave(d).float()  # head slot ids
    mixed = heads.expand(s, b, -1)
    q, k, v = split_heads(mixed, groups, d)
    assert q[0, 0, :, 0].tolist() == [0, 1, 4, 5]
    assert k[0, 0, :, 0].tolist() == [2, 6] and v[0, 0, :, 0].tolist() == [3, 7]


# ---- the Triton kernel under the interpreter -----------------------------------------------

_INTERPRET_SNIPPET = r"""
import torch
from tests.test_rotary_kernel import check_kernel
from kernels.rotary import triton_rotary as T
cases = [  # s, b, groups, queries per group, head dim, dtype, layout
    (7, 3, 2, 1, 8, torch.float32, "contiguous"),      # one query per group (the model's)
    (5, 2, 2, 2, 12, torch.float32, "contiguous"),     # grouped queries; a half of 6 (masked)
    (9, 2, 1, 3, 16, torch.bfloat16, "contiguous"),
    (6, 3, 3, 1, 8, torch.float16, "transposed"),      # strided rows of mixed
    (0, 2, 2, 1, 8, torch.float32, "contiguous"),      # no tokens
]
for case in cases:
    print(check_kernel(T, *case[:6], "cpu", layout=case[6]))
T.CONFIG = (4, 1)  # several programs over the rows, the last one partly masked
print(check_kernel(T, 7, 3, 2, 2, 8, torch.float32, "cpu", seed=1))
print("INTERPRET OK")
"""


def test_triton_kernel_under_interpreter():
    r = run_under_interpreter(_INTERPRET_SNIPPET)
    assert r.returncode == 0 and "INTERPRET OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---- the dispatcher ---------------------------------------------------------------------------

kernel_state = kernel_state_fixture(kr)


def test_cpu_takes_the_reference_silently(kernel_state):
    kernel_state(None, ImportError("no triton"))
    mixed, freqs = make(5, 2, 2, 1, 8, torch.float32, "cpu")
    (out,), messages = fallback_warnings([lambda: split_rotary_qkv(mixed, freqs, 2, 8)],
                                         "rotary qkv")
    assert messages == []
    for o, r in zip(out, split_rotary_qkv_reference(mixed, freqs, 2, 8)):
        assert torch.equal(o, r)


def test_cuda_fallbacks_warn_once_per_reason(kernel_state):
    from kernels.rotary import triton_rotary

    mixed, freqs = make(5, 2, 2, 1, 8, torch.float32, "cpu")
    cuda_mixed = mixed.as_subclass(OnCuda)
    kernel_state(None, ImportError("libcuda.so.1: cannot open shared object file"))
    _, messages = fallback_warnings([lambda: split_rotary_qkv(cuda_mixed, freqs, 2, 8)] * 2,
                                    "rotary qkv")
    assert len(messages) == 1 and "ImportError: libcuda.so.1" in messages[0]

    kernel_state(triton_rotary, None)
    partial = angles(5, 4)  # rotary over half the head: the reference's job
    _, messages = fallback_warnings([lambda: split_rotary_qkv(cuda_mixed, partial, 2, 8)] * 2,
                                    "rotary qkv")
    assert len(messages) == 1 and "does not support" in messages[0], messages


# ---- the attention layer against megatron's forward -----------------------------------------

def _layer_vs_megatron(preset_name: str, interleaved: bool = False):
    """One attention layer's output and gradients through its forward and through megatron's
    SelfAttention.forward, same weights and input."""
    from megatron.core.transformer.attention import SelfAttention

    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.mixers import attention
    from megatron_jrt.model import build_model

    init_distributed(seed=5)
    cfg = preset(preset_name)
    model = build_model(cfg, cfg.to_transformer_config())
    layer = next(layer.self_attention for layer in model.decoder.layers
                 if isinstance(layer.self_attention, SelfAttention))
    if interleaved:  # a setting kernels/rotary does not implement
        layer.config.rotary_interleaved = True
        layer.megatron_rotary_reason = attention._fused_rotary_unsupported(layer)
    s = 24
    x = torch.randn(s, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    freqs = model.rotary_pos_emb(s)
    results = []
    for forward in (type(layer).forward, SelfAttention.forward):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        out, bias = forward(layer, xg, None, rotary_pos_emb=freqs)
        out.backward(torch.ones_like(out))
        results.append((out.detach(), bias, xg.grad, layer.linear_qkv.weight.grad.clone()))
    return layer.megatron_rotary_reason, results


@pytest.mark.parametrize("preset_name", ["jrt-tiny", "transformer-tiny"])
def test_attention_layers_equal_megatrons_forward(preset_name):
    reason, (ours, megatrons) = launch(_layer_vs_megatron, 1, preset_name,
                                       in_process=True)[0]
    assert reason is None
    assert ours[1] is None and megatrons[1] is None
    for a, b in zip(ours[:1] + ours[2:], megatrons[:1] + megatrons[2:]):
        assert torch.equal(a, b)


def test_a_setting_outside_the_kernel_takes_megatrons_path():
    reason, (ours, megatrons) = launch(_layer_vs_megatron, 1, "transformer-tiny", True,
                                       in_process=True)[0]
    assert reason == "rotary_interleaved"
    assert torch.equal(ours[0], megatrons[0]) and torch.equal(ours[2], megatrons[2])


# ---- GPU ----------------------------------------------------------------------------------------

GPU_CASES = [  # s, b, groups, queries per group, head dim, dtype: jrt-360m's step, 8k, the
    # 1.3B's heads, grouped queries, fp16, fp32
    (2048, 16, 16, 1, 64, torch.bfloat16),
    (8192, 2, 16, 1, 64, torch.bfloat16),
    (2048, 8, 16, 1, 128, torch.bfloat16),
    (1000, 3, 4, 4, 64, torch.bfloat16),
    (513, 2, 8, 1, 64, torch.float16),
    (100, 3, 2, 1, 256, torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("s, b, groups, q_per_group, d, dtype", GPU_CASES)
def test_triton_matches_reference_on_gpu(s, b, groups, q_per_group, d, dtype):
    from kernels.rotary import triton_rotary as T
    errs = check_kernel(T, s, b, groups, q_per_group, d, dtype, "cuda", seed=s + b)
    print(f"{(s, b, groups, q_per_group, d)} {str(dtype)[6:]}: "
          + " ".join(f"{k} {e:.1e}" for k, e in errs.items()))


@pytest.mark.gpu
def test_dispatcher_uses_triton_on_cuda():
    mixed, freqs = make(64, 4, 4, 1, 64, torch.bfloat16, "cuda")
    assert kr.triton_available()
    (out,), messages = fallback_warnings(
        [lambda: split_rotary_qkv(mixed.requires_grad_(), freqs, 4, 64)], "rotary qkv")
    assert messages == [] and type(out[0].grad_fn).__name__ == "SplitRotaryQKVBackward"
