"""jrt-generate from a megatron_jrt checkpoint (megatron_jrt/generate_cli.py): the HF model built
in memory from the checkpoint, with the tokenizer its run recorded or --tokenizer.

A random tiny model over a SentencePiece vocabulary is written as a model-only checkpoint
(jrt-convert from-hf) whose checkpoint.json records the tokenizer as a training run does; its
greedy completions must equal those of `jrt-convert to-hf` of the same checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.hf_tiny import run_cli, tiny_model

pytest.importorskip("transformers")


def _record_tokenizer(checkpoint: Path, spec: str) -> None:
    """Make checkpoint.json say what a training run with data.tokenizer=`spec` says."""
    from megatron_jrt.checkpoint.store import read_metadata, write_metadata

    body = read_metadata(checkpoint)
    body["config"]["train"] = {"data": {"tokenizer": spec}}
    write_metadata(checkpoint, body)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    from tests.smalldata import small_corpus

    return small_corpus(tmp_path_factory.mktemp("tokenizer"), documents=50, vocab_size=400)[1]


@pytest.fixture(scope="module")
def random_hf(tokenizer_file, tmp_path_factory) -> Path:
    from data_prep.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("random") / "hf"
    tiny_model(vocab_size=load_tokenizer(str(tokenizer_file)).vocab_size).save_pretrained(out)
    return out


def _checkpoint(random_hf: Path, save_dir: Path, tokenizer: str | None) -> Path:
    """A save_dir holding the random model's checkpoint, its run's tokenizer `tokenizer`."""
    from checkpoints_tools.convert import from_hf

    checkpoint = from_hf(random_hf, save_dir)
    if tokenizer is not None:
        _record_tokenizer(checkpoint, tokenizer)
    return save_dir


@pytest.fixture(scope="module")
def save_dir(random_hf, tokenizer_file, tmp_path_factory) -> Path:
    return _checkpoint(random_hf, tmp_path_factory.mktemp("run") / "ckpt", str(tokenizer_file))


@pytest.fixture
def generated_ids(monkeypatch) -> list:
    """Fills with (prompt ids, new ids) of every prompt jrt-generate runs."""
    from megatron_jrt import generate_cli

    seen, generate_batch = [], generate_cli.generate_batch

    def recording(model, codec, prompts, args):
        completions = generate_batch(model, codec, prompts, args)
        seen.extend(zip(prompts, completions))
        return completions

    monkeypatch.setattr(generate_cli, "generate_batch", recording)
    return seen


def test_checkpoint_completions_equal_those_of_its_to_hf_directory(save_dir, tmp_path,
                                                                   generated_ids):
    """The same prompt ids and greedy ids both ways. The texts may differ where the ids are
    invalid UTF-8 (a random model's byte pieces): SentencePiece decodes each bad byte, the HF
    tokenizer's byte fallback a whole run of them, to U+FFFD."""
    from checkpoints_tools.convert import main as convert

    from_checkpoint = run_cli(save_dir, tmp_path)  # a save_dir: its newest checkpoint
    assert convert(["to-hf", str(save_dir), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the run's tokenizer, converted
    ids_from_checkpoint = generated_ids[:]
    generated_ids.clear()
    from_hf_dir = run_cli(tmp_path / "hf", tmp_path)
    assert ids_from_checkpoint == generated_ids
    assert [r["prompt"] for r in from_checkpoint] == [r["prompt"] for r in from_hf_dir]
    assert sum(len(new_ids) for _, new_ids in generated_ids) > len(generated_ids)
    assert run_cli(save_dir / "step_0000000", tmp_path) == from_checkpoint  # the step itself


def test_tokenizer_option_replaces_a_missing_run_tokenizer(random_hf, save_dir, tokenizer_file,
                                                           tmp_path):
    unrecorded = _checkpoint(random_hf, tmp_path / "none", None)
    assert (run_cli(unrecorded, tmp_path, "--tokenizer", str(tokenizer_file))
            == run_cli(save_dir, tmp_path))


@pytest.mark.parametrize("problem", ["none recorded", "recorded but absent", "not a checkpoint",
                                     "bad --tokenizer"])
def test_checkpoint_errors_are_one_line_naming_the_fix(problem, random_hf, tokenizer_file,
                                                       tmp_path, capsys):
    from megatron_jrt.generate_cli import main

    absent = str(tmp_path / "gone" / "tok.model")
    model, option, expected = {
        "none recorded": (_checkpoint(random_hf, tmp_path / "a", None), [],
                          "recorded no data.tokenizer"),
        "recorded but absent": (_checkpoint(random_hf, tmp_path / "b", absent), [],
                                f"{absent} is not on this machine"),
        "not a checkpoint": (shutil.copytree(tokenizer_file.parent, tmp_path / "c"), [],
                             "no Hugging Face JRT directory (no config.json) and no checkpoint"),
        "bad --tokenizer": (_checkpoint(random_hf, tmp_path / "d", None), ["--tokenizer", absent],
                            f"--tokenizer {absent}"),
    }[problem]
    assert main([str(model), "--prompt", "Hi", *option]) == 2
    error = capsys.readouterr().err
    assert error.startswith("jrt-generate: error:") and error.count("\n") == 1, error
    assert expected in error
    if problem != "not a checkpoint":
        assert "--tokenizer" in error
