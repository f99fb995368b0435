"""Document recall in the paper's style: greedy generation, scored by the answer it contains.

For each template, every document becomes a prompt (megatron_jrt.evals.recall_prompts), a
generator completes it (greedy, at most 48 new tokens), the completion is cut at its first
newline (lm-eval's `until: ["\\n"]`), and the document scores 1 when any gold answer occurs in
it, case-insensitively (`re.search(re.escape(answer), output, re.I)`). A template's accuracy
is the mean over documents. Generators are plain functions (prompts -> completions), so a
stub stands in for a model in tests.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from megatron_jrt.evals.recall_data import RecallDocument
from megatron_jrt.evals.recall_prompts import Codec, render, truncate_context

MAX_NEW_TOKENS = 48
Generate = Callable[[list[str]], list[str]]  # prompts -> completions, in order


def contains_answer(output: str, answers: Sequence[str]) -> int:
    """1 when any answer occurs in `output` (case-insensitive, literally), else 0."""
    return max(int(bool(re.search(re.escape(answer), output, re.IGNORECASE)))
               for answer in answers)


def first_line(completion: str) -> str:
    return completion.split("\n", 1)[0]


@dataclass
class TemplateResult:
    template: str
    scores: list[int] = field(default_factory=list)  # per document
    outputs: list[str] = field(default_factory=list)  # per document, cut at the newline

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)


def evaluate_recall(documents: Sequence[RecallDocument], generate: Generate, codec: Codec, *,
                    templates: Sequence[str] = ("default", "jrt"),
                    max_context_tokens: int | None = None, batch_size: int = 8
                    ) -> dict[str, TemplateResult]:
    """{template: its per-document scores and outputs}; contexts cut to `max_context_tokens`."""
    cut = [RecallDocument(truncate_context(d.context, d.answers, codec, max_context_tokens),
                          d.query, d.answers, d.cloze) for d in documents]
    results = {}
    for template in templates:
        result = results[template] = TemplateResult(template)
        prompts = [render(d, template) for d in cut]
        for start in range(0, len(prompts), batch_size):
            completions = generate(prompts[start:start + batch_size])
            for document, completion in zip(cut[start:start + batch_size], completions):
                output = first_line(completion)
                result.outputs.append(output)
                result.scores.append(contains_answer(output, document.answers))
    return results
