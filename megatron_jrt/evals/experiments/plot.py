"""Accuracy vs state size per model from sweep JSONs (the paper's figures), plus markdown tables.

    python -m megatron_jrt.evals.experiments.plot results/sd*.json results/mqar*.json --out docs/

One PNG per experiment found in the inputs (shards of one sweep are merged):
set_disjointness.png has a panel per set order (accuracy averaged over that order's test
cells), mqar.png one panel averaged over all test cells, and a panel of training-loss curves
when the runs recorded them; lm_quality.png (from lm_quality's JSON) each model's held-out
loss on fresh text and on a repeat of text it read just before. A point is the best run at that
(model, state size), over learning rates and seeds, as in the paper. The tables (one row per
point, one column per test cell) go to stdout, ready for docs/RESULTS.md. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ORDERS = ("short first", "long first")


def load_runs(paths: list[Path]) -> dict[str, list[dict]]:
    """{experiment: its runs}, the runs of every input file (shards) together."""
    runs: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        data = json.loads(path.read_text())
        runs[data["experiment"]] += data["runs"]
    return runs


def cell_name(cell: dict) -> str:
    if "order" in cell:
        return f"{cell['A']}x{cell['B']}"
    return f"{cell['seq_len']}/{cell['kv_pairs']}"


def panels(experiment: str, run: dict) -> dict[str, float]:
    """{panel title: this run's accuracy in it}."""
    cells = run["cells"]
    if experiment == "set_disjointness":
        return {order: _mean([c["accuracy"] for c in cells if c["order"] == order])
                for order in ORDERS if any(c["order"] == order for c in cells)}
    return {"all test cells": _mean([c["accuracy"] for c in cells])}


def best_points(runs: list[dict]) -> list[dict]:
    """The best run (mean accuracy over its cells) per (family, state size), by state size."""
    best: dict[tuple, dict] = {}
    for run in runs:
        key = (run["family"], run["state_size"])
        if key not in best or _score(run) > _score(best[key]):
            best[key] = run
    return sorted(best.values(), key=lambda r: (r["family"], r["state_size"]))


def plot(experiment: str, runs: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    points = best_points(runs)
    titles = list(dict.fromkeys(t for r in points for t in panels(experiment, r)))
    curves = [r for r in points if r.get("loss_curve")]
    fig, axes = plt.subplots(1, len(titles) + bool(curves),
                             figsize=(4.5 * (len(titles) + bool(curves)), 3.6), squeeze=False)
    for ax, title in zip(axes[0], titles):
        for family in dict.fromkeys(r["family"] for r in points):
            mine = [r for r in points if r["family"] == family]
            ax.plot([r["state_size"] for r in mine],
                    [panels(experiment, r)[title] for r in mine], marker="o", label=family)
        ax.set_xscale("log")
        sizes = sorted({r["state_size"] for r in points})
        ax.set_xticks(sizes, [f"{size / 1000:.3g}k" for size in sizes], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())  # only the measured sizes
        ax.set_xlabel("state size (numbers per sequence)")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][len(titles) - 1].legend(fontsize=8)
    if curves:
        _plot_curves(axes[0][-1], curves)
    fig.suptitle(experiment.replace("_", " "))
    fig.tight_layout()
    path = out / f"{experiment}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_curves(ax, runs: list[dict]) -> None:
    """Training loss (on the answers) against step, one line per run: did it converge?"""
    for run in runs:
        steps, losses = zip(*run["loss_curve"])
        label = run["family"] + (f" d{run['hidden_size']}" if run["family"] == "transformer"
                                 else f" d{run['hidden_size']} f{run['feature_dim']}")
        ax.plot(steps, losses, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answers)")
    ax.set_title("learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def table(runs: list[dict]) -> str:
    """Markdown: one row per point, one accuracy column per test cell."""
    points = best_points(runs)
    names = list(dict.fromkeys(cell_name(c) for r in points for c in r["cells"]))
    lines = ["| model | d | f | state size | " + " | ".join(names) + " |",
             "|---" * (4 + len(names)) + "|"]
    for run in points:
        accuracy = {cell_name(c): c["accuracy"] for c in run["cells"]}
        lines.append(f"| {run['family']} | {run['hidden_size']} | "
                     f"{run['feature_dim'] if run['family'] != 'transformer' else '-'} | "
                     f"{run['state_size']:,} | "
                     + " | ".join(f"{accuracy[n]:.2f}" if n in accuracy else "" for n in names)
                     + " |")
    return "\n".join(lines)


def plot_lm_quality(runs: list[dict], out: Path) -> Path:
    """Per model, the loss after the prefix on fresh held-out text and on a repeat of the
    window's start: the gap between the two bars is what the model recalls from context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unscored = [run["preset"] for run in runs if "loss_repeat" not in run["valid"]]
    if unscored:
        raise SystemExit(f"lm_quality: {', '.join(unscored)} have no loss on a repeat (written "
                         "before it was measured); run the experiment again to score them")
    bars = {"fresh text": "loss_after_prefix", "a repeat of text read before": "loss_repeat"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(bars)
    for i, (label, key) in enumerate(bars.items()):
        xs = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(runs))]
        heights = [run["valid"][key] for run in runs]
        ax.bar(xs, heights, width, label=label)
        for x, height in zip(xs, heights):
            ax.annotate(f"{height:.2f}", (x, height), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(runs)), [run["preset"] for run in runs])
    ax.set_ylabel("held-out loss (nats), positions >= M")
    ax.set_title(f"LM quality at {runs[0]['tokens'] / 1e6:.0f}M tokens")
    ax.set_ylim(0, 1.3 * max(run["valid"][key] for run in runs for key in bars.values()))
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out / "lm_quality.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lm_quality_table(runs: list[dict]) -> str:
    lines = ["| model | loss on fresh text | loss on a repeat | recalled (nats) |",
             "|---|---|---|---|"]
    for run in runs:
        fresh, repeat = run["valid"]["loss_after_prefix"], run["valid"]["loss_repeat"]
        lines.append(f"| {run['preset']} | {fresh:.3f} | {repeat:.3f} | {fresh - repeat:+.3f} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _score(run: dict) -> float:
    return _mean([c["accuracy"] for c in run["cells"]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="sweep JSONs (any shards)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNGs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for experiment, runs in load_runs(args.results).items():
        if not runs:
            continue
        if experiment == "lm_quality":
            print(f"## {experiment}: {plot_lm_quality(runs, args.out)}\n\n"
                  f"{lm_quality_table(runs)}\n")
        else:
            print(f"## {experiment}: {plot(experiment, runs, args.out)}\n\n{table(runs)}\n")


if __name__ == "__main__":
    main()
