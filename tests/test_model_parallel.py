"""The JRT-RNN model under tensor and pipeline parallelism equals the model without them.

One 2-rank launch (megatron imports are slow) walks through the layouts, carrying weights
between them with dist_checkpointing, which also proves every module's sharded state dict:
  A. TP=1: reference logits, loss and gradients; save the weights.
  B. TP=2: load the weights, same logits and loss; save the gradients as a checkpoint.
  C. TP=1: load B's gradients, equal to A's gradients.
  D. PP=2: load the weights, same loss through megatron-core's pipeline schedule.
"""
import torch

from tests.multiproc import launch

PRESET = "jrt-tiny"
SEQ, BATCH, MASK_ID = 40, 2, 3  # SEQ > prefix_length (16) > swa_window (8)


def _batch(cfg):
    from megatron_jrt.batch import make_jrt_batch

    tokens = torch.randint(0, 200, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))
    return make_jrt_batch(tokens, prefix_length=cfg.prefix_length, mask_id=MASK_ID, seed=11,
                          first_sample_index=0)


def _positions(batch_size: int):
    return torch.arange(SEQ).unsqueeze(0).expand(batch_size, -1)


def _build(tp: int, pp: int):
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed(tensor_parallel=tp, pipeline_parallel=pp, seed=1234)
    cfg = preset(PRESET)
    return cfg, build_model(cfg, cfg.to_transformer_config(tensor_parallel=tp, pipeline_parallel=pp))


def _reset():
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _save(model, directory):
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))
    torch.distributed.barrier()


def _load(model, directory):
    from megatron.core import dist_checkpointing

    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(directory)))


def _split(batch):
    from megatron_jrt.batch import JRTBatch

    return [JRTBatch(*(t[i:i + 1] for t in (batch.input_ids, batch.labels, batch.ntp_mask,
                                            batch.mlm_mask))) for i in range(BATCH)]


def _forward_loss(model, batch):
    """Gathered logits, the batch loss, and the mean of the per-sample losses."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron_jrt.loss import jrt_loss

    logits = gather_from_tensor_model_parallel_region(model(batch.input_ids, _positions(BATCH), None))
    per_token = model(batch.input_ids, _positions(BATCH), None, labels=batch.labels)
    loss, _ = jrt_loss(per_token, batch)
    per_sample = [jrt_loss(per_token[i:i + 1], s)[0] for i, s in enumerate(_split(batch))]
    return logits.detach(), loss, float(torch.stack(per_sample).mean())


def _pipeline_loss(model, batch) -> float | None:
    """Mean JRT loss over one-sample micro-batches through the pipeline schedule."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron_jrt.loss import jrt_loss

    samples = _split(batch)

    def forward_step(data_iterator, stage):
        sample = next(data_iterator)
        output = stage(sample.input_ids, _positions(1), None, labels=sample.labels)

        def loss_func(per_token_loss):
            loss, _ = jrt_loss(per_token_loss, sample)
            return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

        return output, loss_func

    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(samples), model=[model],
        num_microbatches=BATCH, seq_length=SEQ, micro_batch_size=1, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return float(torch.stack([d["loss"] for d in losses]).mean())


def _parallel_equivalence(ckpt_root):
    from megatron.core import parallel_state

    weights, grads = ckpt_root / "weights", ckpt_root / "grads"
    results = {}
    # A. TP=1 reference.
    cfg, model = _build(tp=1, pp=1)
    batch = _batch(cfg)
    logits_tp1, loss_tp1, results["per_sample_tp1"] = _forward_loss(model, batch)
    loss_tp1.backward()
    grads_tp1 = {name: p.grad.clone() for name, p in model.named_parameters()}
    _save(model, weights)
    _reset()
    # B. TP=2 from the same weights.
    _, model = _build(tp=2, pp=1)
    _load(model, weights)
    logits_tp2, loss_tp2, _ = _forward_loss(model, batch)
    loss_tp2.backward()
    results["logits_err"] = float((logits_tp2 - logits_tp1).abs().max())
    results["loss_tp1"], results["loss_tp2"] = loss_tp1.item(), loss_tp2.item()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.grad)
    _save(model, grads)
    _reset()
    # C. TP=2 gradients read back in the TP=1 layout.
    _, model = _build(tp=1, pp=1)
    _load(model, grads)
    results["grad_err"] = max(float((p - grads_tp1[name]).abs().max() / grads_tp1[name].abs().max())
                              for name, p in model.named_parameters())
    results["grad_names"] = len(grads_tp1)
    _reset()
    # D. PP=2 from the same weights, through the pipeline schedule.
    _, model = _build(tp=1, pp=2)
    _load(model, weights)
    results["loss_pp2"] = _pipeline_loss(model, batch)
    results["pp_rank"] = parallel_state.get_pipeline_model_parallel_rank()
    return results


def test_tp2_and_pp2_equal_tp1(tmp_path):
    ranks = launch(_parallel_equivalence, 2, tmp_path, timeout=600)
    for r in ranks:
        assert abs(r["loss_tp2"] - r["loss_tp1"]) < 1e-5, r
        assert r["logits_err"] < 1e-4, r
        assert r["grad_err"] < 1e-4, r
        assert r["grad_names"] > 20  # every mixer's parameters were compared
    last_stage = [r for r in ranks if r["loss_pp2"] is not None]
    assert len(last_stage) == 1 and last_stage[0]["pp_rank"] == 1
    assert abs(last_stage[0]["loss_pp2"] - last_stage[0]["per_sample_tp1"]) < 1e-5, last_stage


def _parameter_counts():
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model, count_parameters

    init_distributed(1, 1)
    counts = {}
    for name in ("jrt-360m", "jrt-1.3b"):
        cfg = preset(name)
        model = build_model(cfg, cfg.to_transformer_config(perform_initialization=False))
        counts[name] = count_parameters(model)
        del model
    return counts


def test_preset_parameter_counts_match_the_spec_table():
    counts = launch(_parameter_counts, 1, in_process=True)[0]
    assert counts == {"jrt-360m": 356_578_304, "jrt-1.3b": 1_375_143_168}
