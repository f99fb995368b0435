"""Resume paths beside the default one: the plain (non-distributed) optimizer, and the shard
reader across a change of the data-parallel size."""
import contextlib
import io
import math
from pathlib import Path

from tests.multiproc import launch

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mock-tiny.yaml")


def _run(run_dir: Path, steps: int, extra: dict, resume: str = "none", tp: int = 1):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    overrides = {"training.train_steps": steps, "training.eval_steps": 0,
                 "optimizer.decay_steps": 8, "logging.run_dir": str(run_dir),
                 "logging.tensorboard": False, "checkpoint.save_dir": str(run_dir / "ckpt"),
                 "checkpoint.save_interval": 2, "checkpoint.resume": resume,
                 "parallel.tensor_parallel": tp, **extra}
    cfg = load_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])
    init_distributed(tp, 1, seed=cfg.training.seed)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(cfg)
    losses = {result.start_step + i + 1: loss for i, loss in enumerate(result.losses)}
    return losses, printed.getvalue()


def _plain_optimizer(root: Path):
    plain = {"parallel.use_distributed_optimizer": False}
    straight, _ = _run(root / "straight", 4, plain)
    _run(root / "resumed", 2, plain)
    resumed, _ = _run(root / "resumed", 4, plain, resume="auto")
    return straight, resumed


def test_resume_with_the_plain_optimizer_is_exact(tmp_path):
    straight, resumed = launch(_plain_optimizer, 1, tmp_path, in_process=True)[0]
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == straight[3] and resumed[4] == straight[4], (straight, resumed)


def _shards_across_dp(root: Path, data: dict):
    shards = {"data.mock_data": False, "data.data_dir": data["data_dir"],
              "data.tokenizer": data["tokenizer"], "data.num_workers": 0}
    _run(root / "run", 2, shards, tp=2)  # DP=1
    return _run(root / "run", 4, shards, resume="auto", tp=1)  # DP=2


def test_shard_reader_resumes_after_a_dp_change_with_a_warning(tmp_path):
    from data_prep.corpus import prepare_bundled

    data = prepare_bundled(tmp_path / "data", vocab_size=1024)
    ranks = launch(_shards_across_dp, 2, tmp_path, data, timeout=480)
    for losses, _ in ranks:
        assert sorted(losses) == [3, 4] and all(math.isfinite(v) for v in losses.values())
        assert losses == ranks[0][0]  # every rank reports the same global loss
    printed_by_rank0 = ranks[0][1]
    assert "resumed from" in printed_by_rank0 and "step 2" in printed_by_rank0
    assert "WARNING: data-parallel size changed (1 -> 2)" in printed_by_rank0, printed_by_rank0
