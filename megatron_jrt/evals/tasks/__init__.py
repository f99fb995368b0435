"""The synthetic recall tasks, built from the run config's `data.synthetic` mapping.

    data:
      seq_length: 275
      synthetic: {task: set_disjointness, vocab_size: 2048, pairs: [[4, 16], [16, 4]]}

Every task is a frozen dataclass with `seq_length` (= data.seq_length), `vocab_size`,
`context_length` (the region at the start of each window that holds the context: JRT's
prefix must be exactly that long), `sample(seed, split, index)`, and cells for reporting
(`cell_of`, `cells`, `for_cell` for a test split at other sizes). Values are checked here, and
every error names its key (`data.synthetic.pairs: ...`).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Protocol

from megatron_jrt.config import ConfigError
from megatron_jrt.evals.tasks.mqar import MQAR
from megatron_jrt.evals.tasks.sample import Sample
from megatron_jrt.evals.tasks.set_disjointness import SetDisjointness

TASKS: dict[str, type] = {SetDisjointness.name: SetDisjointness, MQAR.name: MQAR}


class SyntheticTask(Protocol):
    name: str
    seq_length: int
    vocab_size: int

    @property
    def context_length(self) -> int: ...
    def problem(self) -> tuple[str, str] | None: ...
    def cell_of(self, index: int) -> tuple[int, int]: ...
    def cells(self) -> list[tuple[int, int]]: ...
    def for_cell(self, cell: tuple[int, int]) -> "SyntheticTask": ...
    def describe(self, cell: tuple[int, int]) -> dict: ...
    def sample(self, seed: int, split: str, index: int) -> Sample: ...


def build_task(params: dict, seq_length: int, key: str = "data.synthetic") -> SyntheticTask:
    """The task `params` describe ({"task": name, field: value...}), checked; ConfigError names
    `key.field` (data.seq_length for the window length)."""
    params = dict(params)
    name = params.pop("task", None)
    if name not in TASKS:
        raise ConfigError(f"{key}.task: {name!r} is not one of {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "seq_length"}
    values = {}
    for field, value in params.items():
        if field not in fields:
            close = difflib.get_close_matches(str(field), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(f"{key}.{field}: not a parameter of task {name}{hint}")
        values[field] = _typed(f"{key}.{field}", value, fields[field].default)
    task = cls(seq_length=seq_length, **values)
    if (problem := task.problem()) is not None:
        field, message = problem
        raise ConfigError(f"{'data.seq_length' if field == 'seq_length' else f'{key}.{field}'}: "
                          f"{message}")
    return task


def _typed(key: str, value: Any, default: Any) -> Any:
    """`value` in the type of the field's default (tuples of ints or of int pairs, int, float,
    bool); ConfigError otherwise."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif is_int(default):
        ok = is_int(value)
    elif isinstance(default, float):
        ok = is_int(value) or isinstance(value, float)
        value = float(value) if ok else value
    elif isinstance(default, tuple) and default and isinstance(default[0], tuple):
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(map(is_int, p)) for p in value)
        value = tuple(tuple(p) for p in value) if ok else value
    else:
        ok = isinstance(value, list) and all(map(is_int, value))
        value = tuple(value) if ok else value
    if not ok:
        if isinstance(default, tuple):
            example = "a list like " + str([list(p) if isinstance(p, tuple) else p
                                            for p in default[:2]])
        else:
            example = {bool: "true or false", int: "an integer", float: "a number"}[
                type(default)]
        raise ConfigError(f"{key}: expected {example}, got {value!r}")
    return value


def check_prefix(task: SyntheticTask, prefix_length: int) -> None:
    """ConfigError unless the model's prefix is 0 (causal) or exactly the task's context region.

    A longer prefix would read the queries and their answers non-causally (the labels leak
    into the encoder); a shorter one would leave part of the context to the causal reader,
    which is not the JRT-RNN this comparison is about.
    """
    if prefix_length not in (0, task.context_length):
        raise ConfigError(
            f"model.prefix_length: {prefix_length}, but the {task.name} task's context region is "
            f"{task.context_length} tokens: set model.overrides.prefix_length="
            f"{task.context_length} (JRT reads the context non-causally) or 0 (causal)")


__all__ = ["TASKS", "SyntheticTask", "Sample", "SetDisjointness", "MQAR", "build_task",
           "check_prefix"]
