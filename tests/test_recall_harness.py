"""The document-recall harness: templates, truncation, scoring against a stub model with exact
expected numbers, input errors naming file and line, the shipped set, and `jrt-eval recall` end
to end with a real tiny model (the megatron checkpoint and its Hugging Face export agree)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_jrt.evals.recall import contains_answer, evaluate_recall
from megatron_jrt.evals.recall_data import RecallDataError, RecallDocument, read_documents
from megatron_jrt.evals.recall_prompts import render, truncate_context
from tests.multiproc import launch


class WordCodec:
    """Whitespace words as tokens: enough to test token budgets without a tokenizer."""

    def __init__(self):
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
            ids.append(self.words.index(word))
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.words[i] for i in ids)


EXTRACTION = RecallDocument(context="Version: 2.6.1\nMaintainer: APT Team.\n", query="version",
                            answers=("2.6.1",))
QA = RecallDocument(context="Paris is the capital of France. It lies on the Seine. ",
                    query="What is the capital of France?", answers=("Paris",),
                    cloze="The capital of France is")


def test_templates_are_the_authors():
    assert render(EXTRACTION, "default") == "Version: 2.6.1\nMaintainer: APT Team. Version:"
    assert render(EXTRACTION, "jrt") == (
        "Information about Version. Version: 2.6.1\nMaintainer: APT Team.\n"
        "Version: 2.6.1\nMaintainer: APT Team. Version:")
    assert render(QA, "default") == ("Paris is the capital of France. It lies on the Seine. "
                                     "The capital of France is")
    assert render(QA, "jrt") == (
        "What is the capital of France? Paris is the capital of France. It lies on the Seine.\n"
        "Paris is the capital of France. It lies on the Seine. The capital of France is")
    # a document that already ends with the question is not asked twice
    ends_with_key = RecallDocument("Size: 4 kB. size:", "size", ("4 kB",))
    assert render(ends_with_key, "default") == "Size: 4 kB. Size:"


def test_contexts_are_cut_to_the_budget_around_the_first_answer():
    codec = WordCodec()
    words = [f"w{i}" for i in range(40)]
    text = " ".join(words[:30] + ["ANSWER"] + words[30:])
    assert truncate_context(text, ["answer"], codec, None) == text
    assert truncate_context(text, ["answer"], codec, 100) == text
    cut = truncate_context(text, ["nowhere", "answer"], codec, 9).split()
    assert cut == words[26:30] + ["ANSWER"] + words[30:34]  # centred on the match
    assert truncate_context(text, ["missing"], codec, 5).split() == words[:5]
    tail = truncate_context(" ".join(words + ["ANSWER"]), ["answer"], codec, 4).split()
    assert tail == words[37:] + ["ANSWER"]  # clipped at the end, still 4 tokens


def test_scoring_is_a_literal_case_insensitive_search_with_the_best_answer():
    assert contains_answer(" version 2.6.1-3", ["2.6.1"]) == 1
    assert contains_answer("PARIS", ["paris"]) == 1
    assert contains_answer("2x6y1", ["2.6.1"]) == 0  # "." is not a wildcard
    assert contains_answer("Lyon", ["Paris", "lyon"]) == 1
    assert contains_answer("", ["Paris"]) == 0


def _planted_set(n: int = 6) -> list[RecallDocument]:
    return [RecallDocument(context=f"Item {i}. Colour: shade{i}. Weight: {i}0 kg.",
                           query="colour", answers=(f"shade{i}", f"SHADE-{i}")) for i in range(n)]


def _stub_generate(prompts: list[str]) -> list[str]:
    """Answers item i right under JRT-Prompt when i is even, under the default prompt when i is
    0 or 1; after a newline (which does not count) it names the colour of every item."""
    out = []
    for prompt in prompts:
        i = int(prompt.split("Item ")[1][0])
        jrt = prompt.startswith("Information about")
        right = (jrt and i % 2 == 0) or (not jrt and i < 2)
        answer = f" SHADE{i}" if right else " blue"
        out.append(answer + "\n" + " ".join(f"shade{j}" for j in range(6)))
    return out


def test_a_stub_model_scores_exactly_what_it_knows():
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return _stub_generate(prompts)

    results = evaluate_recall(_planted_set(), generate, WordCodec(), batch_size=4)
    assert results["default"].scores == [1, 1, 0, 0, 0, 0]
    assert results["jrt"].scores == [1, 0, 1, 0, 1, 0]
    assert results["default"].accuracy == pytest.approx(2 / 6)
    assert results["jrt"].accuracy == pytest.approx(3 / 6)
    assert results["jrt"].outputs[0] == " SHADE0"  # cut at the newline
    assert calls == [4, 2, 4, 2]  # batches of 4 per template
    only = evaluate_recall(_planted_set(), _stub_generate, WordCodec(), templates=["jrt"])
    assert list(only) == ["jrt"]


@pytest.mark.parametrize("line, message", [
    ("{not json", r":2: not JSON"),
    ("[1, 2]", r":2: expected a JSON object, got list"),
    ('{"key": "k", "answer": "a"}', r':2: no "context" \(or "text"\) field'),
    ('{"text": "t", "answer": "a"}', r':2: needs exactly one of "key"'),
    ('{"text": "t", "key": "k", "question": "q", "answer": "a"}', r':2: needs exactly one of'),
    ('{"text": "t", "key": "k"}', r':2: needs "answer"'),
    ('{"text": "t", "key": "k", "answers": []}', r':2: needs "answer"'),
    ('{"text": "t", "key": "k", "answer": ""}', r':2: needs "answer"'),
    ('{"text": "", "key": "k", "answer": "a"}', r':2: "text" must be a non-empty string'),
    ('{"text": "t", "key": "k", "cloze": "c", "answer": "a"}', r':2: "cloze" belongs to QA'),
])
def test_bad_jsonl_is_one_line_naming_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine", "key": "k", "answer": "a"}\n' + line + "\n")
    with pytest.raises(RecallDataError, match=message) as error:
        read_documents(path)
    assert str(error.value).startswith(f"{path}:2: ") and "\n" not in str(error.value)


def test_missing_or_empty_files_are_named(tmp_path):
    with pytest.raises(RecallDataError, match=r"nope.jsonl: cannot read the documents"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(RecallDataError, match=r"empty.jsonl: no documents"):
        read_documents(tmp_path / "empty.jsonl")


def test_field_aliases_and_qa_records(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"context": "c", "question": "q?", "answers": ["a", "b"]}) + "\n"
                    + json.dumps({"text": "t", "key": "k", "answer": "x"}) + "\n")
    qa, extraction = read_documents(path)
    assert (qa.is_qa, qa.cloze, qa.answers) == (True, "q?", ("a", "b"))
    assert (extraction.is_qa, extraction.context, extraction.answers) == (False, "t", ("x",))


def test_the_shipped_set_is_answerable_and_regenerates_deterministically():
    from data_prep.recall_set import SHIPPED_SET, build, parse_status

    documents = read_documents(SHIPPED_SET)
    assert len(documents) == 250 and SHIPPED_SET.stat().st_size < 300_000
    for document in documents:  # the answer is in the page, after its key
        page = document.context.lower()
        assert document.answers[0].lower() in page
        assert f"{document.query}: ".lower() in page
    status = ("Package: tool\nStatus: install ok installed\nVersion: 1.2-3\n"
              "Maintainer: Ann Example <ann@example.org>\nInstalled-Size: 1234\n"
              "Description: a tool\n does things.\n .\n More things.\n\n"
              "Package: other\nVersion: 9\nDescription: other thing\n")
    rows = build(status, 5, seed=0)
    assert rows == build(status, 5, seed=0) and len(rows) == 2 == len(parse_status(status))
    tool = next(r for r in rows if r["package"] == "tool")
    assert "Installed size: 1,234 kB" in tool["text"]
    assert "does things.\n\nMore things." in tool["text"]
    assert tool["answer"] in tool["text"] and tool["key"] in {"summary", "version", "maintainer",
                                                               "installed size"}


def test_the_shipped_set_is_this_machines_status_file_when_it_is_the_same():
    import hashlib

    from data_prep.recall_set import DEFAULT_STATUS, SHIPPED_SET, build

    recorded = (Path(SHIPPED_SET).parent / "RECALL_SET.md").read_text()
    if not DEFAULT_STATUS.is_file() or hashlib.sha256(
            DEFAULT_STATUS.read_bytes()).hexdigest() not in recorded:
        pytest.skip("this machine's dpkg status differs from the one the set was made from")
    rows = build(DEFAULT_STATUS.read_text(errors="replace"), 250, seed=0)
    assert "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) == \
        SHIPPED_SET.read_text(encoding="utf-8")


# ----------------------------------------------------------------- end to end, a real model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> dict:
    """A random jrt-tiny-shaped model over a SentencePiece vocabulary, as a Hugging Face
    directory (jrt-convert's layout, tokenizer.model beside it) and as a megatron checkpoint."""
    import shutil

    import torch

    pytest.importorskip("transformers")
    from checkpoints_tools.convert import from_hf
    from checkpoints_tools.hf_dir import write_hf_dir
    from data_prep.tokenizer import load_tokenizer
    from megatron_jrt.hf.configuration_jrt import JRTConfig
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM
    from tests.smalldata import small_corpus

    root = tmp_path_factory.mktemp("recall_model")
    _, tokenizer = small_corpus(root, documents=50, vocab_size=400)
    config = JRTConfig(vocab_size=load_tokenizer(str(tokenizer)).vocab_size, hidden_size=64,
                       num_layers=4, num_heads=4, layer_pattern="CPSC", prefix_length=16,
                       swa_window=8, max_sequence_length=64)
    torch.manual_seed(0)
    state = {name: (1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(tensor)
             for name, tensor in JRTForCausalLM(config).state_dict().items()
             if name != "lm_head.weight"}
    write_hf_dir(state, config, root / "hf")
    shutil.copy(tokenizer, root / "hf" / "tokenizer.model")
    return {"hf": root / "hf", "checkpoint": from_hf(root / "hf", root / "save_dir").parent,
            "tokenizer": tokenizer}


def _jrt_eval(argv: list[str]) -> int:
    from megatron_jrt.evals.cli import main

    return main(argv)


def test_jrt_eval_recall_end_to_end_on_a_checkpoint_and_its_hf_export(tiny_model, tmp_path,
                                                                       monkeypatch):
    from data_prep.recall_set import SHIPPED_SET

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(SHIPPED_SET.read_text().splitlines(keepends=True)[:2]))
    common = ["recall", "--data", str(data), "--max-context-tokens", "40", "--batch-size", "2"]
    megatron_args = [*common, "--model", str(tiny_model["checkpoint"]),
                     "--tokenizer", str(tiny_model["tokenizer"]),
                     "--json", str(tmp_path / "m.json"), "--predictions", str(tmp_path / "m.jsonl")]
    assert launch(_jrt_eval, 1, megatron_args, in_process=True)[0] == 0
    assert _jrt_eval([*common, "--model", str(tiny_model["hf"]), "--json", str(tmp_path / "h.json"),
                      "--predictions", str(tmp_path / "h.jsonl")]) == 0
    summaries = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "mh"]
    predictions = [[json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()]
                   for n in "mh"]
    for summary, rows in zip(summaries, predictions):
        assert summary["documents"] == 2 and set(summary["templates"]) == {"default", "jrt"}
        assert len(rows) == 4 and all("\n" not in r["output"] for r in rows)
        for name, row in summary["templates"].items():
            scores = [r["score"] for r in rows if r["template"] == name]
            assert row["correct"] == sum(scores)
            assert row["accuracy"] == pytest.approx(sum(scores) / 2)
    # two decoders, one set of weights: the recurrent megatron decoder and HF generate agree
    assert [r["output"] for r in predictions[0]] == [r["output"] for r in predictions[1]]
    assert any(r["output"].strip() for r in predictions[0])


def test_the_recurrent_decoder_stops_at_the_tokens_holding_a_newline(tiny_model):
    from data_prep.tokenizer import load_tokenizer
    from megatron_jrt.evals.recall_models import newline_ids

    codec = load_tokenizer(str(tiny_model["tokenizer"]))
    stops = newline_ids(codec)
    assert stops and all("\n" in codec.decode([i]) for i in stops)
    assert set(codec.encode("Name: zlib\nVersion: 1")) & stops
    assert not set(codec.encode("Name: zlib Version: 1")) & stops


def test_jrt_eval_recall_bad_data_is_one_line_exit_2(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "t", "key": "k", "answer": "a"}\n{"text": "t"}\n')
    assert _jrt_eval(["recall", "--model", str(tmp_path / "none"), "--data", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jrt-eval: error: {data}:2: ") and "\n" not in err
