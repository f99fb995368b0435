"""Rescale on resume: a checkpoint saved at one (TP, PP, DP) continues in another.

One 2-rank launch (megatron imports and first saves are slow), three runs of jrt-train's
`train()` on configs/mock-tiny.yaml:
  A. TP=2 (DP=1): steps 1-4, checkpoints at 2 and 4.
  B. TP=1 (DP=2) resumed from A's step 2: steps 3-5; checkpoint at 4 (and 5, the end).
     Its step 3 must equal A's step 3 (the weights), step 4 A's step 4 (the resharded Adam
     state; DP changed too, so the optimizer shards were re-cut).
  C. PP=2 (DP=1) resumed from B's step 4 (saved at PP=1): steps 5-6; step 5 must equal B's.
Mock data windows do not depend on the layout, so the unchanged run is the reference.
"""
from pathlib import Path

from tests.multiproc import launch

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mock-tiny.yaml")


def _run(run_dir: Path, tp: int, pp: int, steps: int, resume: str = "none"):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    overrides = {"training.train_steps": steps, "training.eval_steps": 0,
                 "optimizer.decay_steps": 8, "logging.run_dir": str(run_dir),
                 "logging.tensorboard": False, "checkpoint.save_dir": str(run_dir / "ckpt"),
                 "checkpoint.save_interval": 2, "checkpoint.resume": resume,
                 "parallel.tensor_parallel": tp, "parallel.pipeline_parallel": pp}
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    init_distributed(tp, pp, seed=cfg.training.seed)
    result = train(cfg)
    return {result.start_step + i + 1: loss for i, loss in enumerate(result.losses)}


def _rescale(root: Path):
    a = _run(root / "a", tp=2, pp=1, steps=4)
    b = _run(root / "b", tp=1, pp=1, steps=5, resume=str(root / "a" / "ckpt" / "step_0000002"))
    c = _run(root / "c", tp=1, pp=2, steps=6, resume=str(root / "b" / "ckpt" / "step_0000004"))
    return a, b, c


def test_rescale_tp2_to_tp1_and_pp1_to_pp2(tmp_path):
    for a, b, c in launch(_rescale, 2, tmp_path, timeout=480):
        assert sorted(a) == [1, 2, 3, 4] and sorted(b) == [3, 4, 5] and sorted(c) == [5, 6]
        # TP=2 -> TP=1 (and DP 1 -> 2): the next step sees the same weights ...
        assert abs(b[3] - a[3]) < 1e-5 * abs(a[3]), (a, b)
        # ... and the step after it the same Adam update from the resharded optimizer state.
        assert abs(b[4] - a[4]) < 1e-5 * abs(a[4]), (a, b)
        # PP=1 -> PP=2 (DP 2 -> 1): same next-step loss, and training proceeds.
        assert abs(c[5] - b[5]) < 1e-5 * abs(b[5]), (b, c)
        assert all(v == v and v < 10 for v in c.values()), c
