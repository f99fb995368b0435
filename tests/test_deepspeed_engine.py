"""The DeepSpeed engine (`training.engine: deepspeed`) against the megatron engine on CPU.

Equal losses on the tiny preset (fp32, gloo) for ZeRO 1, 2, 3 and ZeRO-3 with CPU offload, in
one process and in two; a resume continues exactly; the config errors name their keys. The
engine tests skip where deepspeed is not installed; the config tests need no deepspeed.
The engine tests run in spawned processes. (Runs one after another in one process work too:
`destroy_distributed` drops DeepSpeed's clone of the world group; tests/test_train_loop.py.)
"""
import json
import math
from importlib.util import find_spec

import pytest

from megatron_jrt.config import ConfigError
from tests.multiproc import launch

needs_deepspeed = pytest.mark.skipif(
    find_spec("deepspeed") is None,
    reason="deepspeed is not installed (optional extra: pip install -e '.[deepspeed]')")

STEPS = 12
BASE = ["data.mock_data=true", "data.mock_vocab_size=256", "data.seq_length=48",
        "data.micro_batch_size=1", "data.global_batch_size=4", "data.num_workers=0",
        f"training.train_steps={STEPS}", "training.eval_steps=1", f"training.eval_interval={STEPS}",
        "training.log_interval=4", "training.bf16=false", "optimizer.warmup_steps=2",
        "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "logging.progress_bar=false",
        "logging.tensorboard=false", "model.preset=jrt-tiny"]
VARIANTS = {"zero1": ["training.zero_stage=1"], "zero2": ["training.zero_stage=2"],
            "zero3": ["training.zero_stage=3"],
            "zero3-offload": ["training.zero_stage=3", "training.offload=optimizer+params"]}


def _train(overrides: list[str]):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    cfg = load_config(None, BASE + overrides)
    init_distributed(seed=cfg.training.seed)
    return train(cfg)


def _every_engine(run_dir, variants: list[str]):
    """megatron, then DeepSpeed in each variant, in this one process (DeepSpeed keeps its
    process groups per process)."""
    runs = {"megatron": _train([f"logging.run_dir={run_dir}/megatron"])}
    for name in variants:
        runs[name] = _train(VARIANTS[name] + ["training.engine=deepspeed",
                                              f"logging.run_dir={run_dir}/{name}"])
    return {name: (r.losses, r.learning_rates, r.validation) for name, r in runs.items()}


def _same_curve(reference, other):
    losses, lrs, validation = other
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx(reference[0], rel=1e-5)
    assert lrs == pytest.approx(reference[1], rel=1e-9)
    for key in ("lm loss", "mlm loss", "loss"):
        assert validation[-1][key] == pytest.approx(reference[2][-1][key], rel=1e-5)


@needs_deepspeed
def test_one_process_losses_equal_megatron(tmp_path):
    runs = launch(_every_engine, 1, tmp_path, list(VARIANTS))[0]
    for name in VARIANTS:
        _same_curve(runs["megatron"], runs[name])
    assert runs["megatron"][0][-1] < runs["megatron"][0][0]  # it trains


@needs_deepspeed
def test_two_processes_losses_equal_megatron(tmp_path):
    """DP=2: 2 micro-batches of 1 per rank; ZeRO partitions across the two ranks."""
    ranks = launch(_every_engine, 2, tmp_path, ["zero2", "zero3"], timeout=600)
    assert repr(ranks[0]) == repr(ranks[1])  # every rank reports the same
    for name in ("zero2", "zero3"):
        _same_curve(ranks[0]["megatron"], ranks[0][name])


def _nan_on_step(forward, step: int, micro_batches: int):
    """`forward` whose per-token losses are NaN on every micro-batch of training step `step`."""
    calls = [0]

    def nan_forward(*args, **kwargs):
        output = forward(*args, **kwargs)
        calls[0] += 1
        if (calls[0] - 1) // micro_batches == step:
            output = output * float("nan")
        return output

    return nan_forward


def _nan_step_in_both_engines(run_dir):
    """Both engines with a NaN loss on step 2: the update is skipped, training goes on."""
    from megatron_jrt.training.engines import base, deepspeed_engine

    real = base.model_forward
    results = {}
    for name in ("megatron", "deepspeed"):
        # train.py's forward step looks model_forward up in `base` at each call
        base.model_forward = deepspeed_engine.model_forward = _nan_on_step(real, 2, 4)
        try:
            result = _train(VARIANTS["zero2"] + [f"training.engine={name}",
                                                 f"logging.run_dir={run_dir}/{name}",
                                                 "training.train_steps=5", "training.eval_steps=0"])
        finally:
            base.model_forward = deepspeed_engine.model_forward = real
        results[name] = (result.losses, result.skipped_steps, result.nonfinite_steps)
    return results


@needs_deepspeed
def test_a_nonfinite_loss_skips_the_update_as_in_megatron(tmp_path):
    runs = launch(_nan_step_in_both_engines, 1, tmp_path)[0]
    (megatron, m_skipped, m_nonfinite), (deepspeed, skipped, nonfinite) = (
        runs["megatron"], runs["deepspeed"])
    assert (skipped, nonfinite) == (m_skipped, m_nonfinite) == (1, 1)
    assert math.isnan(deepspeed[2]) and math.isnan(megatron[2])
    finite = [i for i in range(5) if i != 2]
    assert [deepspeed[i] for i in finite] == pytest.approx([megatron[i] for i in finite], rel=1e-5)


def _resume(run_dir):
    """12 steps straight, and 6 + a resume for 6 more, both saving every 3 steps (ZeRO-2)."""
    common = VARIANTS["zero2"] + ["training.engine=deepspeed", "checkpoint.save_interval=3",
                                  "checkpoint.keep_last=2"]
    straight = _train(common + [f"logging.run_dir={run_dir}/straight",
                                f"checkpoint.save_dir={run_dir}/straight/ckpt"])
    split = common + [f"logging.run_dir={run_dir}/split",
                      f"checkpoint.save_dir={run_dir}/split/ckpt"]
    first = _train(split + [f"training.train_steps={STEPS // 2}", f"optimizer.decay_steps={STEPS}"])
    second = _train(split + ["checkpoint.resume=auto", f"optimizer.decay_steps={STEPS}"])
    megatron_error = None
    try:  # a megatron run must not take the DeepSpeed checkpoint as its own
        _train([f"logging.run_dir={run_dir}/megatron", "checkpoint.resume=auto",
                f"checkpoint.save_dir={run_dir}/split/ckpt"])
    except Exception as exc:  # noqa: BLE001 - the message is checked
        megatron_error = f"{type(exc).__name__}: {exc}"
    return (straight.losses, first.losses, second.losses, second.start_step,
            sorted(p.name for p in (run_dir / "split" / "ckpt").iterdir()), megatron_error)


@needs_deepspeed
def test_resume_continues_exactly(tmp_path):
    straight, first, second, start, files, megatron_error = launch(_resume, 1, tmp_path)[0]
    assert start == STEPS // 2
    assert first + second == pytest.approx(straight, rel=1e-6)
    assert files == ["latest", "step_0000009", "step_0000012"]
    assert (tmp_path / "split" / "ckpt" / "latest").read_text() == "step_0000012\n"
    metadata = json.loads((tmp_path / "split" / "ckpt" / "step_0000012" / "checkpoint.json"
                           ).read_text())["body"]
    assert metadata["engine"] == "deepspeed" and metadata["zero_stage"] == 2
    assert megatron_error is not None and "training.engine=deepspeed" in megatron_error


# ------------------------------------------------------------------------- config (no deepspeed)

def _config(*overrides: str):
    from megatron_jrt.train_config import load_config

    return load_config(None, BASE + ["training.engine=deepspeed", *overrides])


def test_default_engine_is_megatron():
    from megatron_jrt.train_config import load_config

    assert load_config(None, BASE).training.engine == "megatron"


def test_tensor_or_pipeline_parallel_with_deepspeed_is_a_named_error():
    for key in ("parallel.tensor_parallel", "parallel.pipeline_parallel"):
        with pytest.raises(ConfigError, match=r"^parallel\.tensor_parallel: the deepspeed engine"):
            _config(f"{key}=2")


def test_engine_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^training\.engine: 'fsdp' is not one of"):
        _config("training.engine=fsdp")
    with pytest.raises(ConfigError, match=r"^training\.zero_stage: 4"):
        _config("training.zero_stage=4")
    with pytest.raises(ConfigError, match=r"^training\.offload: 'optimizer\+params' needs "
                                          r"training\.zero_stage=3"):
        _config("training.zero_stage=2", "training.offload=optimizer+params")


def _generated(user: dict | None, tmp_path, *overrides: str) -> dict:
    from megatron_jrt.training.engines.deepspeed_config import deepspeed_config

    extra = []
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        extra = [f"training.deepspeed_config={path}"]
    return deepspeed_config(_config(*overrides, *extra), dp_world=2, bf16=False)


def test_generated_config_follows_the_run_config(tmp_path):
    ds = _generated(None, tmp_path, "training.zero_stage=3", "training.offload=optimizer",
                    "optimizer.clip_grad=0.5")
    assert ds["train_batch_size"] == 4 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert "offload_param" not in ds["zero_optimization"]


def test_user_config_adds_settings_and_conflicts_name_both_keys(tmp_path):
    ds = _generated({"zero_optimization": {"stage": 2, "overlap_comm": True},
                     "gradient_clipping": 1.0}, tmp_path, "training.zero_stage=2")
    assert ds["zero_optimization"]["overlap_comm"] is True
    with pytest.raises(ConfigError, match=r"^training\.deepspeed_config: zero_optimization\.stage "
                                          r"= 3 conflicts with training\.zero_stage"):
        _generated({"zero_optimization": {"stage": 3}}, tmp_path, "training.zero_stage=2")
    with pytest.raises(ConfigError, match=r"gradient_clipping = 0\.5 conflicts with "
                                          r"optimizer\.clip_grad"):
        _generated({"gradient_clipping": 0.5}, tmp_path)
    with pytest.raises(ConfigError, match=r"train_batch_size = 8 conflicts with "
                                          r"data\.global_batch_size"):
        _generated({"train_batch_size": 8}, tmp_path)
    with pytest.raises(ConfigError, match=r"sets 'optimizer'"):
        _generated({"optimizer": {"type": "Adam"}}, tmp_path)


def test_unreadable_user_config_is_a_named_error(tmp_path):
    from megatron_jrt.training.engines.deepspeed_config import read_user_config

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"^training\.deepspeed_config: .* not valid JSON"):
        read_user_config(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match=r"^training\.deepspeed_config: cannot read"):
        read_user_config(str(tmp_path / "missing.json"))
