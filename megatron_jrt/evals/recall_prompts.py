"""The recall prompts: contexts cut to a token budget around the answer, then a template.

Templates are the authors' lm-eval tasks (HazyResearch/prefix-linear-attention), where the
document is stripped of trailing newlines and periods and ends in exactly one ".":
- extraction (SWDE, FDA): default `{doc}. {Key}:`,
  JRT `Information about {Key}. {doc}.\\n{doc}. {Key}:`
  ({Key}: the key with its first letter upper-cased, a trailing "{key}:" already in the
  document removed);
- QA (NQ, TriviaQA, Drop; SQuAD's is the same text): default `{ctx}. {cloze}`, JRT
  `{question} {ctx}.\\n{ctx}. {cloze}`.
"""
from __future__ import annotations

import re
from typing import Protocol, Sequence

from megatron_jrt.evals.recall_data import RecallDocument

TEMPLATES = ("default", "jrt")


class Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


def render(document: RecallDocument, template: str) -> str:
    """The prompt of `document` under `template` ("default" or "jrt")."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r} is not one of {', '.join(TEMPLATES)}")
    if document.is_qa:
        body = _as_sentence(_without_suffix(document.context.strip(), document.cloze))
        if template == "default":
            return f"{body} {document.cloze}"
        return f"{document.query} {body}\n{body} {document.cloze}"
    key = document.query[0].upper() + document.query[1:]
    body = _as_sentence(_without_suffix(document.context, document.query + ":"))
    if template == "default":
        return f"{body} {key}:"
    return f"Information about {key}. {body}\n{body} {key}:"


def _without_suffix(text: str, suffix: str) -> str:
    """`text` without trailing (case-insensitive) repeats of `suffix`, e.g. a cloze it ends with."""
    while suffix and text.lower().endswith(suffix.lower()):
        text = text[:-len(suffix)]
    return text


def _as_sentence(text: str) -> str:
    return text.strip().strip("\n").strip(".").strip() + "."


def truncate_context(context: str, answers: Sequence[str], codec: Codec,
                     max_tokens: int | None) -> str:
    """`context` cut to `max_tokens` tokens centred on the first match of an answer.

    No match: the first `max_tokens` tokens. The window is found in tokens (the budget is
    the model's) and decoded back to text.
    """
    ids = codec.encode(context)
    if max_tokens is None or len(ids) <= max_tokens:
        return context
    matches = [m for m in (re.search(re.escape(a), context, re.IGNORECASE) for a in answers) if m]
    start = 0
    if matches:
        first = min(matches, key=lambda m: m.start())
        before = len(codec.encode(context[:first.start()]))
        span = len(codec.encode(first.group(0)))
        start = min(max(0, before - (max_tokens - span) // 2), len(ids) - max_tokens)
    return codec.decode(ids[start:start + max_tokens])
