"""MQAR sweep: accuracy vs state size for JRT-RNN, Based, Based + JRT-Prompt and a Transformer.

    python -m megatron_jrt.evals.experiments.mqar --out results/mqar.json
    python -m megatron_jrt.evals.experiments.mqar --tiny --out /tmp/mqar.json  # CPU

zoology's multi-query associative recall (vocab 8192, power-law query gaps) scaled to
minutes on one GPU: 4 to 32 key-value pairs in one mixed training stream at seq len 192
(the context region holds 32 pairs), tested on those cells, on longer query regions (seq
len 320) and on 64 pairs (seq len 384: more pairs than any training sample). JRT-Prompt
repeats the key-value context before the queries, for training and test: nobody has
published it on MQAR (zoology's `num_passes` crashes for 2 passes).
"""
from __future__ import annotations

from megatron_jrt.evals.experiments.runner import Setup, run_sweep, sweep_parser

KV_PAIRS = (4, 8, 16, 32)
GPU = Setup(
    task={"task": "mqar", "vocab_size": 8192, "kv_pairs": list(KV_PAIRS)},
    seq_length=192,
    test_cells=tuple((192, kv) for kv in KV_PAIRS) + ((320, 32), (384, 64)),
    families=("jrt", "based", "transformer", "based+jrt-prompt"), hidden_sizes=(64, 128, 256),
    feature_dims=(16,), steps=2000, batch_size=256, lrs=(3e-3,), examples=500,
    max_minutes=7.5)
TINY = Setup(
    task={"task": "mqar", "vocab_size": 32, "kv_pairs": [2, 3]}, seq_length=16,
    test_cells=((16, 2), (16, 3), (24, 3)),
    families=("jrt", "based", "transformer", "based+jrt-prompt"), hidden_sizes=(32,),
    feature_dims=(4,), steps=8, batch_size=16, lrs=(3e-3,), examples=32, max_minutes=None)


def main(argv: list[str] | None = None) -> None:
    args = sweep_parser(__doc__.split("\n")[0], GPU, TINY).parse_args(argv)
    run_sweep("mqar", args, GPU, TINY)


if __name__ == "__main__":
    main()
