"""Data pipeline throughput on the bundled corpus, against what training consumes.

    python benchmarks/data_pipeline.py [--seq-length 2048 --micro-batch 8 --seconds 10]

Prints: tokenizer training time; tokenisation + sharding throughput (tokens/s, and per core)
with 1 and 2 worker processes; reader throughput (sequences/s, steady state) with 0 and 2
DataLoader workers and the ratio to a 360M JRT-RNN on one H100 (~50k tokens/s, i.e.
50k / (L+1) sequences/s; the issue asks for >= 20x); and the latency of a mid-epoch resume.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.corpus import bundled_corpus_paths  # noqa: E402
from data_prep.documents import iter_all_documents  # noqa: E402
from data_prep.reader import PackedSequenceReader  # noqa: E402
from data_prep.shards import write_shards  # noqa: E402
from data_prep.tokenizer import train_sentencepiece  # noqa: E402

H100_360M_TOKENS_PER_S = 50_000


def bench_reader(data_dir, seq_length, micro_batch, workers, seconds):
    r = PackedSequenceReader(str(data_dir), "train", seq_length, micro_batch, num_workers=workers)
    it = iter(r)
    t0 = time.perf_counter()
    next(it)  # start-up (worker processes, first shard) timed apart
    startup = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    return {"workers": workers, "startup_s": startup, "batches": n, "sequences_per_s": n * micro_batch / dt,
            "tokens_per_s": n * micro_batch * (seq_length + 1) / dt, "epochs_seen": r.state_dict()["epoch"]}


def bench_resume(data_dir, seq_length, micro_batch, workers):
    r = PackedSequenceReader(str(data_dir), "train", seq_length, micro_batch, num_workers=workers)
    state = {**r.state_dict(), "epoch": 3, "position": len(r) * 2 // 3}
    t0 = time.perf_counter()
    r2 = PackedSequenceReader(str(data_dir), "train", seq_length, micro_batch, num_workers=workers)
    r2.load_state_dict(state)
    next(iter(r2))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--shard-size", default="100k")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    corpus = [str(p) for p in bundled_corpus_paths()]
    res = {"cpu_cores_visible": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        train_sentencepiece(iter_all_documents([Path(c) for c in corpus]), tmp / "tok.model",
                            vocab_size=args.vocab_size)
        res["tokenizer_train_s"] = time.perf_counter() - t0
        print(f"tokenizer training (vocab {args.vocab_size}, bundled corpus): {res['tokenizer_train_s']:.1f} s")

        res["sharding"] = []
        for workers in (1, 2):
            t0 = time.perf_counter()
            m = write_shards(corpus, str(tmp / "tok.model"), tmp / f"shards{workers}", shard_size=args.shard_size,
                             workers=workers, progress=False, log=lambda s: None)
            dt = time.perf_counter() - t0
            tokens = sum(e["tokens"] for s in m["splits"].values() for e in s)
            row = {"workers": workers, "seconds": dt, "documents": m["documents"], "tokens": tokens,
                   "tokens_per_s": tokens / dt, "tokens_per_s_per_core": tokens / dt / workers,
                   "docs_per_s": m["documents"] / dt}
            res["sharding"].append(row)
            print(f"shards, {workers} worker(s): {tokens:,} tokens in {dt:.2f} s = {row['tokens_per_s']:,.0f} tokens/s "
                  f"({row['tokens_per_s_per_core']:,.0f} per core, {row['docs_per_s']:,.0f} docs/s), end to end")
        data = tmp / "shards2"

        need = H100_360M_TOKENS_PER_S / (args.seq_length + 1)
        res["reader"] = []
        print(f"reader, L={args.seq_length}, micro batch {args.micro_batch}; a 360M model on one H100 "
              f"consumes ~{need:.0f} sequences/s ({H100_360M_TOKENS_PER_S:,} tokens/s)")
        for workers in (0, 2):
            row = bench_reader(data, args.seq_length, args.micro_batch, workers, args.seconds)
            row["ratio_vs_h100_360m"] = row["sequences_per_s"] / need
            row["resume_first_batch_s"] = bench_resume(data, args.seq_length, args.micro_batch, workers)
            res["reader"].append(row)
            print(f"  num_workers={workers}: {row['sequences_per_s']:,.0f} sequences/s "
                  f"({row['tokens_per_s'] / 1e6:,.1f} M tokens/s) = {row['ratio_vs_h100_360m']:.0f}x the need; "
                  f"start-up {row['startup_s']:.2f} s, mid-epoch resume to first batch "
                  f"{row['resume_first_batch_s']:.2f} s, {row['epochs_seen']} epochs read")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
