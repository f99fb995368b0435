"""The project's Triton PLA kernels inside the HF model (megatron_jrt/hf/pla_kernels.py).

CPU: the dispatch. `KERNEL_DEVICE_TYPES` is widened to the CPU and kernels.pla's functions (the
PyTorch reference on CPU) are wrapped in recorders, so that the kernel path of the model runs
here and must give the plain path's logits, generations and gradients; reads it cannot take
(a continued cache, a mask that is not left padding, an unsupported shape, kernels that do not
import) fall back to the plain path, said once. One test runs the real Triton kernels on CPU under
Triton's interpreter. GPU (marked gpu): the Triton path against the plain path in fp32 and bf16.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from tests.fakes import run_under_interpreter
from tests.hf_tiny import PREFIX, greedy, left_pad, random_prompts, returned_cache, tiny_model

pytest.importorskip("transformers")


class Recorder:
    """kernels.pla's pla_prefill and prefix_linear_attention, recording each call's shapes."""

    def __init__(self, pla):
        self.calls: list[tuple[str, tuple, tuple]] = []  # (function, q shape, k_enc shape)
        self.pla_prefill = self._recording("pla_prefill", pla.pla_prefill)
        self.prefix_linear_attention = self._recording("prefix_linear_attention",
                                                       pla.prefix_linear_attention)

    def _recording(self, name, function):
        def call(q, k, v, k_enc, v_enc, eps):
            self.calls.append((name, tuple(q.shape), tuple(k_enc.shape)))
            return function(q, k, v, k_enc, v_enc, eps)
        return call


@pytest.fixture
def pla_kernels(monkeypatch):
    """megatron_jrt.hf.pla_kernels with nothing said yet."""
    from megatron_jrt.hf import pla_kernels

    monkeypatch.setattr(pla_kernels, "_said", set())
    return pla_kernels


@pytest.fixture
def kernels_on_cpu(pla_kernels, monkeypatch) -> Recorder:
    """The model's kernel path on CPU, through recorders around kernels.pla (the reference)."""
    import kernels.pla as pla
    from kernels.pla.triton_pla import supports

    recorder = Recorder(pla)
    monkeypatch.setattr(pla_kernels, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(pla_kernels, "project_kernels",
                        lambda: pla_kernels.ProjectKernels(recorder, supports, ""))
    return recorder


def plain(pla_kernels, monkeypatch, function):
    """`function()` with the kernel path off."""
    with monkeypatch.context() as patch:
        patch.setattr(pla_kernels, "KERNEL_DEVICE_TYPES", ())
        return function()


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "runs in plain torch" in r.getMessage()]


def test_cpu_reads_take_the_plain_path_without_importing_or_saying_anything(pla_kernels,
                                                                            monkeypatch, caplog):
    monkeypatch.setattr(pla_kernels, "project_kernels",
                        lambda: pytest.fail("the kernels were looked up for a CPU read"))
    model, (prompt,) = tiny_model(), random_prompts(40)
    with torch.no_grad():
        model(prompt[None], use_cache=False)
    assert said(caplog) == []


def test_unpadded_forward_takes_one_kernel_call_per_pla_layer_with_the_plain_logits(
        kernels_on_cpu, pla_kernels, monkeypatch, caplog):
    model, prompts = tiny_model(), random_prompts(40, 40)
    ids = torch.stack(prompts)
    with torch.no_grad():
        fast = model(ids, use_cache=False).logits
        slow = plain(pla_kernels, monkeypatch, lambda: model(ids, use_cache=False).logits)
    assert kernels_on_cpu.calls == [("pla_prefill", (2, 4, 40, 16), (2, 4, PREFIX, 16))] * 2
    assert (fast - slow).abs().max() <= 1e-4
    assert said(caplog) == []


def test_left_padded_rows_are_one_call_per_padding_with_each_row_alone(kernels_on_cpu):
    model, prompts = tiny_model(), random_prompts(40, 25, 40, 12)
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, use_cache=False).logits
    calls = kernels_on_cpu.calls[:3]  # the first PLA layer: paddings 0 (two rows), 15 and 28
    assert sorted(calls) == [("pla_prefill", (1, 4, 12, 16), (1, 4, 12, 16)),
                             ("pla_prefill", (1, 4, 25, 16), (1, 4, PREFIX, 16)),
                             ("pla_prefill", (2, 4, 40, 16), (2, 4, PREFIX, 16))]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None], use_cache=False).logits[0]
            assert (batched[row, -len(prompt):] - alone).abs().max() <= 1e-4


def test_generate_with_the_kernel_prefill_equals_the_plain_one(kernels_on_cpu, pla_kernels,
                                                               monkeypatch):
    model, prompts = tiny_model(), random_prompts(30, 21, 7)  # 7 < prefix: read-twice padded
    ids, mask = left_pad(prompts)
    fast = greedy(model, ids, 16, attention_mask=mask)
    assert {name for name, _, _ in kernels_on_cpu.calls} == {"pla_prefill"}
    calls = len(kernels_on_cpu.calls)
    slow = plain(pla_kernels, monkeypatch, lambda: greedy(model, ids, 16, attention_mask=mask))
    assert len(kernels_on_cpu.calls) == calls  # the plain run did not use them
    assert torch.equal(fast.sequences, slow.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(fast.logits, slow.logits)) <= 1e-4


def test_training_through_the_kernel_path_gives_the_plain_gradients(kernels_on_cpu, pla_kernels,
                                                                    monkeypatch):
    model, prompts = tiny_model(), random_prompts(40, 40)
    ids = torch.stack(prompts)

    def gradients():
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    fast = gradients()
    slow = plain(pla_kernels, monkeypatch, gradients)
    assert {name for name, _, _ in kernels_on_cpu.calls} == {"prefix_linear_attention",
                                                             "pla_prefill"}
    assert all((fast[name] - slow[name]).abs().max() <= 1e-4 for name in slow)
    assert fast["model.layers.0.mixer.k_enc_proj.weight"].abs().max() > 0


def test_chunks_after_the_first_are_plain_said_once(kernels_on_cpu, caplog):
    model, (prompt,) = tiny_model(prefill_chunk_tokens=20), random_prompts(70)
    reference = tiny_model(prefill_chunk_tokens=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            chunked = greedy(model, prompt[None], 4)
    one_pass = greedy(reference, prompt[None], 4)
    assert torch.equal(chunked.sequences, one_pass.sequences)
    # 2 PLA layers: the first chunk of each generate(), then the one-pass reference
    assert [q_shape[2] for _, q_shape, _ in kernels_on_cpu.calls] == [20] * 4 + [70] * 2
    (message,) = said(caplog)
    assert "continues a cached state" in message and "prefill_chunk_tokens" in message


@pytest.mark.parametrize("problem", ["right padding", "feature dim 8"])
def test_reads_the_kernels_do_not_take_are_plain_said_once(problem, kernels_on_cpu, pla_kernels,
                                                           monkeypatch, caplog):
    config = {"feature_dim": 8} if problem == "feature dim 8" else {}
    model, prompts = tiny_model(**config), random_prompts(40, 30)
    ids, mask = left_pad(prompts)
    if problem == "right padding":
        ids, mask = ids.flip(1), mask.flip(1)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        for _ in range(2):
            fast = model(ids, attention_mask=mask, use_cache=False).logits
        slow = plain(pla_kernels, monkeypatch,
                     lambda: model(ids, attention_mask=mask, use_cache=False).logits)
    assert kernels_on_cpu.calls == [] and torch.equal(fast, slow)
    (message,) = said(caplog)
    assert {"right padding": "not left padding", "feature dim 8": "feature dim 8"}[problem] \
        in message


def test_kernels_that_do_not_import_leave_the_plain_path_said_once_with_the_error(
        pla_kernels, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "kernels.pla", None)  # as where the project is absent
    missing = pla_kernels.project_kernels.__wrapped__()
    assert missing.pla is None and "ModuleNotFoundError" in missing.error
    monkeypatch.setattr(pla_kernels, "project_kernels", lambda: missing)
    monkeypatch.setattr(pla_kernels, "KERNEL_DEVICE_TYPES", ("cuda", "cpu"))
    model, (prompt,) = tiny_model(), random_prompts(40)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        fast = [model(prompt[None], use_cache=False).logits for _ in range(2)]
    slow = plain(pla_kernels, monkeypatch, lambda: model(prompt[None], use_cache=False).logits)
    assert torch.equal(fast[0], slow.detach())
    (message,) = said(caplog)
    assert "do not import (ModuleNotFoundError" in message and "install megatron-jrt" in message


_INTERPRETER = r"""
import torch
from types import SimpleNamespace
from kernels.pla import triton_pla
from megatron_jrt.hf import pla_kernels
from tests.hf_tiny import left_pad, random_prompts, returned_cache, tiny_model

triton = SimpleNamespace(pla_prefill=triton_pla.pla_prefill_triton,
                         prefix_linear_attention=triton_pla.pla_triton)
pla_kernels.project_kernels = lambda: pla_kernels.ProjectKernels(triton, triton_pla.supports, "")
model = tiny_model()
ids, mask = left_pad(random_prompts(40, 25, 40))
with torch.no_grad():
    pla_kernels.KERNEL_DEVICE_TYPES = ("cpu",)
    fast = model(ids, attention_mask=mask, use_cache=True)
    pla_kernels.KERNEL_DEVICE_TYPES = ()
    slow = model(ids, attention_mask=mask, use_cache=True)
real = mask.bool()
print("logits", (fast.logits - slow.logits)[real].abs().max().item())
for index in (0, 3):  # the PLA layers' states
    for a, b in zip(returned_cache(fast).layers[index], returned_cache(slow).layers[index]):
        print("state", ((a - b).abs().max() / b.abs().max()).item())
"""


def test_the_triton_kernels_in_the_model_under_the_interpreter():
    """The real kernels (TRITON_INTERPRET=1, in a subprocess: the flag is read when they are
    defined) against the plain path: logits at real positions and the PLA states."""
    result = run_under_interpreter(_INTERPRETER)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [name for name, _ in lines] == ["logits"] + ["state"] * 4
    assert all(float(value) <= 1e-4 for _, value in lines), lines


# ----------------------------------------------------------------------------------------- GPU

def _gpu_model(dtype: torch.dtype):
    """Random, head dim 64 (the Gluon kernels' shape on Hopper in bf16), prefix 64, window 32."""
    from megatron_jrt.hf.configuration_jrt import JRTConfig
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    torch.manual_seed(0)
    config = JRTConfig(vocab_size=512, hidden_size=256, num_layers=5, num_heads=4,
                       layer_pattern="PCSPC", prefix_length=64, swa_window=32,
                       initializer_range=0.1)
    return JRTForCausalLM(config).to("cuda", dtype).eval()


def _gpu_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids, mask = left_pad([torch.randint(0, 512, (n,), generator=generator)
                          for n in (300, 300, 180, 40)])
    return ids.cuda(), mask.cuda()


@pytest.fixture
def triton_recorder(pla_kernels, monkeypatch) -> Recorder:
    """The real kernels.pla on CUDA (Triton), recording its calls."""
    import kernels.pla as pla

    assert pla.triton_available(), "the Triton kernels do not import on this GPU machine"
    recorder = Recorder(pla)
    real = pla_kernels.project_kernels()
    monkeypatch.setattr(pla_kernels, "project_kernels",
                        lambda: pla_kernels.ProjectKernels(recorder, real.supports, ""))
    return recorder


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_gpu_triton_logits_equal_the_plain_path(dtype, tolerance, triton_recorder, pla_kernels,
                                                monkeypatch, caplog):
    model, (ids, mask) = _gpu_model(dtype), _gpu_prompts()
    with torch.no_grad():
        fast = model(ids, attention_mask=mask, use_cache=True)
        slow = plain(pla_kernels, monkeypatch,
                     lambda: model(ids, attention_mask=mask, use_cache=True))
    assert len(triton_recorder.calls) == 2 * 3  # 2 PLA layers x 3 paddings
    real = mask.bool()
    assert _relative(fast.logits[real], slow.logits[real]) <= tolerance
    for index in (0, 3):
        for a, b in zip(returned_cache(fast).layers[index],
                        returned_cache(slow).layers[index]):
            assert a.dtype == b.dtype == torch.float32 and _relative(a, b) <= tolerance
    assert said(caplog) == []


@pytest.mark.gpu
def test_gpu_triton_generate_greedy_equals_the_plain_path(triton_recorder, pla_kernels,
                                                          monkeypatch):
    model, (ids, mask) = _gpu_model(torch.float32), _gpu_prompts()
    fast = greedy(model, ids, 32, attention_mask=mask)
    assert triton_recorder.calls
    slow = plain(pla_kernels, monkeypatch, lambda: greedy(model, ids, 32, attention_mask=mask))
    assert torch.equal(fast.sequences, slow.sequences)
    assert max(_relative(a, b) for a, b in zip(fast.logits, slow.logits)) <= 1e-4
