"""The end-to-end CPU demo: tokenizer -> shards -> pretraining -> a greedy sample.

    python -m megatron_jrt.demo [--set section.key=value ...]

The tokenizer and shards of the bundled corpus are made under runs/demo on the first run
and reused after that.
"""
from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

# configs/ is installed as the package megatron_jrt.configs (setup.py), editable or not.
CONFIG = Path(str(files("megatron_jrt.configs") / "demo.yaml"))
DEMO_DIR = Path("runs/demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jrt-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    from data_prep.corpus import prepare_bundled
    from megatron_jrt import train

    data = prepare_bundled(DEMO_DIR, vocab_size=4096, progress=True)
    overrides = [f"data.tokenizer={data['tokenizer']}", f"data.data_dir={data['data_dir']}",
                 *args.set]
    return train.main(["--config", str(CONFIG), *sum((["--set", s] for s in overrides), [])])


if __name__ == "__main__":
    sys.exit(main())
