"""training.step.reduce_losses: (sum, count) reports of the microbatches -> global-batch means.

A term with no tokens in the global batch (no MLM token drawn in a step) is left out, not reported as
0/0 = nan (which would read as a non-finite step); a term with tokens on any microbatch or rank is kept.
"""
import math

import torch

from tests.multiproc import launch


def _pair(loss_sum: float, count: float) -> torch.Tensor:
    return torch.tensor([loss_sum, count])


def _one_rank() -> list[dict]:
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.training.step import reduce_losses

    init_distributed(1, 1)
    no_mlm = [{"lm loss": _pair(6.0, 3.0), "mlm loss": _pair(0.0, 0.0)},
              {"lm loss": _pair(2.0, 1.0), "mlm loss": _pair(0.0, 0.0)}]
    mlm_in_one = [{"lm loss": _pair(6.0, 3.0), "mlm loss": _pair(0.0, 0.0)},
                  {"lm loss": _pair(2.0, 1.0), "mlm loss": _pair(5.0, 2.0)}]
    scalar = [{"lm loss": torch.tensor(4.0)}, {"lm loss": torch.tensor(2.0)}]  # a plain value counts once
    return [reduce_losses(no_mlm), reduce_losses(mlm_in_one), reduce_losses(scalar), reduce_losses([])]


def test_a_term_without_tokens_is_left_out_and_one_with_tokens_is_kept():
    no_mlm, mlm_in_one, scalar, nothing = launch(_one_rank, 1, in_process=True)[0]
    assert no_mlm == {"lm loss": 2.0}  # (6 + 2) / (3 + 1); no "mlm loss": nan
    assert mlm_in_one == {"lm loss": 2.0, "mlm loss": 2.5}
    assert scalar == {"lm loss": 3.0}
    assert nothing == {}
    assert all(math.isfinite(v) for d in (no_mlm, mlm_in_one, scalar) for v in d.values())


def _two_ranks() -> dict:
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.training.step import reduce_losses

    init_distributed(1, 1)  # data parallel 2
    rank = torch.distributed.get_rank()
    mlm = _pair(0.0, 0.0) if rank == 0 else _pair(9.0, 3.0)  # rank 0 drew no MLM token, rank 1 three
    return reduce_losses([{"lm loss": _pair(4.0 * (rank + 1), 2.0), "mlm loss": mlm}])


def test_a_term_with_tokens_on_one_data_parallel_rank_only_is_reported_on_every_rank():
    """The count that decides is the global batch's: the zero test comes after the all-reduce."""
    results = launch(_two_ranks, 2, timeout=120)
    assert results == [{"lm loss": 3.0, "mlm loss": 3.0}] * 2  # (4 + 8) / 4 and 9 / 3
