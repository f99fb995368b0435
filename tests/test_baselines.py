"""The paper's baselines in this stack: Transformer++ (every layer full causal attention, letter
A) and Based (the JRT pattern with prefix_length 0, no encoder, no MLM term).

CPU (fp32): the A mixer equals a plain-torch causal attention with rotary; Based's PLA is causal
Taylor linear attention; TP=2 equals TP=1; recurrent decoding equals the parallel forward; both
train with `jrt-train` without an MLM report; a Transformer checkpoint resumes exactly.
GPU (`-m gpu`): the SDPA path in bf16 against the fp32 reference, with FlashAttention forced, and
the PLA kernels with an empty encoder region.
"""
import contextlib
import io
import math

import pytest
import torch

from tests.multiproc import launch
from tests.runs import loss_rows, run_in_process

SEQ, PROMPT, BATCH = 40, 21, 2  # PROMPT > swa_window (8): decoding crosses the window


def _build(name: str, tp: int = 1, seed: int = 3, bf16: bool = False, **overrides):
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed(tensor_parallel=tp, seed=seed)
    cfg = preset(name, **overrides)
    dtype = torch.bfloat16 if bf16 else torch.float32
    return cfg, build_model(cfg, cfg.to_transformer_config(tensor_parallel=tp, bf16=bf16,
                                                           params_dtype=dtype))


def _tokens(seed: int = 0, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 300, (BATCH, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return gather_from_tensor_model_parallel_region(model(tokens, positions, None))


# ---- plain-torch references ------------------------------------------------------------------

def rotate_half_rotary(t: torch.Tensor, base: float) -> torch.Tensor:
    """t [s, b, heads, dh] at positions 0..s-1, rotary over the whole head, non-interleaved."""
    s, dh = t.shape[0], t.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], dim=-1)[:, None, None].to(t.dtype)  # [s, 1, 1, dh]
    first, second = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


def causal_attention_reference(x, w_qkv, w_out, heads: int, base: float) -> torch.Tensor:
    """x [s, b, d] -> [s, b, d]; w_qkv [3d, d] in megatron's per-head [q | k | v] row order."""
    s, b, d = x.shape
    dh = d // heads
    q, k, v = (x @ w_qkv.T).view(s, b, heads, 3, dh).unbind(3)
    q, k = rotate_half_rotary(q, base), rotate_half_rotary(k, base)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, s, dh]
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    out = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    return out.permute(2, 0, 1, 3).reshape(s, b, d) @ w_out.T


def causal_taylor_linear_attention(x, w_qkv, w_out, heads: int, f: int) -> torch.Tensor:
    """Based's linear attention, O(s^2) form: y_i = sum_{j<=i} a_ij v_j / sum_{j<=i} a_ij with
    a_ij = 1 + s_ij + s_ij^2 / 2, s_ij = q_i.k_j / sqrt(f); w_qkv per head [q (f) | k (f) | v]."""
    s, b, d = x.shape
    dv = d // heads
    q, k, v = (x @ w_qkv.T).view(s, b, heads, 2 * f + dv).split([f, f, dv], dim=-1)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(f)
    a = (1 + scores + scores ** 2 / 2) * torch.ones(s, s).tril()
    out = (a @ v) / a.sum(-1, keepdim=True)
    return out.permute(2, 0, 1, 3).reshape(s, b, d) @ w_out.T


# ---- the mixers against their references ----------------------------------------------------

def _mixers_vs_references():
    from megatron_jrt.mixers.attention import KVCache

    out = {}
    x = torch.randn(SEQ, BATCH, 64, generator=torch.Generator().manual_seed(1))
    cfg, model = _build("transformer-tiny")
    mixer = model.decoder.layers[0].self_attention
    with torch.no_grad():
        y, bias = mixer(x, None, rotary_pos_emb=model.rotary_pos_emb(SEQ))
        ref = causal_attention_reference(x, mixer.linear_qkv.weight, mixer.linear_proj.weight,
                                         cfg.num_heads, cfg.rotary_base)
        out["attention_err"] = float((y - ref).abs().max() / ref.abs().max())
        out["attention_bias"] = bias
        _, state = mixer.prefill(x[:PROMPT], rotary_pos_emb=model.rotary_pos_emb(PROMPT))
        out["cache_is_kv"] = isinstance(state, KVCache)
        out["cache_len"] = state.keys.shape[2]  # every token: full attention keeps them all
    q = torch.zeros(SEQ, BATCH, cfg.num_heads, cfg.head_dim)
    with pytest.raises(NotImplementedError, match="attention masks"):
        mixer.core_attention(q, q, q, torch.ones(BATCH, 1, SEQ, SEQ, dtype=torch.bool))

    cfg, model = _build("based-tiny")
    pla = model.decoder.layers[cfg.layer_pattern.index("P")].self_attention
    with torch.no_grad():
        y, _ = pla(x, None)
        ref = causal_taylor_linear_attention(x, pla.linear_qkv.weight, pla.linear_proj.weight,
                                             cfg.num_heads, cfg.feature_dim)
    out["based_err"] = float((y - ref).abs().max() / ref.abs().max())
    out["based_has_encoder"] = pla.linear_kv_enc is not None
    return out


def test_attention_and_based_mixers_equal_plain_torch_references():
    r = launch(_mixers_vs_references, 1, in_process=True)[0]
    assert r["attention_err"] < 1e-5, r
    assert r["attention_bias"] is None
    assert r["cache_is_kv"] and r["cache_len"] == PROMPT, r
    assert r["based_err"] < 1e-5, r
    assert not r["based_has_encoder"], "prefix_length 0 must build no k_enc/v_enc projection"


# ---- tensor parallelism ---------------------------------------------------------------------

def _tp2_vs_tp1():
    """Each layout from the same seed: CPU initialisation builds the full weight on every rank
    and keeps the rank's slice, so TP=1 and TP=2 hold the same model."""
    from megatron.core import parallel_state

    tokens = _tokens(seed=7)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    seen = {}
    for tp in (1, 2):
        _, model = _build("transformer-tiny", tp=tp, seed=1234)
        logits = _logits(model, tokens).detach()
        loss = model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        attention = model.decoder.layers[1].self_attention
        seen[tp] = (logits, loss.item(), attention.linear_qkv.weight.grad,
                    attention.linear_proj.weight.grad)
        parallel_state.destroy_model_parallel()
    rank = torch.distributed.get_rank()
    (logits1, loss1, qkv1, proj1), (logits2, loss2, qkv2, proj2) = seen[1], seen[2]
    rows, cols = qkv2.shape[0], proj2.shape[1]  # the rank's heads: qkv rows, proj columns
    grad_err = max(float((qkv2 - qkv1[rank * rows:(rank + 1) * rows]).abs().max()
                         / qkv1.abs().max()),
                   float((proj2 - proj1[:, rank * cols:(rank + 1) * cols]).abs().max()
                         / proj1.abs().max()))
    return (float((logits2 - logits1).abs().max() / logits1.abs().max()), loss2 - loss1,
            grad_err, rows * 2 == qkv1.shape[0])


def test_transformer_tp2_equals_tp1():
    for logits_err, loss_diff, grad_err, sharded in launch(_tp2_vs_tp1, 2, timeout=300):
        assert sharded, "TP=2 must split the attention heads"
        assert logits_err < 1e-5 and abs(loss_diff) < 1e-5, (logits_err, loss_diff)
        assert grad_err < 1e-4, grad_err


# ---- recurrent decoding ---------------------------------------------------------------------

def _decoding(name: str):
    from megatron_jrt.generate import greedy_generate
    from megatron_jrt.inference import RecurrentDecoder

    cfg, model = _build(name)
    model.eval()
    tokens = _tokens()
    with torch.no_grad():
        parallel = _logits(model, tokens)
        changed = tokens.clone()
        changed[:, 30] += 1
        causal_gap = float((_logits(model, changed)[:, :30] - parallel[:, :30]).abs().max())
        future_moves = float((_logits(model, changed)[:, 30:] - parallel[:, 30:]).abs().max())
    decoder = RecurrentDecoder(model, cfg.prefix_length)
    steps = [decoder.prefill(tokens[:, :PROMPT])]
    for t in range(PROMPT, SEQ):
        steps.append(decoder.step(tokens[:, t]))
    decode_err = float((torch.stack(steps, 1) - parallel[:, PROMPT - 1:]).abs().max()
                       / parallel.abs().max())

    prompt = tokens[0, :5].tolist()
    generated = greedy_generate(model, prompt, prefix_length=cfg.prefix_length, max_new_tokens=4)
    text, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(4):
            expected.append(int(_logits(model, torch.tensor([text]))[0, -1].argmax()))
            text.append(expected[-1])
    return decode_err, causal_gap, future_moves, generated, expected


@pytest.mark.parametrize("name", ["transformer-tiny", "based-tiny"])
def test_recurrent_decoding_and_generation_match_the_parallel_forward(name):
    decode_err, causal_gap, future_moves, generated, expected = launch(
        _decoding, 1, name, in_process=True)[0]
    assert decode_err < 1e-5, decode_err
    assert causal_gap == 0.0, "a later token changed earlier logits: the model is not causal"
    assert future_moves > 0
    assert generated == expected  # no read-twice padding with prefix 0: the prompt as is


# ---- training and checkpoints ---------------------------------------------------------------

TRAIN = {"training.train_steps": 8, "training.eval_steps": 1, "training.eval_interval": 8,
         "training.log_interval": 4, "data.mock_vocab_size": 16, "checkpoint.save_dir": ""}


def _train(run_dir, **extra):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_in_process(run_dir, **{**TRAIN, **extra})
    return {"losses": result.losses, "start": result.start_step, "validation": result.validation,
            "rows": loss_rows(run_dir), "console": printed.getvalue()}


def _train_and_resume(root):
    """transformer-tiny: 8 steps straight; 4 steps saved, then resumed to 8 (one save, ~10 s);
    based-tiny: 8 steps."""
    straight = _train(root / "straight", **{"model.preset": "transformer-tiny"})
    _train(root / "first", **{"model.preset": "transformer-tiny", "training.train_steps": 4,
                              "training.eval_steps": 0, "checkpoint.save_dir": root / "ckpt",
                              "checkpoint.save_interval": 4})
    resumed = _train(root / "resumed", **{"model.preset": "transformer-tiny",
                                          "training.eval_steps": 0,
                                          "checkpoint.resume": root / "ckpt"})
    based = _train(root / "based", **{"model.preset": "based-tiny"})
    return straight, resumed, based


def _assert_trained_without_mlm(run: dict) -> None:
    losses = run["losses"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    assert all(set(row) == {"step", "lm loss", "loss"} for row in run["rows"]), run["rows"][0]
    assert all(row["loss"] == row["lm loss"] for row in run["rows"])
    assert set(run["validation"][-1]) == {"lm loss", "loss"}, run["validation"]
    assert "mlm loss n/a" in run["console"] and "skipped 0" in run["console"], run["console"]


def test_baselines_train_without_mlm_and_the_transformer_resumes_exactly(tmp_path):
    straight, resumed, based = launch(_train_and_resume, 1, tmp_path, in_process=True,
                                      timeout=240)[0]
    _assert_trained_without_mlm(straight)
    _assert_trained_without_mlm(based)
    assert resumed["start"] == 4, resumed["console"]
    assert resumed["losses"] == straight["losses"][4:], (resumed["losses"], straight["losses"])


# ---- the objective without a prefix --------------------------------------------------------

def test_prefix_zero_is_next_token_prediction_on_every_position_without_an_mlm_report():
    import torch.nn.functional as F

    from megatron_jrt.batch import make_jrt_batch
    from megatron_jrt.loss import jrt_loss, loss_tokens, with_objective

    tokens = torch.randint(0, 11, (3, 21), generator=torch.Generator().manual_seed(2))
    batch = make_jrt_batch(tokens, prefix_length=0, mask_id=10, seed=0, first_sample_index=0)
    assert torch.equal(batch.input_ids, tokens[:, :-1]) and torch.equal(batch.labels, tokens[:, 1:])
    assert batch.ntp_mask.all() and not batch.mlm_mask.any()
    assert batch.has_mlm is False and batch.to("cpu").has_mlm is False
    logits = torch.randn(3, 20, 11, generator=torch.Generator().manual_seed(3))
    per_token = F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
    loss, reports = jrt_loss(per_token, batch, loss_tokens([batch]))
    ntp_everywhere = F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ntp_everywhere)
    assert set(reports) == {"lm loss"}  # no [0, 0] pair: its mean would be NaN
    assert with_objective({"lm loss": 2.5}) == {"lm loss": 2.5, "loss": 2.5}
    with_prefix = make_jrt_batch(tokens, prefix_length=8, mask_id=10, seed=0, first_sample_index=0)
    assert set(jrt_loss(per_token, with_prefix)[1]) == {"lm loss", "mlm loss"}


# ---- configuration --------------------------------------------------------------------------

def test_baseline_presets_match_the_jrt_sizes():
    from megatron_jrt.config import ConfigError, preset

    for size in ("360m", "1.3b", "demo", "tiny"):
        jrt, based, transformer = (preset(f"{kind}-{size}") for kind in ("jrt", "based",
                                                                         "transformer"))
        assert based == jrt.replace(prefix_length=0)
        assert transformer == jrt.replace(prefix_length=0, layer_pattern="A" * jrt.num_layers)
        based.validate(), transformer.validate()
    with pytest.raises(ConfigError, match="model.prefix_length: 16, but layer_pattern has no P"):
        preset("transformer-tiny", prefix_length=16).validate()
    with pytest.raises(ConfigError, match="model.prefix_length: must be >= 0"):
        preset("jrt-tiny", prefix_length=-1).validate()


def test_attention_flops_count_the_causal_half():
    from megatron_jrt.config import preset
    from megatron_jrt.flops import flops_per_token, mlp_flops

    cfg, L = preset("transformer-tiny"), 64
    d = cfg.hidden_size
    attention = 2 * d * 3 * d + 2 * d * d + 4 * d * (L + 1) / 2  # keys seen: 1..L, mean (L+1)/2
    head = 2 * d * cfg.padded_vocab_size()
    assert flops_per_token(cfg, L, training=False) == pytest.approx(
        4 * (attention + mlp_flops(cfg)) + head)


# ---- GPU: the SDPA path and the PLA kernels without an encoder -------------------------------

def _sdpa_on_cuda(hidden: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = 1024
    cfg, model = _build("transformer-tiny", bf16=True, hidden_size=hidden, num_heads=16,
                        num_layers=1, layer_pattern="A", max_sequence_length=s)
    model = model.cuda()
    mixer = model.decoder.layers[0].self_attention
    x = torch.randn(s, BATCH, hidden, device="cuda", dtype=torch.bfloat16,
                    generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fails if Flash cannot run
        y, _ = mixer(x, None, rotary_pos_emb=model.rotary_pos_emb(s))
    ref = causal_attention_reference(*(t.double().cpu() for t in (
        x, mixer.linear_qkv.weight, mixer.linear_proj.weight)), cfg.num_heads, cfg.rotary_base)
    forward_err = float((y.double().cpu() - ref).norm() / ref.norm())

    positions = torch.arange(s, device="cuda").unsqueeze(0).expand(BATCH, -1)
    tokens = torch.randint(0, 300, (BATCH, s), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).mean().backward()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return forward_err, grads_finite


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [1024, 1792])  # head dims 64 (360M) and 112 (1.3B)
def test_attention_runs_flash_sdpa_on_cuda_and_matches_the_reference(hidden):
    forward_err, grads_finite = launch(_sdpa_on_cuda, 1, hidden, in_process=True)[0]
    assert forward_err < 2e-2, forward_err  # bf16 weights and activations vs fp64
    assert grads_finite


@pytest.mark.gpu
@pytest.mark.parametrize("dv", [64, 112])
def test_pla_kernels_with_an_empty_encoder_are_causal_linear_attention(dv):
    from kernels.pla import pla_prefill, prefix_linear_attention, triton_available
    from kernels.pla.reference import pla_prefill_reference, pla_reference

    assert triton_available()
    g = torch.Generator("cuda").manual_seed(dv)
    B, H, N, f = 2, 4, 1000, 16
    q, k = (0.5 * torch.randn(B, H, N, f, device="cuda", generator=g) for _ in range(2))
    v = torch.randn(B, H, N, dv, device="cuda", generator=g)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    empty_k, empty_v = k[:, :, :0], v[:, :, :0]
    y = prefix_linear_attention(q, k, v, empty_k, empty_v)
    y_ref = pla_reference(q, k, v, empty_k, empty_v)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    grads_ref = torch.autograd.grad(y_ref, (q, k, v), dy)
    for got, want in zip(grads, grads_ref):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
    with torch.no_grad():
        _, state = pla_prefill(q, k, v, empty_k, empty_v)
        _, state_ref = pla_prefill_reference(q, k, v, empty_k, empty_v)
    torch.testing.assert_close(state.S, state_ref.S, rtol=2e-2, atol=2e-2)
