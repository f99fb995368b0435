"""Reading input documents: .txt / .txt.gz (one document per file, or per paragraph or line with
`split_text`) and .jsonl / .jsonl.gz (one document per line, field "text").

`split_text` applies to .txt files only: a jsonl record is a document boundary its writer chose, so
it is never cut further. "paragraph": the text between blank lines (lines of whitespace only);
"line": each non-blank line. The separators (line breaks, blank lines) are not part of any document.

Bytes that are not UTF-8 are replaced by U+FFFD and counted (`errors="replace"`, the default),
or raise an error naming the file and byte offset (`errors="strict"`).
"""
import glob
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".json.gz")
TEXT_UNITS = ("file", "paragraph", "line")  # what one document of a .txt file is


class InputError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


@dataclass
class ReadStats:
    documents: int = 0
    empty_documents: int = 0          # skipped: nothing but whitespace
    files_with_bad_utf8: list = field(default_factory=list)


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files named by `patterns` (paths or globs), in the given order, globs sorted, no repeats."""
    out, seen = [], set()
    for pat in patterns:
        pat = os.path.expanduser(str(pat))
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        if not matches:
            raise InputError(f"input pattern {pat!r} matches no file")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise InputError(f"input file {str(p)!r} does not exist (or is not a file)")
            if not p.name.endswith(SUFFIXES):
                raise InputError(f"input file {str(p)!r}: unknown type; expected one of {', '.join(SUFFIXES)}")
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append(p)
    return out


def _read_bytes_lines(path: Path):
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise InputError(f"{path}: cannot read ({e}); is the file complete and of the type its name says?") from e


def _decode(raw: bytes, path: Path, where: str, errors: str, stats: ReadStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise InputError(f"{path}{where}: not valid UTF-8 at byte {e.start} ({raw[e.start:e.start + 8]!r}); "
                             "fix the encoding or run without --strict-utf8 to replace bad bytes") from e
        if str(path) not in stats.files_with_bad_utf8:
            stats.files_with_bad_utf8.append(str(path))
        return raw.decode("utf-8", errors="replace")


def _txt_lines(path: Path, errors: str, stats: ReadStats) -> Iterator[str]:
    """Lines of a .txt file without their line breaks, read one at a time: a large file is never whole in
    memory."""
    for lineno, raw in enumerate(_read_bytes_lines(path), 1):
        yield _decode(raw, path, f":{lineno}", errors, stats).rstrip("\r\n")


def _paragraphs(lines: Iterator[str]) -> Iterator[str]:
    paragraph: list[str] = []
    for line in lines:
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def _iter_txt(path: Path, split_text: str, errors: str, stats: ReadStats) -> Iterator[str]:
    if split_text == "file":
        yield _decode(b"".join(_read_bytes_lines(path)), path, "", errors, stats)
    elif split_text == "paragraph":
        yield from _paragraphs(_txt_lines(path, errors, stats))
    else:
        yield from (line for line in _txt_lines(path, errors, stats) if line.strip())


def iter_documents(path: Path, text_key: str = "text", errors: str = "replace",
                   stats: ReadStats | None = None, split_text: str = "file") -> Iterator[str]:
    """Documents of one input file, empty ones (whitespace only) skipped and counted."""
    if split_text not in TEXT_UNITS:
        raise ValueError(f"--split-text {split_text!r}: expected one of {', '.join(TEXT_UNITS)}")
    stats = stats if stats is not None else ReadStats()
    if path.name.endswith((".txt", ".txt.gz")):
        docs = _iter_txt(path, split_text, errors, stats)
    else:
        docs = _iter_jsonl(path, text_key, errors, stats)
    for doc in docs:
        if doc.strip():
            stats.documents += 1
            yield doc
        else:
            stats.empty_documents += 1


def _iter_jsonl(path: Path, text_key: str, errors: str, stats: ReadStats) -> Iterator[str]:
    for lineno, raw in enumerate(_read_bytes_lines(path), 1):
        if not raw.strip():
            continue
        line = _decode(raw, path, f":{lineno}", errors, stats)
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                             "each line must be one JSON object") from e
        if not isinstance(rec, dict) or text_key not in rec:
            raise InputError(f"{path}:{lineno}: no {text_key!r} field; each line must be a JSON object "
                             f"with the document in {text_key!r} (or pass --text-key)")
        if not isinstance(rec[text_key], str):
            raise InputError(f"{path}:{lineno}: field {text_key!r} is {type(rec[text_key]).__name__}, expected a string")
        yield rec[text_key]


def iter_all_documents(paths: list[Path], text_key: str = "text", errors: str = "replace",
                       stats: ReadStats | None = None, split_text: str = "file") -> Iterator[str]:
    for p in paths:
        yield from iter_documents(p, text_key, errors, stats, split_text)
