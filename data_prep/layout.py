"""File names in a shard folder. Kept apart from shards.py so that the CLI can describe a folder
without that module's heavy imports (webdataset pulls in torch), e.g. after a Ctrl-C during them."""
import re
from pathlib import Path

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^(train|valid)-\d{6}\.tar$")


def published_shards(out_dir: str | Path) -> list[str]:
    """Names of the shard files in `out_dir`, sorted; each is complete (a shard is renamed to its name
    only once written)."""
    out = Path(out_dir)
    return sorted(f.name for f in out.iterdir() if SHARD_RE.match(f.name)) if out.is_dir() else []
