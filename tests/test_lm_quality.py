"""The LM-quality experiment (docs/RESULTS.md section 4): its corpus from local files, and its
--tiny version end to end (corpus -> jrt-prep -> three families trained -> scores), on CPU."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from megatron_jrt.config import preset
from megatron_jrt.evals.experiments import lm_corpus, lm_quality
from tests.multiproc import launch

REPO = Path(__file__).resolve().parent.parent


def _tree(root: Path) -> None:
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__pycache__").mkdir()
    (root / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (root / "pkg" / "sub" / "copy_of_a.py").write_text("def a():\n    return 1\n")  # a duplicate
    (root / "pkg" / "README.md").write_text("# pkg\n\nDocs.\n")
    (root / "pkg" / "notes.rst").write_text("Notes\n=====\n")
    (root / "pkg" / "empty.txt").write_text("  \n")
    (root / "pkg" / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8
    (root / "pkg" / "data.json").write_text('{"not": "a document"}')
    (root / "pkg" / "big.txt").write_text("x" * (lm_corpus.MAX_FILE_BYTES + 1))
    (root / "pkg" / "RECALL_SET.md").write_text("the recall set's description\n")
    (root / "pkg" / "__pycache__" / "cached.py").write_text("x = 1\n")


def test_corpus_documents_are_deduplicated_filtered_and_in_content_hash_order(tmp_path):
    _tree(tmp_path)
    documents = lm_corpus.collect_documents([str(tmp_path)], max_bytes=1 << 20)
    assert sorted(text for _, text in documents) == sorted(
        ["def a():\n    return 1\n", "# pkg\n\nDocs.\n", "Notes\n=====\n"])
    assert [digest for digest, _ in documents] == sorted(digest for digest, _ in documents)
    assert documents == lm_corpus.collect_documents([str(tmp_path)], max_bytes=1 << 20)
    # the cap stops reading once reached (in the path-hash order, the same every time)
    capped = lm_corpus.collect_documents([str(tmp_path)], max_bytes=1)
    assert len(capped) == 1 and capped == lm_corpus.collect_documents([str(tmp_path)], 1)
    # /usr/share/doc holds the pages the recall set was made from
    with pytest.raises(SystemExit, match="/usr/share/doc"):
        lm_corpus.candidate_files(["/usr/share/doc"], lm_corpus.SUFFIXES)
    assert lm_corpus._excluded(Path("/usr/share/doc/bash/README"))
    assert not any(lm_corpus._excluded(Path(d)) for d in lm_corpus.default_corpus_dirs())


def test_125m_presets_and_configs_are_one_size_and_the_experiments_recipe():
    jrt, based, transformer = (preset(f"{f}-125m") for f in ("jrt", "based", "transformer"))
    for model in (based, transformer):
        assert (model.hidden_size, model.num_layers, model.num_heads, model.vocab_size) == (
            jrt.hidden_size, jrt.num_layers, jrt.num_heads, jrt.vocab_size)
        assert model.prefix_length == 0
    assert (jrt.hidden_size, jrt.num_layers, jrt.layer_pattern) == (768, 16, "CPSCCCPSCCCPSCCC")
    assert based.layer_pattern == jrt.layer_pattern and set(transformer.layer_pattern) == {"A"}
    gpu = lm_quality.GPU
    for family in ("jrt", "based", "transformer"):
        config = yaml.safe_load((REPO / "configs" / f"{family}-125m.yaml").read_text())
        assert config["model"]["preset"] == f"{family}-125m"
        assert (config["data"]["seq_length"], config["data"]["micro_batch_size"],
                config["data"]["global_batch_size"], config["training"]["train_steps"],
                config["optimizer"]["lr"], config["optimizer"]["warmup_steps"]) == (
            gpu.seq_length, gpu.micro_batch_size, gpu.global_batch_size, gpu.steps, gpu.lr,
            int(gpu.steps * gpu.warmup_fraction))


def test_a_repeat_window_holds_at_each_scored_position_what_it_held_a_prefix_earlier():
    import torch

    tokens = torch.arange(2 * 11).reshape(2, 11)  # two windows of L + 1 = 11 tokens
    for after in (3, 5, 9):
        inputs, labels = lm_quality.repeated_windows(tokens, after)
        assert inputs.shape == labels.shape == (2, 10)
        assert torch.equal(inputs[:, :after], tokens[:, :after])  # the first read, unchanged
        assert torch.equal(labels[:, :after - 1], tokens[:, 1:after])
        assert torch.equal(labels[:, :-1], inputs[:, 1:])  # one stream
        later = torch.arange(after, 10)
        assert torch.equal(inputs[:, later], inputs[:, later - after])  # then the same again
        assert torch.equal(labels[:, later], labels[:, later - after])
    with pytest.raises(ValueError, match="prefix 10 of 10"):
        lm_quality.repeated_windows(tokens, 10)


def _stdlib_dir() -> str:
    return lm_corpus.default_corpus_dirs()[0]


def test_tiny_end_to_end_then_a_rerun_reuses_corpus_and_checkpoint(tmp_path, capsys):
    out, work = tmp_path / "lm.json", tmp_path / "work"
    argv = ["--tiny", "--out", str(out), "--work-dir", str(work), "--workers", "1"]
    launch(lm_quality.main, 1, argv, in_process=True)
    data = json.loads(out.read_text())
    printed = capsys.readouterr().out
    runs = data["runs"]
    assert [r["preset"] for r in runs] == ["jrt-tiny", "based-tiny", "transformer-tiny"]
    assert [r["prefix_length"] for r in runs] == [16, 0, 0]
    assert len({r["tokens"] for r in runs}) == 1 and runs[0]["tokens"] == lm_quality.TINY.tokens
    assert len({r["vocab_size"] for r in runs}) == 1
    corpus = data["corpus"]
    assert corpus["settings"]["dirs"] == [_stdlib_dir()]
    assert 250_000 <= corpus["text_bytes"] <= 400_000 and corpus["valid_tokens"] > 0
    for row in runs:
        valid = row["valid"]
        assert valid["positions_from"] == 16 and valid["windows"] == lm_quality.TINY.eval_windows
        assert 0 < valid["loss_after_prefix"] < math.log(row["vocab_size"]) + 1
        assert (valid["loss_all"] is None) == (row["family"] == "jrt")  # JRT's prefix sees ahead
        assert 0 < valid["loss_repeat"] < math.log(row["vocab_size"]) + 1
        assert row["recall"]["documents"] == 3
        assert all(0 <= row["recall"][t]["accuracy"] <= 1 for t in ("default", "jrt"))
        assert row["trainer_validation"][-1]["step"] == row["steps"]
        assert Path(row["checkpoint"]).is_dir() and row["tokens_per_second"] > 0
    # a line per model, then the table; the training logs went to files
    assert "model.preset" not in printed and "| jrt-tiny | 223,168 | 4,096 |" in printed
    assert printed.count("\n| ") == 4 and len(list((tmp_path / "lm-logs").glob("*.log"))) == 3
    pytest.importorskip("matplotlib")
    from megatron_jrt.evals.experiments import plot

    plot.main([str(out), "--out", str(tmp_path)])
    assert (tmp_path / "lm_quality.png").stat().st_size > 10_000
    assert capsys.readouterr().out.count("\n| ") == 4
    older = json.loads(out.read_text())  # a JSON from before the repeat was scored
    del older["runs"][1]["valid"]["loss_repeat"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="based-tiny have no loss on a repeat"):
        plot.main([str(tmp_path / "older.json"), "--out", str(tmp_path)])

    # again for one family: the corpus is reused, the finished run trains nothing more,
    # its row is replaced (with the same numbers) and the others are kept
    launch(lm_quality.main, 1, [*argv, "--families", "based"], in_process=True)
    assert "corpus: reusing" in capsys.readouterr().out
    again = json.loads(out.read_text())["runs"]
    assert [r["preset"] for r in again] == [r["preset"] for r in runs]
    assert again[1]["valid"] == runs[1]["valid"] and again[1]["recall"]["default"] == \
        runs[1]["recall"]["default"]
    assert again[1]["tokens_per_second"] == runs[1]["tokens_per_second"]
    assert "resumed from" in (tmp_path / "lm-logs" / "based.log").read_text()
    assert again[0] == runs[0] and again[2] == runs[2]


def test_a_run_cut_while_scoring_keeps_what_its_training_measured(tmp_path, monkeypatch):
    out, work = tmp_path / "lm.json", tmp_path / "work"
    argv = ["--tiny", "--families", "based", "--out", str(out), "--work-dir", str(work),
            "--workers", "1"]

    def cut(*args, **kwargs):
        raise KeyboardInterrupt("a time limit, while scoring")

    with monkeypatch.context() as patch:
        patch.setattr(lm_quality, "validation_loss", cut)
        with pytest.raises(KeyboardInterrupt):
            launch(lm_quality.main, 1, argv, in_process=True)
    launch(lm_quality.main, 1, argv, in_process=True)  # finds the run trained: scores it only
    row = json.loads(out.read_text())["runs"][0]
    assert row["tokens_per_second"] > 0 and row["train_seconds"] > 0
    assert row["trainer_validation"][-1]["step"] == row["steps"] and row["resumed_at_step"] is None
