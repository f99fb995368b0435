"""Recall evaluation (issue 19): the models this stack trains, measured on what JRT is for.

- `tasks/`: set disjointness and MQAR as seeded generators of labelled token windows; the
  trainer reads them as a data source (`data.synthetic` in the run config).
- `synthetic_eval`: accuracy per cell of a trained checkpoint on a task's test split.
- `recall_*`: the document-recall harness (JSONL documents, default vs JRT-Prompt templates,
  greedy generation, answer-contained scoring).
- `state_size`: the recurrent state (or KV cache) of a model, the x axis of the paper's plots.
- `cli`: `jrt-eval synthetic` and `jrt-eval recall`; `experiments/`: the sweeps and the plot.
"""
