"""A document-recall set from real text every Debian machine has: its installed-package records.

    python -m data_prep.recall_set [--status /var/lib/dpkg/status] [--documents 250] [--out FILE]

Each document is one package's record from dpkg's status file, written as an FDA/SWDE-style
semi-structured page (a field per line, in an order shuffled per package, then the long
description); the key asked is one of its fields (summary, version, maintainer, installed
size, source package, homepage) and the answer is that record's own value, so the model
must find it in the page (key-value extraction, `jrt-eval recall`'s "key" records). Nothing is
invented. The same status file gives the same set: packages, keys and field orders are
chosen by sha256 of the package name and --seed, not by a random generator's state.

The shipped set (SHIPPED_SET) was made from this project's build machine (Debian 12); its
provenance (the status file's sha256, the command) is in data_prep/corpus/RECALL_SET.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

SHIPPED_SET = Path(__file__).resolve().parent / "corpus" / "recall_debian_packages.jsonl"
DEFAULT_STATUS = Path("/var/lib/dpkg/status")
MAX_DESCRIPTION_CHARS = 1200


def parse_status(text: str) -> list[dict[str, str]]:
    """dpkg status stanzas as {field: value}; continuation lines joined with newlines."""
    records = []
    for stanza in re.split(r"\n\s*\n", text):
        record: dict[str, str] = {}
        field = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and field is not None:
                record[field] += "\n" + line[1:]
            elif ":" in line:
                field, value = line.split(":", 1)
                record[field] = value.strip()
        if "Package" in record and "Description" in record:
            records.append(record)
    return records


def _long_description(description: str) -> str:
    """The description's body as paragraphs (dpkg's " ." lines separate them), capped."""
    lines = description.split("\n")[1:]
    text = "\n".join("" if line.strip() == "." else line.strip() for line in lines).strip()
    if len(text) > MAX_DESCRIPTION_CHARS:
        cut = text[:MAX_DESCRIPTION_CHARS]
        text = cut[:cut.rfind(". ") + 1] if ". " in cut else cut
    return text


def facts(record: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{key: (the line the page shows, the answer)} for the fields a question may ask."""
    found = {"summary": (record["Description"].split("\n")[0].strip(),) * 2,
             "version": (record["Version"],) * 2}
    maintainer = record.get("Maintainer", "")
    name = maintainer.split("<")[0].strip()
    if name:
        found["maintainer"] = (maintainer, name)
    if record.get("Installed-Size", "").isdigit():
        size = f"{int(record['Installed-Size']):,} kB"
        found["installed size"] = (size, size)
    source = record.get("Source", "").split(" ")[0]
    if source and source != record["Package"]:
        found["source package"] = (source, source)
    if record.get("Homepage"):
        found["homepage"] = (record["Homepage"],) * 2
    return found


def _rank(seed: int, *parts: str) -> int:
    return int.from_bytes(hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()[:8],
                          "big")


def document(record: dict[str, str], seed: int) -> dict:
    """One recall record {"text", "key", "answer", "package"} for a package's status record."""
    package = record["Package"]
    shown = facts(record)
    keys = sorted(shown)
    key = keys[_rank(seed, package, "key") % len(keys)]
    lines = [f"{name[0].upper() + name[1:]}: {line}" for name, (line, _) in shown.items()]
    for field in ("Section", "Architecture", "Priority"):
        if record.get(field):
            lines.append(f"{field}: {record[field]}")
    random.Random(_rank(seed, package, "order")).shuffle(lines)
    text = "\n".join([f"Package: {package}", *lines])
    body = _long_description(record["Description"])
    if body:
        text += "\n\n" + body
    return {"text": text, "key": key, "answer": shown[key][1], "package": package}


def build(status: str, documents: int, seed: int) -> list[dict]:
    """`documents` recall records from the packages of status-file text `status`."""
    records = {r["Package"]: r for r in parse_status(status)}  # one per package name
    chosen = sorted(records, key=lambda name: _rank(seed, name, "pick"))[:documents]
    return [document(records[name], seed) for name in sorted(chosen)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.recall_set",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--status", type=Path, default=DEFAULT_STATUS)
    parser.add_argument("--documents", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SHIPPED_SET)
    args = parser.parse_args(argv)
    try:
        raw = args.status.read_bytes()
    except OSError as exc:
        print(f"recall_set: error: {args.status}: {exc.strerror}", file=sys.stderr)
        return 2
    rows = build(raw.decode("utf-8", errors="replace"), args.documents, args.seed)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                        encoding="utf-8")
    print(f"{len(rows)} documents -> {args.out} (from {args.status}, sha256 "
          f"{hashlib.sha256(raw).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
