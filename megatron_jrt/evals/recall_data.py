"""Documents for the recall harness, read from JSONL with errors that name the file and line.

One JSON object per line:
- the document: "context" (or "text");
- what is asked: "key" for key-value extraction (SWDE, FDA: the model completes "{Key}:"), or
  "question" for QA (SQuAD, TriviaQA, NQ, Drop), with an optional "cloze", the text the answer
  completes (NQ's "The capital of France is"; the question itself when absent);
- the gold: "answer" (a string) or "answers" (a list of strings; the best one counts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class RecallDataError(ValueError):
    """Bad input, as one line naming the file (and line) and what to fix."""


@dataclass(frozen=True)
class RecallDocument:
    context: str
    query: str  # the key (extraction) or the question (QA)
    answers: tuple[str, ...]
    cloze: str | None = None  # QA only: what the answer completes (None: the question)

    @property
    def is_qa(self) -> bool:
        return self.cloze is not None


def read_documents(path: str | Path) -> list[RecallDocument]:
    """Every non-blank line of `path` as a document; RecallDataError at the first bad one."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise RecallDataError(f"{path}: cannot read the documents ({reason})") from None
    documents = [parse_document(line, f"{path}:{number}")
                 for number, line in enumerate(lines, 1) if line.strip()]
    if not documents:
        raise RecallDataError(f"{path}: no documents (one JSON object per line)")
    return documents


def parse_document(line: str, where: str) -> RecallDocument:
    """One JSONL line; `where` ("file:line") starts every error message."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecallDataError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise RecallDataError(f"{where}: expected a JSON object, got {type(record).__name__}")

    def text_field(*names: str) -> str | None:
        for name in names:
            if name in record:
                if not isinstance(record[name], str) or not record[name].strip():
                    raise RecallDataError(f"{where}: \"{name}\" must be a non-empty string")
                return record[name]
        return None

    context = text_field("context", "text")
    if context is None:
        raise RecallDataError(f"{where}: no \"context\" (or \"text\") field")
    key, question = text_field("key"), text_field("question")
    if (key is None) == (question is None):
        raise RecallDataError(f"{where}: needs exactly one of \"key\" (extraction) and "
                              "\"question\" (QA)")
    cloze = text_field("cloze")
    if cloze is not None and question is None:
        raise RecallDataError(f"{where}: \"cloze\" belongs to QA records (with \"question\")")
    answers = record.get("answers", record.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) and a.strip() for a in answers)):
        raise RecallDataError(f"{where}: needs \"answer\" (a non-empty string) or \"answers\" "
                              "(a list of non-empty strings)")
    return RecallDocument(context=context, query=key if key is not None else question,
                          answers=tuple(answers),
                          cloze=None if question is None else (cloze or question))
