"""The training core: DP=2 with the distributed optimizer follows the same loss curve as one
process accumulating the same global batch over 2 microbatches; a NaN loss skips the step.

One 2-rank launch (DP=2, distributed optimizer, 1 microbatch of 2 per rank) and one
in-process rank (plain megatron optimizer, 2 microbatches of 2), on megatron's GPTModel.
"""
import math

import pytest
import torch

from tests.multiproc import SEQ, gpt_forward_step, launch, tiny_gpt, token_batches

STEPS, NAN_STEP, GLOBAL_BATCH, MICRO = 5, 2, 4, 2


def _nan_on_step(step: int, nan_step: int):
    """gpt_forward_step whose loss is NaN on ``nan_step``."""
    def forward_step(data_iterator, model):
        output, loss_func = gpt_forward_step(data_iterator, model)
        if step != nan_step:
            return output, loss_func

        def nan_loss(out):
            loss, num_tokens, report = loss_func(out)
            return loss * float("nan"), num_tokens, {k: v * float("nan") for k, v in report.items()}

        return output, nan_loss

    return forward_step


def _train(use_distributed_optimizer: bool, pipeline_parallel: int = 1, init_params=None):
    from megatron.core import parallel_state

    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.training import build_optimizer, eval_step, train_step, wrap_with_ddp
    from tests.test_platform import _global_name

    init_distributed(1, pipeline_parallel, seed=4321)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    num_microbatches = GLOBAL_BATCH // (MICRO * dp_size)

    model = tiny_gpt()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if init_params is not None:  # the single-process run's weights, by global name
        offset = parallel_state.get_pipeline_model_parallel_rank() * (2 // pipeline_parallel)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(init_params[_global_name(name, offset)])
    chunks = wrap_with_ddp([model], model.config, use_distributed_optimizer=use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(
        chunks, lr=3e-3, min_lr=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=use_distributed_optimizer,
        bf16=False, warmup_steps=1, decay_steps=10,
    )

    def my_microbatches(batch):
        tokens, labels = batch
        rows = range(dp_rank * MICRO * num_microbatches, (dp_rank + 1) * MICRO * num_microbatches)
        rows = list(rows)
        return [(tokens[rows[i:i + MICRO]], labels[rows[i:i + MICRO]])
                for i in range(0, len(rows), MICRO)]

    def weights_sum():
        return sum(p.detach().double().abs().sum().item() for p in model.parameters())

    history = []
    for step, batch in enumerate(token_batches(STEPS, GLOBAL_BATCH, seed=11)):
        before = weights_sum()
        result = train_step(
            _nan_on_step(step, NAN_STEP), iter(my_microbatches(batch)), chunks, optimizer,
            scheduler, num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MICRO,
        )
        history.append(dict(loss=result.losses["lm loss"], grad_norm=result.grad_norm,
                            skipped=result.skipped, lr=result.learning_rate,
                            moved=weights_sum() - before, sched=scheduler.num_steps))
    eval_batch = token_batches(1, GLOBAL_BATCH, seed=99)[0]
    evaluation = eval_step(gpt_forward_step, iter(my_microbatches(eval_batch)), chunks,
                           num_microbatches=num_microbatches, seq_length=SEQ,
                           micro_batch_size=MICRO)
    return dict(history=history, eval=evaluation["lm loss"], initial=initial)


def _dp2_then_pp2(init_params):
    dp = _train(True)
    dp.pop("initial")
    pp = _train(True, pipeline_parallel=2, init_params=init_params)
    pp.pop("initial")
    return dp, pp


@pytest.fixture(scope="module")
def runs():
    single = launch(_train, 1, False, in_process=True)[0]
    results = launch(_dp2_then_pp2, 2, single.pop("initial"), timeout=300)
    return single, [dp for dp, _ in results], [pp for _, pp in results]


def _same_curve(single, other):
    for a, b in zip(single["history"], other["history"], strict=True):
        assert a["skipped"] == b["skipped"]
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        assert a["sched"] == b["sched"]
        if not a["skipped"]:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert other["eval"] == pytest.approx(single["eval"], rel=1e-5)


def test_dp2_distributed_optimizer_matches_single_process(runs):
    single, dp, _ = runs
    assert repr(dp[0]) == repr(dp[1])  # every rank reports the same (repr: NaN-aware)
    _same_curve(single, dp[0])
    losses = [h["loss"] for h in single["history"] if not h["skipped"]]
    assert losses[-1] < losses[0]  # it trains


def test_pp2_matches_single_process(runs):
    single, _, pp = runs
    for rank in pp:  # the last stage's losses reach the first stage too
        assert [h["loss"] for h in rank["history"]][:NAN_STEP] == \
            [h["loss"] for h in pp[1]["history"]][:NAN_STEP]
        _same_curve(single, rank)


def test_nan_loss_skips_the_update(runs):
    single, ranks, _ = runs
    for run in (single, ranks[0]):
        history = run["history"]
        assert [h["skipped"] for h in history] == [s == NAN_STEP for s in range(STEPS)]
        nan = history[NAN_STEP]
        assert math.isnan(nan["loss"]) and nan["grad_norm"] is None
        assert nan["moved"] == 0.0  # weights untouched
        assert nan["sched"] == history[NAN_STEP - 1]["sched"]  # schedule not advanced
        assert history[NAN_STEP + 1]["moved"] != 0.0  # and training goes on
        assert all(math.isfinite(h["loss"]) for h in history if not h["skipped"])
    assert single["history"][0]["lr"] == 0.0  # warmup starts at 0, as in Megatron-LM
    assert single["history"][1]["lr"] == pytest.approx(3e-3)


def _bf16_steps(use_distributed_optimizer: bool):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.training import build_optimizer, train_step, wrap_with_ddp

    init_distributed()
    model = tiny_gpt()
    model.config.bf16 = True  # a real run sets it before building; Float16Module casts here
    chunks = wrap_with_ddp([model], model.config, use_distributed_optimizer=use_distributed_optimizer)
    optimizer, scheduler = build_optimizer(
        chunks, lr=1e-3, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=use_distributed_optimizer,
        bf16=True, warmup_steps=0, decay_steps=5,
    )
    results = [train_step(gpt_forward_step, iter([batch]), chunks, optimizer, scheduler,
                          num_microbatches=1, seq_length=SEQ, micro_batch_size=GLOBAL_BATCH)
               for batch in token_batches(2, GLOBAL_BATCH)]
    kinds = [type(o).__name__ for o in optimizer.chained_optimizers]
    return results, kinds, next(model.parameters()).dtype


@pytest.mark.parametrize("use_distributed_optimizer", [False, True])
def test_bf16_steps_on_cpu(use_distributed_optimizer):
    results, kinds, dtype = launch(_bf16_steps, 1, use_distributed_optimizer, in_process=True)[0]
    assert dtype == torch.bfloat16
    assert kinds == ["DistributedOptimizer" if use_distributed_optimizer
                     else "Float16OptimizerWithFloat16Params"]
    assert not any(r.skipped for r in results)
    assert all(math.isfinite(r.losses["lm loss"]) and r.grad_norm > 0 for r in results)
