"""megatron-core's own GPTModel runs on CPU through megatron_jrt.platform.

One 2-rank launch checks, in turn on the same process group:
  * TP=2 gives the logits and loss of TP=1 (CPU init slices one weight);
  * PP=2 through ``get_forward_backward_func`` (p2p send/recv, tied embeddings across
    stages) gives the loss and the gradients of PP=1;
  * DP=2 with megatron's DistributedDataParallel and the distributed optimizer takes the
    optimizer step that plain torch AdamW takes on the whole batch in one process.
"""
import pytest
import torch

from tests.multiproc import gpt_forward_step, launch, tiny_gpt, token_batches

SEED = 1234
LR, CLIP = 1e-2, 0.05  # a small clip norm makes the clipping code run


def _fwd_bwd(model, batches, forward_only=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=gpt_forward_step,
        data_iterator=iter(batches),
        model=[model],
        num_microbatches=len(batches),
        seq_length=batches[0][0].shape[1],
        micro_batch_size=batches[0][0].shape[0],
        forward_only=forward_only,
    )


def _mean_loss(losses):
    total = torch.stack([d["lm loss"] for d in losses]).sum(0)
    return (total[0] / total[1]).item()


def _global_name(name: str, layer_offset: int) -> str:
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    if name == "output_layer.weight":  # tied: the last stage's copy of the embedding
        return "embedding.word_embeddings.weight"
    return ".".join(parts)


def _platform_checks():
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_jrt.distributed import init_distributed

    out = {}
    batches = token_batches(2, batch=2)
    tokens, labels = batches[0]
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)

    # Reference: TP=1, PP=1 (both ranks compute the whole model).
    init_distributed(1, 1, seed=SEED)
    ref = tiny_gpt()
    ref_params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    with torch.no_grad():
        ref_logits = ref(tokens, pos, None)
    ref_losses = _fwd_bwd(ref, batches)
    out["ref_loss"] = _mean_loss(ref_losses)
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}

    # TP=2: the same model, each rank holding half of every parallel weight.
    init_distributed(2, 1, seed=SEED)
    tp = tiny_gpt()
    with torch.no_grad():
        tp_logits = tensor_parallel.gather_from_tensor_model_parallel_region(tp(tokens, pos, None))
    out["tp_logits_maxdiff"] = (tp_logits - ref_logits).abs().max().item()
    out["tp_loss"] = _mean_loss(_fwd_bwd(tp, batches, forward_only=True))

    # PP=2: one layer per stage, the reference weights copied in by global name.
    init_distributed(1, 2, seed=SEED)
    pp = tiny_gpt()
    offset = parallel_state.get_pipeline_model_parallel_rank() * (2 // 2)
    with torch.no_grad():
        for name, p in pp.named_parameters():
            p.copy_(ref_params[_global_name(name, offset)])
    pp_losses = _fwd_bwd(pp, batches)
    out["pp_loss"] = _mean_loss(pp_losses) if pp_losses else None
    out["pp_grad_maxdiff"] = max(
        (p.grad - ref_grads[_global_name(n, offset)]).abs().max().item()
        for n, p in pp.named_parameters()
        if n not in ("embedding.word_embeddings.weight", "output_layer.weight")  # tied: summed later
    )

    # DP=2: megatron DDP + distributed optimizer vs plain AdamW on the whole batch.
    init_distributed(1, 1, seed=SEED)
    rank = parallel_state.get_data_parallel_rank()
    full_tokens, full_labels = token_batches(1, batch=4, seed=7)[0]
    mine = [(full_tokens[2 * rank: 2 * rank + 2], full_labels[2 * rank: 2 * rank + 2])]

    model = tiny_gpt()
    plain = tiny_gpt()
    plain.load_state_dict(model.state_dict())
    initial = {n: p.detach().clone() for n, p in plain.named_parameters()}
    ddp = DistributedDataParallel(
        model.config,
        DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True),
        model,
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=LR, weight_decay=0.0, clip_grad=CLIP,
                        use_distributed_optimizer=True, params_dtype=torch.float32),
        [ddp],
    )
    out["opt_type"] = [type(o).__name__ for o in getattr(opt, "chained_optimizers", [opt])]
    ddp.zero_grad_buffer()
    opt.zero_grad()
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_losses = get_forward_backward_func()(
        forward_step_func=gpt_forward_step, data_iterator=iter(mine), model=[ddp],
        num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=2,
    )
    ok, grad_norm, _ = opt.step()
    out["dp_update_ok"] = ok

    plain_loss = gpt_forward_step(iter([(full_tokens, full_labels)]), plain)[0].mean()
    plain_loss.backward()
    plain_norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), CLIP)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.0)
    plain_opt.step()
    out["grad_norm"] = (float(grad_norm), plain_norm.item())
    out["dp_loss"] = (_mean_loss(dp_losses), plain_loss.item())
    plain_params = dict(plain.named_parameters())
    out["dp_param_maxdiff"] = max(
        (p.detach() - plain_params[n].detach()).abs().max().item()
        for n, p in model.named_parameters()
    )
    out["dp_param_moved"] = max(
        (plain_params[n].detach() - v).abs().max().item() for n, v in initial.items()
    )
    return out


def test_tp_pp_dp_match_single_process():
    r0, r1 = launch(_platform_checks, 2, timeout=300)
    for r in (r0, r1):
        assert r["tp_logits_maxdiff"] < 1e-5
        assert r["tp_loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
        assert r["pp_grad_maxdiff"] < 1e-6
        assert r["opt_type"] == ["DistributedOptimizer"]
        assert r["dp_update_ok"]
        assert r["grad_norm"][0] == pytest.approx(r["grad_norm"][1], rel=1e-5)
        assert r["grad_norm"][0] > CLIP  # the clipping path ran
        assert r["dp_param_moved"] > 1e-3
        # Adam's first step is ~lr * sign(grad): near-zero grads amplify fp32 rounding.
        assert r["dp_param_maxdiff"] < 1e-3 * LR
    # Per-rank DP losses average to the whole-batch loss.
    assert (r0["dp_loss"][0] + r1["dp_loss"][0]) / 2 == pytest.approx(r0["dp_loss"][1], rel=1e-5)
    # Only the last pipeline stage has the loss.
    assert r0["pp_loss"] is None
    assert r1["pp_loss"] == pytest.approx(r1["ref_loss"], rel=1e-5)


def test_launch_env_torchrun_slurm_single(monkeypatch):
    from megatron_jrt.distributed import init_distributed, parse_first_host, read_launch_env

    assert parse_first_host("gpu[003-005,9],cpu1") == "gpu003"
    assert parse_first_host("node7,node8") == "node7"
    assert parse_first_host("rack[2-3]n[05-06]") == "rack2n05"

    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456"}
    env = read_launch_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.source) == (3, 8, 1, "slurm")
    assert env.master_port == 15000 + 123456 % 20000
    if not __import__("shutil").which("scontrol"):
        assert env.master_addr == "gpu003"
    torchrun = dict(slurm, RANK="5", WORLD_SIZE="16", LOCAL_RANK="2", MASTER_ADDR="h",
                    MASTER_PORT="2222")
    env = read_launch_env(torchrun)  # torchrun's variables win inside a Slurm job
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        (5, 16, 2, "h", 2222)
    assert read_launch_env({}).world_size == 1

    for key, value in {"RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="not divisible"):
        init_distributed(tensor_parallel=3)
