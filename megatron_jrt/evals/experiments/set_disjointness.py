"""Set disjointness sweep (JRT paper, Fig. 2): JRT-RNN vs Based vs Transformer, both set orders.

    python -m megatron_jrt.evals.experiments.set_disjointness --out results/sd.json
    python -m megatron_jrt.evals.experiments.set_disjointness --tiny --out /tmp/sd.json  # CPU

The paper's setup scaled to minutes on one GPU: vocab 2048, (|A|, |B|) pairs in both orders
up to 64 elements (the paper's go to 256) in one mixed training stream, tested on them and on
longer, unseen sets (128); d_model 36-128 x feature dim 4 or 16 for the recurrent models.
The finding to reproduce: a causal model (Based) loses accuracy when the long set comes
first, most at small state; JRT-RNN, reading both sets non-causally, does not.
"""
from __future__ import annotations

from megatron_jrt.evals.experiments.runner import Setup, run_sweep, sweep_parser

TRAIN_PAIRS = ((4, 16), (16, 4), (8, 32), (32, 8), (4, 64), (64, 4), (16, 64), (64, 16))
GPU = Setup(
    task={"task": "set_disjointness", "vocab_size": 2048,
          "pairs": [list(p) for p in TRAIN_PAIRS]},
    seq_length=max(a + b for a, b in TRAIN_PAIRS) + 3,
    test_cells=TRAIN_PAIRS + ((4, 128), (128, 4), (16, 128), (128, 16)),
    families=("jrt", "based", "transformer"), hidden_sizes=(36, 64, 128), feature_dims=(4, 16),
    steps=2000, batch_size=128, lrs=(3e-3,), examples=500, max_minutes=7.5)
TINY = Setup(
    task={"task": "set_disjointness", "vocab_size": 24, "pairs": [[3, 6], [6, 3]]},
    seq_length=12, test_cells=((3, 6), (6, 3), (8, 4), (4, 8)),
    families=("jrt", "based", "transformer"), hidden_sizes=(32,), feature_dims=(4,),
    steps=8, batch_size=16, lrs=(3e-3,), examples=32, max_minutes=None)


def main(argv: list[str] | None = None) -> None:
    args = sweep_parser(__doc__.split("\n")[0], GPU, TINY).parse_args(argv)
    run_sweep("set_disjointness", args, GPU, TINY)


if __name__ == "__main__":
    main()
