"""Fail at start-up, not at step 1000; and what a late failure must not lose.

In-process runs of configs/mock-tiny.yaml (or small shards of the bundled corpus): each
fault is expected before step 1, or, for faults that can only happen later, with the work
before it safe in a checkpoint.
"""
import json
import signal
from pathlib import Path

import pytest

from tests import runs
from tests.multiproc import launch
from tests.smalldata import small_corpus


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A tokenizer and two shard runs of 200 bundled documents: with and without a valid split."""
    from data_prep.shards import write_shards

    root = tmp_path_factory.mktemp("shards")
    corpus, tok = small_corpus(root)
    for name, fraction in (("with_valid", 0.02), ("no_valid", 0.0)):
        write_shards([str(corpus)], str(tok), root / name, shard_size="20k",
                     valid_fraction=fraction, valid_shards=1, workers=1, progress=False,
                     log=lambda s: None)
    return root


def _shard_run(root: Path, data: str, run_dir: Path, **extra) -> dict:
    return {"data.mock_data": False, "data.data_dir": str(root / data),
            "data.tokenizer": str(root / "tok.model"), "logging.run_dir": str(run_dir),
            "checkpoint.save_dir": str(run_dir / "ckpt"), **extra}


def _error_of(run_dir: Path, **extra) -> BaseException:
    try:
        runs.run_in_process(run_dir, **extra)
    except Exception as error:  # noqa: BLE001 - returned for the test to inspect
        return error
    raise AssertionError("the run did not fail")


def _data_split_faults(root: Path, tmp: Path) -> list[tuple[str, str, bool]]:
    """(error class, message, whether any step was trained) for the two valid-split faults."""
    valid_sequences = sum(e["tokens"] for e in json.loads(
        (root / "with_valid" / "manifest.json").read_text())["splits"]["valid"]) // 65
    batch = valid_sequences + 1  # one sequence more than the valid split holds
    out = []
    for name, extra in (("missing", _shard_run(root, "no_valid", tmp / "missing")),
                        ("small", _shard_run(root, "with_valid", tmp / "small", **{
                            "data.micro_batch_size": batch, "data.global_batch_size": batch}))):
        error = _error_of(tmp / name, **{"training.eval_steps": 1, **extra})
        out.append((type(error).__name__, str(error), (tmp / name / "losses.jsonl").exists()))
    return out


def test_a_missing_or_too_small_valid_split_stops_the_run_before_step_1(shards, tmp_path):
    (missing, small) = launch(_data_split_faults, 1, shards, tmp_path, in_process=True)[0]
    for kind, message, trained in (missing, small):
        assert kind == "DataError" and not trained, (kind, message)
        assert "'valid'" in message and "training.eval_steps=0" in message, message


def _evaluation_fails(run_dir: Path) -> tuple[str, bool]:
    import megatron_jrt.training.step as step_module
    from megatron_jrt.checkpoint import verify_checkpoint

    def broken_eval_step(*args, **kwargs):
        raise RuntimeError("injected: evaluation failed")

    real, step_module.eval_step = step_module.eval_step, broken_eval_step
    try:
        error = _error_of(run_dir, **{"training.eval_steps": 1, "training.eval_interval": 2})
    finally:
        step_module.eval_step = real
    verify_checkpoint(run_dir / "ckpt" / "step_0000002")
    return str(error)


def test_the_checkpoint_of_a_step_is_saved_before_its_evaluation(tmp_path):
    message = launch(_evaluation_fails, 1, tmp_path / "run", in_process=True)[0]
    assert "injected" in message


def _save_dir_faults(tmp: Path) -> dict:
    from megatron_jrt.checkpoint import store

    out = {}
    blocker = tmp / "a_file"
    blocker.write_text("not a folder")
    error = _error_of(tmp / "unwritable", **{"checkpoint.save_dir": str(blocker / "ckpt")})
    out["unwritable"] = (type(error).__name__, str(error),
                         (tmp / "unwritable" / "losses.jsonl").exists())

    stale = tmp / "stale" / "ckpt" / ".tmp_step_0000007"
    stale.mkdir(parents=True)
    (stale / "half_written.distcp").write_bytes(b"x" * 1000)
    runs.run_in_process(tmp / "stale", **{"training.train_steps": 2})
    out["stale_left"] = stale.exists()
    runs.run_in_process(tmp / "stale", **{"training.train_steps": 2})  # forgot resume=auto

    real_usage = store.shutil.disk_usage

    def nearly_full(path):  # room for the first checkpoint only
        usage = real_usage(path)
        return usage._replace(free=1000 if store.previous_size(Path(path)) else usage.free)

    store.shutil.disk_usage = nearly_full
    try:
        error = _error_of(tmp / "full")
    finally:
        store.shutil.disk_usage = real_usage
    ckpt = tmp / "full" / "ckpt"
    out["full"] = (type(error).__name__, str(error), sorted(p.name for p in ckpt.iterdir()))
    return out


def test_save_dir_faults_are_found_before_writing(tmp_path, capsys):
    out = launch(_save_dir_faults, 1, tmp_path, in_process=True)[0]
    kind, message, trained = out["unwritable"]
    assert kind == "CheckpointError" and not trained, out
    assert "checkpoint.save_dir: cannot write" in message and "a_file" in message
    assert not out["stale_left"]
    printed = capsys.readouterr().out
    assert "removed the leftovers of killed saves" in printed
    assert "holds checkpoints up to step 2, but checkpoint.resume is 'none'" in printed
    kind, message, files = out["full"]
    assert kind == "CheckpointError", out
    assert "GB free, a checkpoint needs about" in message and "checkpoint.keep_last" in message
    assert files == ["latest", "step_0000002"]  # step 4 was not started; step 2 is intact


def _nonfinite_then_handlers(run_dir: Path) -> dict:
    import megatron_jrt.train as train_module

    real = train_module._forward_step

    def nan_forward_step(data_iterator, model, **kwargs):
        output, loss_func = real(data_iterator, model, **kwargs)
        return output * float("nan"), loss_func

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    train_module._forward_step = nan_forward_step
    try:
        error = _error_of(run_dir, **{"training.max_consecutive_nonfinite": 2,
                                      "checkpoint.save_dir": ""})
    finally:
        train_module._forward_step = real
    after = {s: signal.getsignal(s) for s in before}
    return {"error": type(error).__name__, "handlers_restored": before == after}


def test_a_nonfinite_stop_restores_the_signal_handlers(tmp_path):
    out = launch(_nonfinite_then_handlers, 1, tmp_path, in_process=True)[0]
    assert out == {"error": "NonFiniteLossError", "handlers_restored": True}
