"""The distributed optimizer's state gathered for a save (`checkpoint.optimizer_gather`) is
megatron's own gather, value for value, over several gradient buckets on two ranks: on CPU
(gloo), and on two GPUs (NCCL, bf16 with fp32 main weights)."""
import pytest
import torch

from tests.multiproc import SEQ, gpt_forward_step, launch, tiny_gpt, token_batches

MICRO = 2


def _both_gathers(cuda: bool):
    from megatron.core import parallel_state

    from megatron_jrt.checkpoint.optimizer_gather import (_distributed_optimizers,
                                                          gathered_parameter_state,
                                                          gathering_on_device)
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.platform import current_device
    from megatron_jrt.training import build_optimizer, train_step, wrap_with_ddp

    init_distributed(1, 1, seed=7)
    device = current_device()
    dp_rank = parallel_state.get_data_parallel_rank()
    model = tiny_gpt()
    if cuda:
        model.config.bf16 = True
        model.cuda()
    # small buckets: several per buffer, each padded to a multiple of the DP size
    chunks = wrap_with_ddp([model], model.config, use_distributed_optimizer=True,
                           overlap_grad_reduce=True, bucket_size=3000)
    optimizer, scheduler = build_optimizer(
        chunks, lr=3e-3, min_lr=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_eps=1e-8, clip_grad=1.0, use_distributed_optimizer=True, bf16=cuda,
        warmup_steps=1, decay_steps=10)
    for tokens, labels in token_batches(2, 2 * MICRO, seed=3):
        mine = (tokens[dp_rank * MICRO:(dp_rank + 1) * MICRO].to(device),
                labels[dp_rank * MICRO:(dp_rank + 1) * MICRO].to(device))
        train_step(gpt_forward_step, iter([mine]), chunks, optimizer, scheduler,
                   num_microbatches=1, seq_length=SEQ, micro_batch_size=MICRO)

    [part] = _distributed_optimizers(optimizer)
    buckets = len(part.buffers[0].buckets)
    expected = part.get_parameter_state_dp_zero(use_gloo_comm=not cuda, return_on_all_ranks=True)
    got = gathered_parameter_state(part, device)
    with gathering_on_device(optimizer, device):  # what a save calls
        patched = part.get_parameter_state_dp_zero(use_gloo_comm=False, empty_data=False,
                                                   return_on_all_ranks=True)
    restored = "get_parameter_state_dp_zero" not in vars(part)
    return buckets, _on_cpu(expected), _on_cpu(got), _on_cpu(patched), restored


def _on_cpu(state):
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    return state.cpu() if isinstance(state, torch.Tensor) else state


def _check(ranks):
    for buckets, expected, got, patched, restored in ranks:
        assert buckets >= 3 and restored
        for result in (got, patched):
            assert result.keys() == expected.keys()
            for index, by_dtype in expected.items():
                if index == "buckets_coalesced":
                    assert result[index] is True
                    continue
                for dtype, world in by_dtype.items():
                    assert result[index][dtype]["numel_unpadded"] == world["numel_unpadded"]
                    for key in ("param", "exp_avg", "exp_avg_sq"):
                        assert torch.equal(result[index][dtype][key], world[key]), (dtype, key)
                        assert world[key].abs().sum() > 0  # the state is not all zeros


def test_gather_equals_megatrons_over_several_buckets():
    _check(launch(_both_gathers, 2, False, timeout=240))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gather_equals_megatrons_on_two_gpus():
    _check(launch(_both_gathers, 2, True, timeout=240))
