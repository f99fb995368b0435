"""`jrt-eval`: recall of a trained model, on synthetic tasks or on documents.

    jrt-eval synthetic --model runs/sd/ckpt [--cells 4x16,16x4,4x256] [--json out.json]
    jrt-eval recall --model CKPT_OR_HF_DIR [--data docs.jsonl] [--template jrt default]

synthetic: the task the checkpoint was trained on (its data.synthetic; --task replaces it),
accuracy per cell on the test stream; cells are |A|x|B| for set disjointness, seq_len x kv
pairs for MQAR (default: the training cells). recall: the document-recall harness
(megatron_jrt.evals.recall) on a JSONL file, by default the shipped Debian package set.
Results print as a table; --json writes them to a file ("-": stdout instead of the table).
Errors are one line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from megatron_jrt.evals.recall_prompts import TEMPLATES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jrt-eval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    synthetic = commands.add_parser("synthetic", help="accuracy per cell on a synthetic task")
    synthetic.add_argument("--model", required=True,
                           help="a checkpoint, or a save_dir (its newest complete checkpoint)")
    synthetic.add_argument("--task", type=_mapping, metavar="YAML",
                           help="the task instead of the run's data.synthetic, e.g. "
                                "'{task: mqar, vocab_size: 8192, kv_pairs: [4], jrt_prompt: true}'")
    synthetic.add_argument("--seq-length", type=_positive,
                           help="the task's window (default: the run's data.seq_length)")
    synthetic.add_argument("--cells", type=_cells, metavar="AxB,...",
                           help="test cells: |A|x|B| (set disjointness) or seq_len x kv "
                                "(MQAR), e.g. 4x256,256x4; default: the training cells")
    synthetic.add_argument("--examples", type=_positive, default=1000, help="per cell")
    synthetic.add_argument("--batch-size", type=_positive, default=64)
    synthetic.add_argument("--seed", type=int, default=0, help="of the test stream")
    synthetic.add_argument("--json", metavar="PATH", help='write the results here ("-": stdout)')

    recall = commands.add_parser("recall", help="document recall, default vs JRT-Prompt")
    recall.add_argument("--model", required=True,
                        help="a megatron_jrt checkpoint or save_dir, or a Hugging Face directory")
    recall.add_argument("--data", type=Path, default=None,
                        help="JSONL documents {context|text, key|question, answer|answers"
                             "[, cloze]}; default: the shipped Debian package set")
    recall.add_argument("--template", nargs="+", choices=TEMPLATES, default=list(TEMPLATES))
    recall.add_argument("--max-context-tokens", type=_positive, default=None,
                        help="cut each context to this many tokens around the answer")
    recall.add_argument("--limit", type=_positive, default=None, help="the first N documents")
    recall.add_argument("--tokenizer", help="for a checkpoint whose run has no data.tokenizer")
    recall.add_argument("--batch-size", type=_positive, default=8, help="Hugging Face models")
    recall.add_argument("--device", default=None, help="Hugging Face models (default: cuda if any)")
    recall.add_argument("--predictions", type=Path, help="write every output here (JSONL)")
    recall.add_argument("--json", metavar="PATH", help='write the summary here ("-": stdout)')
    return parser.parse_args(argv)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _mapping(text: str) -> dict:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping like '{{task: mqar}}', "
                                         f"got {text!r}")
    return value


def _cells(text: str) -> list[tuple[int, int]]:
    cells = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r} is not a cell like 4x16")
        cells.append((int(parts[0]), int(parts[1])))
    return cells


# ------------------------------------------------------------------------------ synthetic

def synthetic_results(args: argparse.Namespace) -> dict:
    """Load the checkpoint, evaluate every cell, return the results as one JSON-able dict."""
    from megatron_jrt.evals.state_size import state_size
    from megatron_jrt.evals.synthetic_eval import evaluate_cells
    from megatron_jrt.evals.tasks import build_task
    from megatron_jrt.evals.trained_model import load_trained_model

    trained = load_trained_model(args.model)
    data = trained.train_config.get("data", {})
    params = args.task or data.get("synthetic")
    if not params:
        raise ValueError(f"--model {args.model}: its run was not trained on a synthetic task "
                         "(no data.synthetic); give --task")
    task = build_task(params, args.seq_length or int(data.get("seq_length", 0)),
                      key="--task" if args.task else "data.synthetic")
    cells = args.cells or task.cells()
    results = evaluate_cells(trained, task, cells, examples=args.examples,
                             batch_size=args.batch_size, seed=args.seed)
    rows = [{**task.describe(r.cell), "accuracy": r.accuracy, "correct": r.correct,
             "answers": r.answers} for r in results]
    return {"model": str(trained.path), "task": {"task": task.name, **params},
            "layer_pattern": trained.config.layer_pattern,
            "prefix_length": trained.config.prefix_length,
            "hidden_size": trained.config.hidden_size, "feature_dim": trained.config.feature_dim,
            "state_size": state_size(trained.config, task.seq_length),
            "seq_length": task.seq_length, "cells": rows,
            "mean_accuracy": sum(r["accuracy"] for r in rows) / len(rows)}


def format_synthetic(results: dict) -> str:
    columns = [k for k in results["cells"][0] if k not in ("correct",)]
    lines = [f"{results['task']['task']}: {results['model']} (layers {results['layer_pattern']}, "
             f"prefix {results['prefix_length']}, state size {results['state_size']:,})",
             "  ".join(f"{c:>11}" for c in columns)]
    for row in results["cells"]:
        lines.append("  ".join(f"{row[c]:>11.3f}" if isinstance(row[c], float) else
                               f"{row[c]:>11}" for c in columns))
    lines.append(f"mean accuracy over {len(results['cells'])} cells: "
                 f"{results['mean_accuracy']:.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- recall

def recall_documents(args: argparse.Namespace) -> list:
    """--data's documents (the shipped set by default), the first --limit of them."""
    from data_prep.recall_set import SHIPPED_SET
    from megatron_jrt.evals.recall_data import read_documents

    return read_documents(args.data or SHIPPED_SET)[:args.limit]


def recall_results(args: argparse.Namespace, documents: list) -> dict:
    """Run the model on every template of `documents`, return the summary dict."""
    from data_prep.recall_set import SHIPPED_SET
    from megatron_jrt.evals.recall import evaluate_recall
    from megatron_jrt.evals.recall_models import (default_device, hf_generator, is_hf_directory,
                                                  megatron_generator)

    if is_hf_directory(args.model):
        codec, generate = hf_generator(args.model, args.device or default_device())
    else:
        codec, generate = megatron_generator(args.model, args.tokenizer)
    results = evaluate_recall(documents, generate, codec, templates=args.template,
                              max_context_tokens=args.max_context_tokens,
                              batch_size=args.batch_size)
    if args.predictions:
        with open(args.predictions, "w", encoding="utf-8") as out:
            for name, result in results.items():
                for index, (output, score) in enumerate(zip(result.outputs, result.scores)):
                    out.write(json.dumps({"template": name, "document": index, "output": output,
                                          "answers": documents[index].answers,
                                          "score": score}) + "\n")
    return {"model": str(args.model), "data": str(args.data or SHIPPED_SET),
            "documents": len(documents),
            "max_context_tokens": args.max_context_tokens,
            "templates": {name: {"accuracy": r.accuracy, "correct": sum(r.scores),
                                 "documents": len(r.scores)} for name, r in results.items()}}


def format_recall(summary: dict) -> str:
    lines = [f"recall: {summary['documents']} documents from {summary['data']}, "
             f"model {summary['model']}", f"{'template':<10}{'accuracy':>10}{'correct':>12}"]
    for name, row in summary["templates"].items():
        lines.append(f"{name:<10}{row['accuracy']:>10.3f}"
                     f"{str(row['correct']) + '/' + str(row['documents']):>12}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main

def run(args: argparse.Namespace) -> dict:
    """The command's results; megatron checkpoints are read in a one-rank process group."""
    from megatron_jrt.evals.recall_models import is_hf_directory

    documents = recall_documents(args) if args.command == "recall" else None  # errors first
    if args.command == "recall" and is_hf_directory(args.model):
        return recall_results(args, documents)
    from megatron_jrt.distributed import destroy_distributed, init_distributed

    init_distributed()
    try:
        if args.command == "synthetic":
            return synthetic_results(args)
        return recall_results(args, documents)
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> int:
    try:  # a Ctrl-C, also during the imports (torch, megatron: seconds), is one line; nothing is written
        from megatron_jrt.checkpoint import CheckpointError
        from megatron_jrt.quiet import silence_megatron_noise

        silence_megatron_noise()
        args = parse_args(argv)
        try:
            results = run(args)
        except (ValueError, OSError, CheckpointError) as exc:  # ConfigError, RecallDataError too
            print(f"jrt-eval: error: {exc}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("jrt-eval: interrupted (SIGINT); nothing was written", file=sys.stderr)
        return 130
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(format_synthetic(results) if args.command == "synthetic" else format_recall(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
