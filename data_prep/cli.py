"""`jrt-prep`: tokenizer training and sharding (also `python -m data_prep.cli`).

    jrt-prep tokenizer --input corpus.jsonl.gz --vocab-size 32000 --out tok.model
    jrt-prep shards --input 'data/*.jsonl.gz' --tokenizer tok.model --out shards/ --shard-size 64M
    jrt-prep tokenizer --bundled ...   /   jrt-prep shards --bundled ...   (the corpus in the repo)
    jrt-prep verify --data shards/     (every shard against manifest.json; exit 1 if any is bad)

Exit codes: 0 done, 1 `verify` found a bad shard, 2 an error it knows (one line: `jrt-prep CMD: error: ...`),
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (one line: `jrt-prep CMD: interrupted (SIGINT); ...`, or
`jrt-prep: interrupted (SIGINT)` when it came before the arguments were read).
"""
# Standard library only up here: jrt-prep's signal handler is installed first thing in main(), and
# everything else (data_prep's modules, numpy, sentencepiece) is imported after it, so a Ctrl-C during
# start-up stops the run like one later (exit 130, one line) instead of as a KeyboardInterrupt traceback.
import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised in the main thread: both stop a run the same way (its cleanup runs, the
    exit code is 128 + signal number). Not KeyboardInterrupt: under `python -m`, a KeyboardInterrupt that
    passed through exec() (dataclasses do that during imports) makes CPython end by SIGINT, even when caught."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal = signal.Signals(signum)


@contextlib.contextmanager
def _signals_raise_interrupted():
    """SIGINT and SIGTERM raise `Interrupted` inside; yields the list of the signals received, because an
    extension module being imported when one comes may turn the exception into an ImportError (numpy does)."""
    received: list[int] = []

    def raise_interrupted(signum, frame):
        received.append(signum)
        raise Interrupted(signum)

    # a signal the parent set to be ignored stays ignored, as Python leaves it (nohup, `cmd &` in a script)
    handled = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, raise_interrupted) for s in handled}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _inputs(args) -> list[str]:
    from data_prep.documents import InputError

    paths = list(args.input or [])
    if args.bundled:
        from data_prep.corpus import bundled_corpus_paths

        paths += [str(p) for p in bundled_corpus_paths()]
    if not paths:
        raise InputError("no input: pass --input FILE_OR_GLOB (repeatable) or --bundled")
    return paths


def _add_input_args(p: argparse.ArgumentParser) -> None:
    from data_prep.documents import TEXT_UNITS

    p.add_argument("--input", nargs="+", action="extend", metavar="FILE_OR_GLOB",
                   help=".txt/.txt.gz (one document per file, see --split-text) or .jsonl/.jsonl.gz "
                        "(one per line, field --text-key)")
    p.add_argument("--bundled", action="store_true", help="add the corpus shipped in data_prep/corpus")
    p.add_argument("--text-key", default="text", help="JSON field holding the document text (default: text)")
    p.add_argument("--split-text", choices=TEXT_UNITS, default="file",
                   help="what one document of a .txt input is: the whole file (default), each paragraph "
                        "(text between blank lines) or each non-blank line; jsonl records are never split")
    p.add_argument("--strict-utf8", action="store_true",
                   help="fail on bytes that are not UTF-8 (default: replace them with U+FFFD and warn)")


def cmd_tokenizer(args) -> int:
    from data_prep.documents import InputError, ReadStats, expand_inputs, iter_all_documents
    from data_prep.tokenizer import TrainingError, load_tokenizer, train_sentencepiece

    stats = ReadStats()
    paths = expand_inputs(_inputs(args))
    t0 = time.perf_counter()
    docs = iter_all_documents(paths, args.text_key, "strict" if args.strict_utf8 else "replace", stats,
                              args.split_text)
    try:
        train_sentencepiece(docs, args.out, vocab_size=args.vocab_size, max_sentences=args.max_sentences,
                            num_threads=args.threads, seed=args.seed, overwrite=args.overwrite)
    except TrainingError as e:
        if stats.documents == 0:
            raise InputError(f"no documents in {', '.join(map(str, paths))}: the inputs are empty") from e
        raise
    tok = load_tokenizer(args.out)
    for f in stats.files_with_bad_utf8:
        print(f"warning: {f}: bytes that are not UTF-8 were replaced by U+FFFD", file=sys.stderr)
    print(f"{args.out}: vocab {tok.vocab_size}, pad={tok.pad_id} eod={tok.eod_id} mask={tok.mask_id}, "
          f"sha256 {tok.hash[:16]}..., from {stats.documents} documents in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_shards(args) -> int:
    from data_prep.shards import write_shards

    write_shards(_inputs(args), args.tokenizer, args.out, shard_size=args.shard_size,
                 valid_fraction=args.valid_fraction, valid_shards=args.valid_shards, workers=args.workers,
                 text_key=args.text_key, strict_utf8=args.strict_utf8, overwrite=args.overwrite,
                 progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr),
                 split_text=args.split_text)
    return 0


def _shards_left_behind(out_dir: str) -> str:
    """What a `shards` run stopped by a signal left in its folder (the writer deletes the shard it was
    writing; the ones before it are complete)."""
    from data_prep.layout import MANIFEST, published_shards

    out = Path(out_dir)
    if (out / MANIFEST).exists():
        return f"{out} holds a finished run ({MANIFEST} is in place)"
    shards = published_shards(out)
    past = f" past {shards[-1]}" if shards else ""
    return f"nothing published{past}: no {MANIFEST} in {out}, so it reads as unfinished; run the command again"


def cmd_verify(args) -> int:
    """Check every shard of a finished run against its manifest (size, sha256, counts)."""
    import numpy as np

    from data_prep.reader import ShardError, load_manifest, read_shard

    m = load_manifest(args.data)
    bad = 0
    for split, entries in m["splits"].items():
        for e in entries:
            try:
                read_shard(Path(args.data) / e["file"], e, np.dtype(m["dtype"]))
            except ShardError as err:
                bad += 1
                print(f"BAD  {err}", file=sys.stderr)
        print(f"{split}: {len(entries)} shards, {sum(e['samples'] for e in entries)} documents, "
              f"{sum(e['tokens'] for e in entries):,} tokens")
    print(f"{bad} bad shard(s); tokenizer sha256 {m['tokenizer']['hash']}")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jrt-prep", description="JRT-RNN data preparation")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer (pad 0, unk 1, eod 2, [MASK] 3)")
    _add_input_args(t)
    t.add_argument("--vocab-size", type=int, default=32000,
                   help="pieces in the vocabulary, the 4 special ones included (default 32000; at least 261)")
    t.add_argument("--out", required=True, help="the .model file to write (not a folder)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--max-sentences", type=int, default=2_000_000,
                   help="lines sampled for training (bounds time and memory; default 2M)")
    t.add_argument("--threads", type=int, default=2, help="SentencePiece training threads (default 2)")
    t.add_argument("--seed", type=int, default=0, help="seed of the line sampling (default 0)")
    t.set_defaults(func=cmd_tokenizer)

    s = sub.add_parser("shards", help="tokenise into webdataset .tar shards + manifest.json")
    _add_input_args(s)
    s.add_argument("--tokenizer", required=True, help="SentencePiece .model path, or gpt2:/dir (GPT-2 layout)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--shard-size", default="64M", help="tokens per shard, e.g. 500k, 64M (default 64M)")
    s.add_argument("--valid-fraction", type=float, default=0.01,
                   help="share of documents held out, in [0, 1) (default 0.01; 0: no validation split)")
    s.add_argument("--valid-shards", type=int, default=8,
                   help="validation shards to write (default 8; at least 1 unless --valid-fraction is 0)")
    s.add_argument("--workers", type=int, default=2, help="tokeniser processes (default 2; 1: in this process)")
    s.add_argument("--overwrite", action="store_true", help="replace a finished shard run in --out")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_shards)

    v = sub.add_parser("verify", help="check all shards of --data against manifest.json")
    v.add_argument("--data", required=True, help="shard folder (holding manifest.json)")
    v.set_defaults(func=cmd_verify)
    return ap


def main(argv=None) -> int:
    args = None
    try:
        with _signals_raise_interrupted() as received:
            try:
                args = build_parser().parse_args(argv)
                return args.func(args)
            except ImportError as e:  # a signal during an extension's import can surface as its ImportError
                if received:
                    raise Interrupted(received[0]) from e
                raise
    except Interrupted as e:
        note = f"; {_shards_left_behind(args.out)}" if getattr(args, "command", None) == "shards" else ""
        print(f"{_prog(args)}: interrupted ({e.signal.name}){note}", file=sys.stderr)
        return 128 + e.signal
    # InputError and ManifestError are ValueErrors; WorkerError (a tokeniser process died) a ChildProcessError
    except (FileNotFoundError, FileExistsError, ValueError, ImportError, ChildProcessError) as e:
        print(f"{_prog(args)}: error: {e}", file=sys.stderr)
        return 2


def _prog(args) -> str:
    """`jrt-prep CMD`, or `jrt-prep` when it stopped before its arguments were parsed."""
    return f"jrt-prep {args.command}" if args is not None else "jrt-prep"


if __name__ == "__main__":
    sys.exit(main())
