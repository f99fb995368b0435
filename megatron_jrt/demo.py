"""The end-to-end CPU demo: tokenizer -> shards -> pretraining -> a greedy sample.

    python -m megatron_jrt.demo [--set section.key=value ...]

Steps already done (tokenizer, shards under runs/demo) are reused on a second run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
DEMO_DIR = Path("runs/demo")


def prepare_data(run_dir: Path, vocab_size: int = 4096) -> tuple[Path, Path]:
    """Train the tokenizer and write the shards of the bundled corpus, unless already there."""
    from data_prep import cli
    from data_prep.corpus import bundled_corpus_paths

    corpus = [str(p) for p in bundled_corpus_paths()]
    tokenizer, shards = run_dir / "tok.model", run_dir / "shards"
    if not tokenizer.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        if cli.main(["tokenizer", "--input", *corpus, "--vocab-size", str(vocab_size),
                     "--out", str(tokenizer), "--max-sentences", "300000"]):
            raise SystemExit("demo: tokenizer training failed")
    if not (shards / "manifest.json").is_file():
        if cli.main(["shards", "--input", *corpus, "--tokenizer", str(tokenizer), "--out",
                     str(shards), "--shard-size", "256k", "--valid-fraction", "0.02",
                     "--valid-shards", "1"]):
            raise SystemExit("demo: sharding failed")
    return tokenizer, shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jrt-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    tokenizer, shards = prepare_data(DEMO_DIR)
    from megatron_jrt import train

    return train.main(["--config", str(CONFIG), "--set", f"data.tokenizer={tokenizer}",
                       "--set", f"data.data_dir={shards}", *sum((["--set", s] for s in args.set), [])])


if __name__ == "__main__":
    sys.exit(main())
