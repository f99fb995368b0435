"""`jrt-prep` as a user runs it: interrupting `shards` (Ctrl-C, SIGTERM, a killed worker) never hangs and
publishes nothing partial; --split-text; option checks; SentencePiece errors in jrt-prep's terms; help texts.

The interrupt tests run `python -m data_prep.cli shards` in its own session, like a terminal job, and find
every process the run started by a marker in their environment (inherited by all of them).
"""
import argparse
import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import build_parser
from data_prep.cli import main as cli_main
from data_prep.corpus import bundled_corpus_paths
from data_prep.documents import iter_all_documents, iter_documents
from data_prep.layout import SHARD_RE
from data_prep.reader import read_shard
from data_prep.tokenizer import load_tokenizer, train_sentencepiece
from tests.test_data_prep import _small_corpus

REPO = Path(__file__).resolve().parents[1]
MARKER = "JRT_PREP_TEST_RUN"
EXIT_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    corpus = _small_corpus(tmp_path_factory.mktemp("corpus"))
    out = tmp_path_factory.mktemp("tok") / "tok.model"
    train_sentencepiece(iter_all_documents([corpus]), out, vocab_size=1000)
    return out


def _run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of `jrt-prep ARGV` run in this process."""
    rc = cli_main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _one_error_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jrt-prep {command}: error: "), err
    return lines[0]


# ---------------------------------------------------------------- interrupting `jrt-prep shards`

@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """The bundled corpus twice (1752 documents, ~6M tokens with the test tokenizer): a run takes ~3 s on
    2 cores, its first half imports and start-up."""
    out = tmp_path_factory.mktemp("big") / "twice.jsonl.gz"
    out.write_bytes(bundled_corpus_paths()[0].read_bytes() * 2)  # two gzip members read as one stream
    return out


def _shards_argv(out: Path, corpus: Path, tok: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep.cli", "shards", "--input", str(corpus), "--tokenizer", str(tok),
            "--out", str(out), "--workers", "2", "--shard-size", "150k", "--valid-fraction", "0.02",
            "--valid-shards", "2", "--no-progress"]


def _start_shards(out: Path, corpus: Path, tok: Path, marker: str, log: Path, wrapper: tuple = ()) -> subprocess.Popen:
    """`jrt-prep shards` in a session of its own, stderr to `log`; `wrapper` runs it through e.g. a shell."""
    with open(log, "w") as err:
        return subprocess.Popen([*wrapper, *_shards_argv(out, corpus, tok)], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True, env={**os.environ, MARKER: marker})


def _live_processes(marker: str) -> list[int]:
    """Pids of live (not zombie) processes that carry `marker`: the run and everything it started."""
    tag, pids = f"{MARKER}={marker}".encode(), []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and tag in (d / "environ").read_bytes().split(b"\0") \
                    and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(d.name))
        except OSError:  # gone meanwhile, or not ours
            pass
    return pids


def _wait_all_gone(marker: str, timeout: float = EXIT_TIMEOUT_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _live_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _finish(proc: subprocess.Popen, marker: str, log: Path) -> tuple[int, float, str]:
    """(exit code, seconds until exit, stderr); a run that does not exit in time is killed and fails the test."""
    t0 = time.monotonic()
    try:
        rc = proc.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in _live_processes(marker):
            os.kill(pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"jrt-prep shards did not exit within {EXIT_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")
    seconds = time.monotonic() - t0
    left = _wait_all_gone(marker)
    assert not left, f"processes of the run still alive after it exited: {left}"
    return rc, seconds, log.read_text()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, big_corpus, tok_path):
    """An uninterrupted run: its shards (in the order they are written), how long it took, and when its
    first shard appeared (imports and worker start-up come before)."""
    root = tmp_path_factory.mktemp("reference")
    t0, first_shard_s = time.monotonic(), None
    proc = _start_shards(root / "out", big_corpus, tok_path, "reference", root / "err.txt")
    while proc.poll() is None:
        if first_shard_s is None and (root / "out" / "train-000000.tar").exists():
            first_shard_s = time.monotonic() - t0
        time.sleep(0.01)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, (root / "err.txt").read_text()
    assert first_shard_s < 0.7 * seconds, (first_shard_s, seconds)  # leaves a window to stop runs in
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    order = [e["file"] for split in ("train", "valid") for e in manifest["splits"][split]]
    assert manifest["documents"] == 2 * 876 and len(manifest["splits"]["valid"]) == 2
    return {"dir": root / "out", "corpus": big_corpus, "order": order, "seconds": seconds,
            "first_shard_s": first_shard_s}


def _assert_nothing_partial(out: Path, reference: dict, err: str | None) -> None:
    """What an interrupted run may leave in a folder that was empty before it.

    shards.py writes each shard under a temporary name and renames it once complete; manifest.json
    comes last and is what makes a folder a finished run. "Nothing partial published" means:
    - no manifest.json, so the folder reads as unfinished (the reader refuses it);
    - no temporary file left: the shard being written when the signal came is deleted;
    - the shard files (train-NNNNNN.tar, valid-NNNNNN.tar) are a prefix of the shards an uninterrupted
      run writes, in the order it writes them (train, then valid), each byte-identical to that run's
      file of the same name, i.e. complete;
    - the message (when `err` is given) names the last of them: "nothing published past FILE", or
      "nothing published" when there is none.
    """
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    assert "manifest.json" not in names
    assert [n for n in names if not SHARD_RE.match(n)] == [], f"temporary or unknown files left: {names}"
    assert names == reference["order"][:len(names)], f"not a prefix of the uninterrupted run's shards: {names}"
    for n in names:
        assert (out / n).read_bytes() == (reference["dir"] / n).read_bytes(), f"{n} differs from a complete run's"
    if err is not None:
        m = re.search(r"nothing published(?: past (\S+\.tar))?", err)
        assert m, err
        assert m.group(1) == (names[-1] if names else None), (names, err)


def _assert_interrupted(rc: int, seconds: float, err: str, signum: int) -> None:
    assert seconds < EXIT_TIMEOUT_S
    assert rc == 128 + signum, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"jrt-prep shards: interrupted ({signal.Signals(signum).name})"), err


@pytest.mark.slow
def test_shards_interrupted_20_times_never_hangs_and_publishes_nothing_partial(tmp_path, tok_path, reference_run):
    """SIGINT at 20 random moments (fixed seed), to the whole process group as a terminal's Ctrl-C does,
    or to the main process only as `kill -INT` does: a third of them during start-up (imports, workers
    starting), the others while shards are being published. Measured on the uninterrupted run, so that a
    faster or slower machine still stops runs in both phases."""
    rng = random.Random(20_2611)
    # publishing-phase signals up to its midpoint: a run that happens to be faster than the
    # reference (the reference may have shared the cores) is still running when its signal comes
    start_up = reference_run["first_shard_s"]
    end = start_up + 0.5 * (reference_run["seconds"] - start_up)
    delays = [rng.uniform(0.1, start_up) if k % 3 == 0 else rng.uniform(start_up, end) for k in range(20)]
    stopped_while_publishing = finished_early = 0
    for k, delay in enumerate(delays):
        out, log, marker = tmp_path / f"run{k}", tmp_path / f"err{k}.txt", f"sigint-{k}"
        proc = _start_shards(out, reference_run["corpus"], tok_path, marker, log)
        time.sleep(delay)
        if proc.poll() is not None:  # faster than the reference run (which shared the cores)
            finished_early += 1
            continue
        (os.killpg if k % 2 == 0 else os.kill)(proc.pid, signal.SIGINT)
        rc, seconds, err = _finish(proc, marker, log)
        if rc in (0, -signal.SIGINT) and " docs/s, " in err:
            # the run had finished and printed its summary; the signal came during Python's own
            # exit, after jrt-prep's handler was gone (CPython then ends by SIGINT): complete
            finished_early += 1
            assert sorted(p.name for p in out.iterdir()) == sorted(
                p.name for p in reference_run["dir"].iterdir()), err
            continue
        _assert_interrupted(rc, seconds, err, signal.SIGINT)
        _assert_nothing_partial(out, reference_run, err)
        stopped_while_publishing += out.is_dir() and any(out.iterdir())
    assert finished_early <= 5, f"{finished_early} of 20 runs finished before their signal; use a larger corpus"
    assert stopped_while_publishing >= 5, "too few runs stopped after their first shard: the test lost its aim"


def test_shards_sigterm_publishes_nothing_partial(tmp_path, tok_path, reference_run):
    for k, fraction in enumerate([0.3, 0.6]):
        out, log, marker = tmp_path / f"run{k}", tmp_path / f"err{k}.txt", f"sigterm-{k}"
        proc = _start_shards(out, reference_run["corpus"], tok_path, marker, log)
        time.sleep(fraction * reference_run["seconds"])
        (os.killpg if k % 2 == 0 else os.kill)(proc.pid, signal.SIGTERM)
        rc, seconds, err = _finish(proc, marker, log)
        _assert_interrupted(rc, seconds, err, signal.SIGTERM)
        _assert_nothing_partial(out, reference_run, err)


def test_shards_started_ignoring_sigint_keeps_ignoring_it(tmp_path, tok_path, reference_run):
    """A background job of a script (`cmd &`), or one under nohup, starts with SIGINT ignored, and
    jrt-prep leaves it so: the run finishes as if the signal had not come."""
    out, log, marker = tmp_path / "out", tmp_path / "err.txt", "ignoring-sigint"
    ignoring_sigint = ("sh", "-c", 'trap "" INT; exec "$0" "$@"')
    proc = _start_shards(out, reference_run["corpus"], tok_path, marker, log, wrapper=ignoring_sigint)
    time.sleep(0.6 * reference_run["seconds"])
    os.killpg(proc.pid, signal.SIGINT)
    rc, _, err = _finish(proc, marker, log)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_run["dir"].iterdir())


def test_shards_killed_worker_is_an_error_not_a_hang(tmp_path, tok_path, reference_run):
    """SIGKILL (e.g. the OOM killer) on every process the run started: a one-line error, promptly."""
    out, log, marker = tmp_path / "out", tmp_path / "err.txt", "killed-worker"
    proc = _start_shards(out, reference_run["corpus"], tok_path, marker, log)
    deadline = time.monotonic() + 60
    while not (out / "train-000000.tar").exists():  # tokenising for sure
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    helpers = [pid for pid in _live_processes(marker) if pid != proc.pid]
    assert helpers
    for pid in helpers:
        os.kill(pid, signal.SIGKILL)
    rc, _, err = _finish(proc, marker, log)
    assert rc == 2 and "worker" in _one_error_line(err, "shards"), err
    _assert_nothing_partial(out, reference_run, None)


def test_rerun_after_interrupt_finishes_the_folder(tmp_path, tok_path, reference_run):
    """A folder left by an interrupted run (complete shards, no manifest) is finished by running again,
    without --overwrite, and ends up byte-identical to an uninterrupted run."""
    out, log, marker = tmp_path / "out", tmp_path / "err.txt", "rerun"
    proc = _start_shards(out, reference_run["corpus"], tok_path, marker, log)
    while not (out / "train-000001.tar").exists() and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGINT)
    _finish(proc, marker, log)
    rc, _, err = _finish(_start_shards(out, reference_run["corpus"], tok_path, "rerun-2", log), "rerun-2", log)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_run["dir"].iterdir())
    for p in out.iterdir():
        assert p.read_bytes() == (reference_run["dir"] / p.name).read_bytes()


def test_overwrite_removes_the_old_runs_shards_first(tmp_path, tok_path, capsys):
    """--overwrite deletes the old manifest at once, so the old shards are unusable from then on: they go
    too, and a run that stops early leaves none of them mixed with its own."""
    corpus = _small_corpus(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["shards", "--input", str(corpus), "--tokenizer", str(tok_path), "--out", str(out),
                     "--shard-size", "5k", "--valid-fraction", "0", "--workers", "1", "--no-progress"]) == 0
    assert len(list(out.glob("train-*.tar"))) > 3
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')  # fails after the first document
    rc, err = _run_cli(capsys, "shards", "--input", corpus, tmp_path / "bad.jsonl", "--tokenizer", tok_path,
                       "--out", out, "--shard-size", "1G", "--valid-fraction", "0", "--workers", "1",
                       "--overwrite", "--no-progress")
    assert rc == 2 and "bad.jsonl:1" in err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- --split-text

PARAGRAPHS = ["First paragraph,\nstill the first.", "  Second one, indented.", "Third\nparagraph\nhere."]


def _book(path: Path) -> Path:
    """One .txt file of three paragraphs between blank lines (one of spaces), blank lines at both ends."""
    text = "\n\n" + PARAGRAPHS[0] + "\n\n\n" + PARAGRAPHS[1] + "\n   \n" + PARAGRAPHS[2] + "\n\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["book.txt", "book.txt.gz"])
def test_split_text_units(tmp_path, name):
    book = _book(tmp_path / name)
    whole = book.read_bytes() if name.endswith(".txt") else gzip.decompress(book.read_bytes())
    assert list(iter_documents(book)) == [whole.decode()]  # the default, "file": the text unchanged
    assert list(iter_documents(book, split_text="paragraph")) == PARAGRAPHS
    assert list(iter_documents(book, split_text="line")) == [line for p in PARAGRAPHS for line in p.split("\n")]


def test_split_text_leaves_jsonl_records_whole(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "a\n\nb"}) + "\n")
    assert list(iter_all_documents([f], split_text="line")) == ["a\n\nb"]


def test_one_txt_file_needs_split_text_and_works_with_it(tmp_path, tok_path, capsys):
    book = _book(tmp_path / "book.txt")
    common = ["--input", book, "--tokenizer", tok_path, "--workers", "1", "--no-progress"]
    rc, err = _run_cli(capsys, "shards", *common, "--out", tmp_path / "a")
    assert rc == 2 and "--split-text paragraph" in _one_error_line(err, "shards")
    rc, err = _run_cli(capsys, "shards", *common, "--out", tmp_path / "b", "--split-text", "paragraph",
                       "--valid-fraction", "0.3", "--valid-shards", "1")
    assert rc == 0, err
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["documents"] == 3 and sum(e["samples"] for e in m["splits"]["valid"]) == 1
    tok = load_tokenizer(str(tok_path))
    tokens = read_shard(tmp_path / "b" / "train-000000.tar", m["splits"]["train"][0], np.dtype(m["dtype"]))
    assert tokens.tolist() == [t for p in PARAGRAPHS[1:] for t in tok.encode(p) + [tok.eod_id]]


def _prose(path: Path, n_docs: int = 40) -> Path:
    """The first documents of the bundled corpus as one .txt file, one paragraph each (enough text for a
    vocabulary of a few hundred pieces)."""
    docs = [d for _, d in zip(range(n_docs), iter_all_documents(bundled_corpus_paths()))]
    path.write_text("\n\n".join("\n".join(line for line in d.splitlines() if line.strip()) for d in docs))
    return path


def test_tokenizer_takes_split_text(tmp_path, capsys):
    rc = cli_main(["tokenizer", "--input", str(_prose(tmp_path / "p.txt")), "--split-text", "paragraph",
                   "--vocab-size", "400", "--out", str(tmp_path / "t.model")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "from 40 documents" in out.out


# ---------------------------------------------------------------- tokenizer --out

def test_tokenizer_refuses_existing_out_without_overwrite(tmp_path, capsys):
    prose = _prose(tmp_path / "p.txt")
    out = tmp_path / "t.model"
    out.write_bytes(b"precious")
    rc, err = _run_cli(capsys, "tokenizer", "--input", prose, "--vocab-size", 400, "--out", out)
    assert rc == 2 and "--overwrite" in _one_error_line(err, "tokenizer") and str(out) in err
    assert out.read_bytes() == b"precious"
    rc, err = _run_cli(capsys, "tokenizer", "--input", prose, "--vocab-size", 400, "--out", out, "--overwrite")
    assert rc == 0, err
    assert load_tokenizer(str(out)).vocab_size == 400


def test_tokenizer_out_directory_is_a_one_line_error(tmp_path, capsys):
    book = _book(tmp_path / "book.txt")
    for extra in ([], ["--overwrite"]):
        rc, err = _run_cli(capsys, "tokenizer", "--input", book, "--vocab-size", 300, "--out", tmp_path, *extra)
        line = _one_error_line(err, "tokenizer")
        assert rc == 2 and "--out" in line and ".model" in line
    assert list(tmp_path.iterdir()) == [book]


# ---------------------------------------------------------------- option checks

@pytest.mark.parametrize("args, flag", [
    (["--valid-shards", "0"], "--valid-shards"),
    (["--valid-shards", "-1", "--valid-fraction", "0.1"], "--valid-shards"),
    (["--valid-fraction", "1"], "--valid-fraction"),
    (["--valid-fraction", "-0.1"], "--valid-fraction"),
    (["--valid-fraction", "nan"], "--valid-fraction"),
])
def test_bad_valid_split_options(tmp_path, tok_path, capsys, args, flag):
    rc, err = _run_cli(capsys, "shards", "--input", _small_corpus(tmp_path), "--tokenizer", tok_path,
                       "--out", tmp_path / "o", "--workers", "1", "--no-progress", *args)
    assert rc == 2 and flag in _one_error_line(err, "shards")
    assert not (tmp_path / "o").exists()


def test_zero_valid_shards_with_zero_fraction_means_no_valid_split(tmp_path, tok_path, capsys):
    rc, err = _run_cli(capsys, "shards", "--input", _small_corpus(tmp_path, 20), "--tokenizer", tok_path,
                       "--out", tmp_path / "o", "--workers", "1", "--no-progress", "--valid-shards", "0",
                       "--valid-fraction", "0")
    assert rc == 0, err
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["splits"]["valid"] == []


@pytest.mark.parametrize("size", [-5, 0, 4, 260])
def test_vocab_size_below_the_minimum(tmp_path, capsys, size):
    rc, err = _run_cli(capsys, "tokenizer", "--input", _book(tmp_path / "b.txt"), "--vocab-size", size,
                       "--out", tmp_path / "t.model")
    line = _one_error_line(err, "tokenizer")
    assert rc == 2 and f"--vocab-size {size}" in line and "at least 261" in line
    assert not (tmp_path / "t.model").exists()


def _tokenizer_options() -> set[str]:
    return {o for a in _subparsers()["tokenizer"]._actions for o in a.option_strings}


@pytest.mark.parametrize("size, needs", [(100_000, r"--vocab-size \d+ or less"), (262, r"--vocab-size \d+ or more")])
def test_sentencepiece_errors_name_jrt_prep_flags_only(tmp_path, capsys, size, needs):
    """A tiny corpus: SentencePiece's own advice (--vocab_size, --character_coverage ...) is not ours."""
    rc, err = _run_cli(capsys, "tokenizer", "--input", _book(tmp_path / "b.txt"), "--vocab-size", size,
                       "--out", tmp_path / "t.model")
    line = _one_error_line(err, "tokenizer")
    assert rc == 2 and re.search(needs, line), line
    assert set(re.findall(r"--[\w-]+", line)) <= _tokenizer_options(), line
    assert not re.search(r"[a-z]_[a-z]", line.split("error: ", 1)[1]), line  # no SentencePiece option names


# ---------------------------------------------------------------- help

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    ap = build_parser()
    return next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help():
    missing = [f"{name} {'/'.join(a.option_strings)}" for name, p in _subparsers().items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert missing == []
