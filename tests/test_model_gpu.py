"""The model on CUDA (Triton PLA kernels) equals the model on CPU (reference PLA)."""
import pytest
import torch

from tests.multiproc import launch

pytestmark = pytest.mark.gpu
SEQ, PROMPT = 96, 40


def _cuda_vs_cpu():
    from kernels.pla import triton_available
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.inference import RecurrentDecoder
    from megatron_jrt.model import build_model

    init_distributed(seed=5)
    cfg = preset("jrt-tiny", prefix_length=32, max_sequence_length=SEQ)
    config = cfg.to_transformer_config()
    gpu_model = build_model(cfg, config).cuda().eval()
    cpu_model = build_model(cfg, config).eval()
    cpu_model.load_state_dict({k: v.cpu() for k, v in gpu_model.state_dict().items()})
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        gpu_logits = gpu_model(tokens.cuda(), positions.cuda(), None).float().cpu()
        cpu_logits = cpu_model(tokens, positions, None)
    forward_error = float((gpu_logits - cpu_logits).norm() / cpu_logits.norm())

    labels = torch.roll(tokens, -1, dims=1).cuda()
    gpu_model.train()
    gpu_model(tokens.cuda(), positions.cuda(), None, labels=labels).mean().backward()
    grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                       for p in gpu_model.parameters())

    gpu_model.eval()
    decoder = RecurrentDecoder(gpu_model, cfg.prefix_length)
    steps = [decoder.prefill(tokens[:, :PROMPT].cuda()).cpu()]
    for t in range(PROMPT, SEQ):
        steps.append(decoder.step(tokens[:, t].cuda()).cpu())
    decoded = torch.stack(steps, dim=1)
    decode_error = float((decoded - cpu_logits[:, PROMPT - 1:]).norm() / cpu_logits.norm())
    return triton_available(), forward_error, grads_finite, decode_error


def test_cuda_model_and_recurrent_decoding_match_cpu():
    triton, forward_error, grads_finite, decode_error = launch(_cuda_vs_cpu, 1, in_process=True)[0]
    assert triton, "the Triton PLA kernels did not load on CUDA"
    assert forward_error < 1e-3, forward_error  # fp32 on both; TF32-free Triton path
    assert grads_finite
    assert decode_error < 1e-3, decode_error
