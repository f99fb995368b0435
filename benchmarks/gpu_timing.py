"""Timing and memory of one CUDA call, shared by the kernel benchmarks (siblings import it:
benchmarks/ is on sys.path when they run as scripts)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

import torch
from triton.testing import do_bench


def ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median milliseconds of `fn` (triton's do_bench: warm-up, L2 flushed between calls)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory of one call beyond what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """The replay of `fn` captured in a CUDA graph (warmed up first on a side stream, as capture
    needs): timing it times the GPU's work alone, as in a training step where the GPU runs ahead
    of Python."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def fastest(label: str, candidates: Sequence, apply: Callable[[object], None],
            run: Callable[[], object], timer: Callable[[Callable[[], object]], float] = ms):
    """A kernel-config sweep: `apply` each candidate, time `run`; a candidate that fails (e.g.
    out of registers) is skipped. Applies the fastest and returns it."""
    results = []
    for index, candidate in enumerate(candidates):
        apply(candidate)
        try:
            t = timer(run)
        except Exception as e:
            print(f"  tune {label} {candidate}: failed {type(e).__name__}: {str(e)[:120]}")
            continue
        print(f"  tune {label} {candidate}: {t:.4f} ms")
        results.append((t, index))
    best = candidates[min(results)[1]]
    apply(best)
    print(f"best {label}: {best}")
    return best


def shapes_parser(tune_help: str) -> argparse.ArgumentParser:
    """The options of the kernel benchmarks over [s, b] token shapes: --shapes, --bandwidth (for
    the HBM floor), --tune, --json."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2048x16,8192x2", help="tokens as s x b, comma separated")
    ap.add_argument("--bandwidth", type=float, default=4.8, help="HBM TB/s for the floor (H200)")
    ap.add_argument("--tune", action="store_true", help=tune_help)
    ap.add_argument("--json", default=None)
    return ap


def token_shapes(text: str) -> list[tuple[int, int]]:
    """--shapes "2048x16,8192x2" -> [(2048, 16), (8192, 2)]."""
    return [tuple(int(n) for n in shape.split("x")) for shape in text.split(",")]


TIMINGS = ("fwd_ms", "fwd_bwd_ms", "eager_fwd_ms", "eager_fwd_bwd_ms")


def print_speedups(rows: list[dict], baseline: str, shape: Callable[[dict], str]) -> None:
    """Add `<timing>_speedup` to every row (the `baseline` method's time at the same s and b
    over the row's) and print the table the kernel benchmarks share: ms and speed-up forward
    and forward + backward, of the GPU's work (CUDA graph) and of eager calls, then the HBM
    floors. Rows hold method, s, b, the TIMINGS and fwd_floor_ms / fwd_bwd_floor_ms."""
    for row in rows:
        base = next(r for r in rows if r["method"] == baseline and r["s"] == row["s"]
                    and r["b"] == row["b"])
        row.update({f"{key}_speedup": base[key] / row[key] for key in TIMINGS})
    print(f"\n{'':26}|{'GPU (CUDA graph)':^35}|{'eager':^35}|")
    columns = f"{'fwd ms':>9}{'x':>7}{'fwd+bwd ms':>12}{'x':>7}|"
    print(f"{'method':10}{'shape':>16}|{columns * 2}{'fwd floor':>10}{'f+b floor':>10}")
    for r in rows:
        times = "".join(f"{r[key]:{12 if 'bwd' in key else 9}.4f}{r[key + '_speedup']:6.2f}x"
                        + ("|" if "bwd" in key else "") for key in TIMINGS)
        print(f"{r['method']:10}{shape(r):>16}|{times}"
              f"{r['fwd_floor_ms']:10.4f}{r['fwd_bwd_floor_ms']:10.4f}")


def write_json(path: str | None, **fields) -> None:
    """The benchmark's results at `path` (if given), with the device and software they ran on."""
    if path:
        import triton

        with open(path, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=triton.__version__, **fields), fh, indent=1)


def require_cuda(why: str) -> None:
    """Exit with `why` (the script and what it needs) on a machine without a CUDA GPU; else
    print the device and software the numbers will come from (as `write_json` records them)."""
    if not torch.cuda.is_available():
        sys.exit(why)
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
