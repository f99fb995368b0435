"""A real-text corpus from local files, tokenised and sharded by jrt-prep, cached by its settings.

For `lm_quality` on a machine with no internet but a large Python environment: the source and
documentation files (`.py`, `.md`, `.rst`, `.txt`) under some directories (by default the
running Python's standard library and site-packages) become documents, one per file:

- candidates: every such file under each directory, symlinks not followed, files over
  `MAX_FILE_BYTES` (generated tables, vendored data) and non-UTF-8 files skipped, nothing
  under /usr/share/doc (the Debian package pages of the recall set come from the same
  packages' metadata);
- order and cap: candidates are read in the order of sha256(directory index, relative path),
  a deterministic shuffle that does not depend on the file system's listing order; exact
  duplicates (same content sha256) are dropped; reading stops at `max_bytes` of text;
- the kept documents are written to one JSONL in content-sha256 order, and `jrt-prep shards`
  holds out its `--valid-fraction` of them: every n-th document of that order, so the split is
  a function of the set of documents alone, not of paths or listing order (and, deduplicated,
  the same text never lands in both splits). The tokenizer trains on all of them.

`jrt-prep tokenizer` and `jrt-prep shards` (data_prep.cli, called as the command is) do the
rest. Everything lands in `<work_dir>/data-<key>/`, key = a hash of the settings and of the
kept documents' hashes; `corpus.json` there is written last, so a folder with it is complete
and a rerun with the same settings reuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import site
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

SUFFIXES = (".py", ".md", ".rst", ".txt")
MAX_FILE_BYTES = 1 << 20  # larger files are mostly generated (tables, test data, changelogs)
EXCLUDED_DIRS = (Path("/usr/share/doc"),)  # overlaps the recall set (data_prep/corpus/RECALL_SET.md)
EXCLUDED_NAMES = ("RECALL_SET.md",)  # the recall set's own description, wherever installed
CORPUS_INFO = "corpus.json"


@dataclass(frozen=True)
class CorpusSettings:
    dirs: tuple[str, ...]
    max_bytes: int
    vocab_size: int
    valid_fraction: float
    suffixes: tuple[str, ...] = SUFFIXES
    skip_dirs: tuple[str, ...] = ()  # subtrees of `dirs` left out (site-packages in a stdlib)


@dataclass(frozen=True)
class PreparedData:
    data_dir: Path  # the shards (manifest.json)
    tokenizer: Path  # the SentencePiece model
    info: dict  # corpus.json: settings, documents, bytes, tokens, seconds


def default_corpus_dirs() -> list[str]:
    """The running Python's standard library and site-packages directories that exist."""
    paths = sysconfig.get_paths()
    found = [paths["stdlib"], paths["purelib"], paths["platlib"]]
    found += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    found.append(site.getusersitepackages())
    unique = []
    for path in found:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in unique:
            unique.append(real)
    return unique


def _excluded(path: Path, skip: tuple[Path, ...] = ()) -> bool:
    return any(path == ex or ex in path.parents for ex in EXCLUDED_DIRS + skip)


def candidate_files(dirs: list[str], suffixes: tuple[str, ...], skip_dirs: tuple[str, ...] = ()
                    ) -> list[tuple[str, Path]]:
    """(order key, path) of every candidate file, sorted by the key (see the module docstring).

    A file reachable from two of `dirs` (site-packages inside a stdlib tree) is listed once.
    """
    skip = tuple(Path(d).resolve() for d in skip_dirs)
    seen, found = set(), []
    for index, root in enumerate(dirs):
        root_path = Path(root).resolve()
        if _excluded(root_path):
            raise SystemExit(f"--corpus-dirs: {root} is under /usr/share/doc, which overlaps the "
                             "recall set; leave it out")
        for current, subdirs, files in os.walk(root_path):  # followlinks=False
            here = Path(current)
            subdirs[:] = sorted(d for d in subdirs if not _excluded(here / d, skip)
                                and d != "__pycache__")
            for name in files:
                path = here / name
                if (not name.endswith(suffixes) or name in EXCLUDED_NAMES
                        or path.is_symlink() or path in seen):
                    continue
                seen.add(path)
                relative = path.relative_to(root_path).as_posix()
                key = hashlib.sha256(f"{index}\0{relative}".encode()).hexdigest()
                found.append((key, path))
    found.sort()
    return found


def collect_documents(dirs: list[str], max_bytes: int, suffixes: tuple[str, ...] = SUFFIXES,
                      skip_dirs: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """(content sha256, text) of the kept documents, in content-hash order."""
    kept: dict[str, str] = {}
    total = 0
    for _, path in candidate_files(dirs, suffixes, skip_dirs):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if digest in kept:
            continue
        kept[digest] = text
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return sorted(kept.items())


def prepare_corpus(settings: CorpusSettings, work_dir: Path, *, workers: int,
                   tokenizer_sentences: int = 2_000_000, log=print) -> PreparedData:
    """The shards and tokenizer of `settings`, built with jrt-prep unless already in `work_dir`."""
    from data_prep import cli as jrt_prep

    started = time.perf_counter()
    documents = collect_documents(list(settings.dirs), settings.max_bytes, settings.suffixes,
                                  settings.skip_dirs)
    if len(documents) < 2:
        raise SystemExit(f"--corpus-dirs {','.join(settings.dirs)}: {len(documents)} documents "
                         f"({', '.join(settings.suffixes)} files); give directories with more")
    key = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode()
                         + "".join(d for d, _ in documents).encode()).hexdigest()[:12]
    folder = work_dir / f"data-{key}"
    done = folder / CORPUS_INFO
    paths = PreparedData(folder / "shards", folder / "tok.model", {})
    if done.is_file():
        info = json.loads(done.read_text())
        log(f"corpus: reusing {folder} ({info['documents']:,} documents, "
            f"{info['train_tokens']:,} train + {info['valid_tokens']:,} valid tokens)")
        return PreparedData(paths.data_dir, paths.tokenizer, info)
    folder.mkdir(parents=True, exist_ok=True)
    docs_file = folder / "documents.jsonl"
    text_bytes = 0
    with open(docs_file, "w", encoding="utf-8") as out:
        for digest, text in documents:
            out.write(json.dumps({"text": text, "sha256": digest}) + "\n")
            text_bytes += len(text.encode("utf-8"))
    collected = time.perf_counter()
    log(f"corpus: {len(documents):,} documents, {text_bytes / 1e6:.1f} MB of text from "
        f"{', '.join(settings.dirs)} in {collected - started:.0f} s; tokenizer and shards in {folder}")
    # A folder without corpus.json is from a run that stopped: its files are replaced.
    _jrt_prep(jrt_prep, ["tokenizer", "--input", str(docs_file), "--vocab-size",
                         str(settings.vocab_size), "--out", str(paths.tokenizer), "--overwrite",
                         "--threads", str(workers), "--max-sentences", str(tokenizer_sentences)])
    _jrt_prep(jrt_prep, ["shards", "--input", str(docs_file), "--tokenizer", str(paths.tokenizer),
                         "--out", str(paths.data_dir), "--overwrite", "--no-progress",
                         "--valid-fraction", str(settings.valid_fraction), "--valid-shards", "1",
                         "--workers", str(workers)])
    manifest = json.loads((paths.data_dir / "manifest.json").read_text())
    splits = {name: sum(e["tokens"] for e in entries)
              for name, entries in manifest["splits"].items()}
    info = {"settings": asdict(settings), "key": key, "documents": len(documents),
            "text_bytes": text_bytes, "train_tokens": splits["train"],
            "valid_tokens": splits["valid"],
            "valid_documents": sum(e["samples"] for e in manifest["splits"]["valid"]),
            "vocab_size": manifest["tokenizer"]["vocab_size"],
            "python": sys.version.split()[0], "seconds": time.perf_counter() - started}
    docs_file.unlink()  # the shards hold it now; the folder stays small
    done.write_text(json.dumps(info, indent=1) + "\n")
    log(f"corpus: {info['train_tokens']:,} train + {info['valid_tokens']:,} valid tokens "
        f"({info['valid_documents']:,} held-out documents), vocab {info['vocab_size']:,}, "
        f"{info['seconds']:.0f} s")
    return PreparedData(paths.data_dir, paths.tokenizer, info)


def _jrt_prep(jrt_prep, argv: list[str]) -> None:
    code = jrt_prep.main(argv)
    if code:
        raise SystemExit(f"jrt-prep {' '.join(argv)}: exit {code}")
