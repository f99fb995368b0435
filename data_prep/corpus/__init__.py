"""The corpus shipped in the repository, so that the demo and the tests need no download."""
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def bundled_corpus_paths() -> list[Path]:
    """Paths of the bundled corpus files (JSON lines, gzip, one document per line, field "text").

    `jrt-prep tokenizer` and `jrt-prep shards` read .jsonl.gz directly, so nothing is unpacked.
    Licence: CC-BY-2.5, see LICENSE.txt in this folder.
    """
    paths = sorted(_HERE.glob("*.jsonl.gz"))
    if not paths:
        raise FileNotFoundError(f"no bundled corpus (*.jsonl.gz) in {_HERE}; was the package installed "
                                "without its package_data?")
    return paths
