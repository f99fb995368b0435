"""Training throughput of this tree against another tree of the code (a baseline revision), in
one run: benchmarks/train_throughput.py of each, alternating.

    git worktree add /tmp/base HEAD~1          # or: git archive HEAD~1 | tar -x -C /tmp/base
    python benchmarks/ab_throughput.py --baseline /tmp/base --rounds 3 -- \\
        --presets jrt-360m --lengths 2048 --batches 16 --micro-batches 16 --variants fused \\
        --plain none --steps 40
    python benchmarks/ab_throughput.py --baseline . --rounds 1 -- --tiny --variants off \\
        --plain eager                            # CPU, both sides this tree: ratios near 1

The arguments after `--` go to each side's train_throughput.py unchanged. Round by round,
each side runs once in its own process (imports from its own tree, checked), baseline first in
odd rounds and this tree first in even ones, so a drift of the device over the run weighs on
both sides alike. Printed and in `--json`: per configuration (model, variant, length, batch)
the median tokens/s of each side over the rounds, their range, and this tree's over the
baseline's. Plain Transformer++ rows are the same code on both sides: their ratio shows what
the device's noise alone does.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# Run a tree's benchmark with its benchmarks/ (as a script's own folder) and the tree first on
# sys.path; print where megatron_jrt came from.
_RUNNER = ("import runpy, sys; sys.path[:0] = [sys.argv[1] + '/benchmarks', sys.argv[1]]; "
           "import megatron_jrt; "
           "print('ab_throughput: code from', megatron_jrt.__file__, flush=True); "
           "script = sys.argv[1] + '/benchmarks/train_throughput.py'; "
           "sys.argv = [script] + sys.argv[2:]; runpy.run_path(script, run_name='__main__')")


def run_side(tree: Path, args: list[str], json_path: Path) -> dict:
    """One run of `tree`'s train_throughput.py -> its JSON (device, rows, ...); stops if it
    imported another tree's megatron_jrt (the comparison would be of one code with itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tree)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(tree), *args, "--json",
                           str(json_path)], cwd=tree, env=env, capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    if done.returncode not in (0, 1) or not json_path.exists():  # 1: a row's error, in the table
        sys.exit(f"ab_throughput: {tree} exited {done.returncode}:\n{done.stderr[-3000:]}")
    imported = next(line.split(" from ", 1)[1] for line in done.stdout.splitlines()
                    if line.startswith("ab_throughput: code from"))
    if Path(imported).resolve().parents[1] != tree:
        sys.exit(f"ab_throughput: the run of {tree} imported {imported}; "
                 "check PYTHONPATH and editable installs")
    return json.loads(json_path.read_text())


def compare(baseline: list[dict], current: list[dict]) -> list[dict]:
    """Per configuration seen on either side (first-seen order): each side's median tokens/s
    over its ok rows, their range, and current / baseline."""
    def key(row: dict) -> tuple:
        return row["model"], row["kind"], row["variant"], row["seq_length"], row["batch"]

    speeds: dict[tuple, dict[str, list[float]]] = {}
    for side, rows in (("baseline", baseline), ("current", current)):
        for row in rows:
            entry = speeds.setdefault(key(row), {"baseline": [], "current": []})
            if row["status"] == "ok":
                entry[side].append(row["tokens_per_s"])
    out = []
    for (model, kind, variant, length, batch), sides in speeds.items():
        result = dict(model=model, kind=kind, variant=variant, seq_length=length, batch=batch)
        for side, values in sides.items():
            result[side] = statistics.median(values) if values else None
            result[f"{side}_range"] = [min(values), max(values)] if values else None
        both = result["baseline"] and result["current"]
        result["ratio"] = result["current"] / result["baseline"] if both else None
        out.append(result)
    return out


def print_comparison(rows: list[dict], rounds: int) -> None:
    print(f"\nthis tree vs the baseline, median tokens/s over {rounds} round(s) "
          "(plain rows: the same code on both sides)")
    print(f"{'model':<22}{'variant':<14}{'length':>7}{'batch':>6}{'baseline':>12}"
          f"{'this tree':>12}{'ratio':>8}  ranges")
    for r in rows:
        def show(value):
            return "-" if value is None else f"{value:,.0f}"

        ranges = " | ".join("-" if r[f"{side}_range"] is None else
                            f"{r[f'{side}_range'][0]:,.0f}-{r[f'{side}_range'][1]:,.0f}"
                            for side in ("baseline", "current"))
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}x"
        print(f"{r['model']:<22}{r['variant']:<14}{r['seq_length']:>7}{r['batch']:>6}"
              f"{show(r['baseline']):>12}{show(r['current']):>12}{ratio:>8}  {ranges}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", required=True, type=Path,
                        help="a tree of the baseline code (git worktree or archive)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the comparison and every run's JSON here")
    parser.add_argument("benchmark_args", nargs=argparse.REMAINDER,
                        help="-- then train_throughput.py's arguments")
    args = parser.parse_args()
    passed = args.benchmark_args[1:] if args.benchmark_args[:1] == ["--"] else args.benchmark_args
    baseline = args.baseline.resolve()
    if not (baseline / "benchmarks" / "train_throughput.py").is_file():
        sys.exit(f"--baseline: {baseline} has no benchmarks/train_throughput.py; give a tree "
                 "of this repository (git worktree add DIR REV)")
    if args.rounds < 1:
        sys.exit(f"--rounds: {args.rounds}; give 1 or more")
    for flag in ("--json", "--rounds"):
        if flag in passed:
            sys.exit(f"{flag}: give it to ab_throughput.py, not after --")
    runs = {"baseline": [], "current": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            order = [("baseline", baseline), ("current", HERE)]
            for side, tree in order if round_ % 2 else order[::-1]:
                print(f"== round {round_}: {side} ({tree})", flush=True)
                runs[side].append(run_side(tree, passed, Path(tmp) / f"{side}-{round_}.json"))
    comparison = compare(*([row for run in runs[side] for row in run["rows"]]
                           for side in ("baseline", "current")))
    print_comparison(comparison, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            baseline=str(baseline), current=str(HERE), rounds=args.rounds, args=passed,
            comparison=comparison, runs=runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
