"""What may change on resume, and what happens then (docs/CHECKPOINTS.md, "Resume rules").

One in-process launch, four runs of configs/mock-tiny.yaml in one run directory:
  1. steps 1-4 at lr 3e-3 (decay over train_steps = 4), checkpoints at 2 and 4;
  2. resume=auto, train longer (8 steps) at lr 0.03 and twice the global batch;
  3. resume explicitly from the older step 2, 3 steps: a new branch;
  4. resume=auto: continues the new branch (published last), not the abandoned step 8.
"""
import contextlib
import io
import math
from pathlib import Path

import pytest

from tests import runs
from tests.multiproc import launch

LR, MIN_LR, WARMUP = 0.03, 0.003, 2


def _run(run_dir: Path, **extra):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = runs.run_in_process(run_dir, **{"optimizer.decay_steps": "null",
                                                 "checkpoint.keep_last": 10, **extra})
    return result, printed.getvalue()


def _vs_samples(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars("lm loss vs samples")]


def _four_runs(run_dir: Path) -> dict:
    from megatron_jrt.checkpoint import read_metadata

    ckpt = run_dir / "ckpt"
    out = {}
    first, out["printed1"] = _run(run_dir, **{"logging.tensorboard": True})
    out["lr1"] = first.learning_rates
    longer, out["printed2"] = _run(run_dir, **{
        "checkpoint.resume": "auto", "training.train_steps": 8, "optimizer.lr": LR,
        "optimizer.min_lr": MIN_LR, "data.global_batch_size": 8, "logging.tensorboard": True})
    out["start2"], out["lr2"] = longer.start_step, longer.learning_rates
    out["step8"] = read_metadata(ckpt / "step_0000008")
    out["vs_samples"] = _vs_samples(run_dir)
    branch, _ = _run(run_dir, **{"checkpoint.resume": str(ckpt / "step_0000002"),
                                 "training.train_steps": 3})
    out["start3"] = branch.start_step
    out["latest"] = (ckpt / "latest").read_text().strip()
    out["rows"] = [row["step"] for row in runs.loss_rows(run_dir)]
    auto, _ = _run(run_dir, **{"checkpoint.resume": "auto", "training.train_steps": 4})
    out["start4"] = auto.start_step
    return out


def _cosine(step: int, decay: int, lr: float, min_lr: float) -> float:
    """The lr megatron's cosine schedule gives after `step` updates (warmup WARMUP)."""
    if step <= WARMUP:
        return lr * step / WARMUP
    progress = (step - WARMUP) / (decay - WARMUP)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory):
    return launch(_four_runs, 1, tmp_path_factory.mktemp("resume") / "run", in_process=True)[0]


def test_the_config_lr_schedule_wins_on_resume_and_training_longer_redecays(four_runs):
    # Run 1 ends at its min_lr; run 2's config replans the cosine over 8 steps at the new lr.
    assert four_runs["lr1"][-1] == pytest.approx(_cosine(3, 4, 3e-3, 3e-4))
    assert four_runs["start2"] == 4
    expected = [_cosine(s, 8, LR, MIN_LR) for s in range(4, 8)]
    assert four_runs["lr2"] == pytest.approx(expected), four_runs["lr2"]
    notice = next(line for line in four_runs["printed2"].splitlines()
                  if line.startswith("resume: the config differs"))
    for change in ("optimizer.lr 0.003 -> 0.03", "optimizer.min_lr 0.0003 -> 0.003",
                   "training.train_steps 4 -> 8", "data.global_batch_size 4 -> 8"):
        assert change in notice, notice


def test_a_changed_global_batch_keeps_consumed_samples_and_tokens_right(four_runs):
    # 4 steps x 4 samples, then 4 steps x 8 samples: 48 samples of 64 tokens.
    assert four_runs["step8"]["consumed_samples"] == 48
    assert four_runs["step8"]["consumed_tokens"] == 48 * 64
    # Logged every 2 steps: samples 8, 16, then 32, 48; monotone.
    assert [step for step, _ in four_runs["vs_samples"]] == [8, 16, 32, 48]


def test_auto_resume_follows_the_branch_published_last_and_losses_are_not_duplicated(four_runs):
    assert four_runs["start3"] == 2
    assert four_runs["latest"] == "step_0000003"
    assert four_runs["rows"] == [1, 2, 3]  # steps 3-8 of the abandoned branch are dropped
    assert four_runs["start4"] == 3  # not step 8 of the abandoned branch


def test_the_printed_config_shows_the_model_as_built(four_runs):
    # mock-tiny: random tokens from 256 ids plus [MASK]; the preset's own vocabulary is 50264.
    assert "# model.resolved.vocab_size: 257" in four_runs["printed1"]
    assert "vocab_size: 50264" not in four_runs["printed1"]


def _init_from_runs(root: Path) -> dict:
    fixed = {"optimizer.decay_steps": 8, "training.eval_steps": 1}
    source, _ = _run(root / "source", **fixed, **{"training.train_steps": 2,
                                                  "training.eval_interval": 2})
    init = {**fixed, "checkpoint.init_from": str(root / "source" / "ckpt"),
            "training.train_steps": 1, "training.eval_interval": 1}
    started, printed = _run(root / "started", **init)
    again, printed_again = _run(root / "started", **{**init, "checkpoint.resume": "auto",
                                                     "training.train_steps": 2})
    return {"source_valid": source.validation[-1], "started": started, "printed": printed,
            "again_start": again.start_step, "printed_again": printed_again}


def test_init_from_takes_the_weights_only_and_a_resumable_run_resumes_instead(tmp_path):
    out = launch(_init_from_runs, 1, tmp_path, in_process=True)[0]
    started = out["started"]
    assert started.start_step == 0 and started.learning_rates == [0.0]  # a fresh schedule
    # Step 1 of a fresh warmup has lr 0, so its validation sees the source's step-2 weights.
    assert started.validation[0] == out["source_valid"]
    assert "initialised the model from" in out["printed"] and "step 2 of the run" in out["printed"]
    assert out["again_start"] == 1  # resume=auto found the run's own checkpoint
    assert "checkpoint.init_from: not used" in out["printed_again"]
