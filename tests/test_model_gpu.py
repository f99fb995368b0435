"""On CUDA the model with the Triton PLA kernels equals the model with the reference PLA."""
import pytest
import torch

from tests.multiproc import launch

pytestmark = pytest.mark.gpu
SEQ, PROMPT = 96, 40


def _triton_vs_reference():
    import megatron_jrt.mixers.pla as pla_mixer
    from kernels.pla import triton_available
    from kernels.pla.reference import pla_reference
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.inference import RecurrentDecoder
    from megatron_jrt.model import build_model

    init_distributed(seed=5)
    cfg = preset("jrt-tiny", prefix_length=32, max_sequence_length=SEQ)
    config = cfg.to_transformer_config()
    gpu_model = build_model(cfg, config).cuda().eval()
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(1)).cuda()
    positions = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        gpu_logits = gpu_model(tokens, positions, None).float()
        kernel = pla_mixer.prefix_linear_attention
        pla_mixer.prefix_linear_attention = pla_reference
        try:
            reference_logits = gpu_model(tokens, positions, None).float()
        finally:
            pla_mixer.prefix_linear_attention = kernel
    forward_error = float((gpu_logits - reference_logits).norm() / reference_logits.norm())

    labels = torch.roll(tokens, -1, dims=1)
    gpu_model.train()
    gpu_model(tokens, positions, None, labels=labels).mean().backward()
    grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                       for p in gpu_model.parameters())

    gpu_model.eval()
    decoder = RecurrentDecoder(gpu_model, cfg.prefix_length)
    steps = [decoder.prefill(tokens[:, :PROMPT])]
    for t in range(PROMPT, SEQ):
        steps.append(decoder.step(tokens[:, t]))
    decoded = torch.stack(steps, dim=1)
    expected = reference_logits[:, PROMPT - 1:]
    decode_error = float((decoded - expected).norm() / expected.norm())
    return triton_available(), forward_error, grads_finite, decode_error


def test_triton_model_and_recurrent_decoding_match_the_reference():
    triton, forward_error, grads_finite, decode_error = launch(_triton_vs_reference, 1,
                                                               in_process=True)[0]
    assert triton, "the Triton PLA kernels did not load on CUDA"
    assert forward_error < 1e-3, forward_error  # fp32 on both; TF32-free Triton path
    assert grads_finite
    assert decode_error < 1e-3, decode_error
