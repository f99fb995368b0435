"""The paper's recall experiments, reproduced with this stack's trainer (issue 19).

    python -m megatron_jrt.evals.experiments.set_disjointness --out results/sd.json
    python -m megatron_jrt.evals.experiments.mqar --out results/mqar.json
    python -m megatron_jrt.evals.experiments.plot results/*.json --out docs/

Each sweep trains every model through `megatron_jrt.train.train` (megatron-core model,
optimizer and loss, the task as `data.synthetic`), saves it, reloads the checkpoint and
scores the test cells with `jrt-eval synthetic`'s code; the JSON is rewritten after every run,
so a sweep stopped by its `--max-minutes` budget keeps what it finished. `--parallel N` trains
N runs at once, each a child process of the same driver, and merges their rows (models this
small leave a GPU idle). `--tiny` runs a seconds-long CPU version of the same sweep.
docs/RESULTS.md has the commands and numbers.
"""
