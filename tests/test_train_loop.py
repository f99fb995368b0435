"""`jrt-train` end to end on CPU: layouts agree, the demo learns, metrics reach TensorBoard."""
import math
from importlib.util import find_spec

import pytest

from tests.multiproc import launch

STEPS = 4
MOCK = ["data.mock_data=true", "data.mock_vocab_size=256", "data.seq_length=48",
        "data.micro_batch_size=2", "data.global_batch_size=4", "data.num_workers=0",
        f"training.train_steps={STEPS}", "training.eval_steps=1", "training.eval_interval=2",
        "training.log_interval=1", "optimizer.warmup_steps=1", "optimizer.lr=3e-3",
        "optimizer.min_lr=3e-4", "logging.progress_bar=false", "model.preset=jrt-tiny"]


def _run(overrides: list[str]):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    cfg = load_config(None, overrides)
    init_distributed(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                     seed=cfg.training.seed)
    return train(cfg)


def _layouts(run_dir):
    """The same global batch of 4 as DP=2 (distributed optimizer, 2 x 1 micro-batches per
    rank) and as TP=2 (2 x 2), in one launch."""
    dp = _run(MOCK + [f"logging.run_dir={run_dir}/dp2", "data.micro_batch_size=1"])
    tp = _run(MOCK + ["parallel.tensor_parallel=2", f"logging.run_dir={run_dir}/tp2"])
    return dp.losses, tp.losses, dp.validation, tp.validation


def test_the_loss_does_not_depend_on_micro_batches_or_layout(tmp_path):
    """One global batch of 4 as 1 x 4, 4 x 1, DP=2 and TP=2: the same losses (fp32, CPU).

    Both loss terms are token-weighted over the global batch; the masked-LM term has a
    different token count in every sample, so a mean of per-micro-batch means would differ.
    """
    single = launch(_run, 1, MOCK + [f"logging.run_dir={tmp_path}/single",
                                     "data.micro_batch_size=4"], in_process=True)[0]
    assert len(single.losses) == STEPS and all(math.isfinite(x) for x in single.losses)
    four = launch(_run, 1, MOCK + [f"logging.run_dir={tmp_path}/four",
                                   "data.micro_batch_size=1"], in_process=True)[0]
    others = [four.losses]
    for dp_losses, tp_losses, dp_valid, tp_valid in launch(_layouts, 2, tmp_path, timeout=600):
        others += [dp_losses, tp_losses]
        for valid in (dp_valid, tp_valid):
            for key in ("lm loss", "mlm loss", "loss"):
                assert valid[-1][key] == pytest.approx(single.validation[-1][key], rel=1e-5)
    for other in others:
        assert other == pytest.approx(single.losses, rel=1e-5), (single.losses, other)


def _event_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    return {tag: [e.value for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@pytest.mark.slow
def test_demo_config_learns_and_logs_to_tensorboard(tmp_path):
    """The demo's real pipeline (bundled corpus, tokenizer, shards) for a shortened run."""
    from data_prep.corpus import prepare_bundled
    from megatron_jrt.demo import CONFIG

    data = prepare_bundled(tmp_path / "data", vocab_size=2048)
    run_dir = tmp_path / "run"
    result = launch(_run_config, 1, str(CONFIG), [
        f"data.tokenizer={data['tokenizer']}", f"data.data_dir={data['data_dir']}",
        f"logging.run_dir={run_dir}",
        "training.train_steps=40", "training.eval_interval=10", "training.eval_steps=2",
        "optimizer.warmup_steps=5", "training.sample_tokens=4", "logging.progress_bar=false",
        "data.num_workers=0"], in_process=True)[0]
    first, last = result.validation[0]["lm loss"], result.validation[-1]["lm loss"]
    assert last < first - 0.3, result.validation  # step 10 -> step 40
    assert sum(result.losses[-5:]) < sum(result.losses[:5]) - 1.0, result.losses
    assert result.sample is not None
    scalars = _event_scalars(run_dir)
    for tag in ("lm loss", "mlm loss", "loss", "learning-rate", "grad-norm", "batch-size",
                "tokens-per-sec", "throughput", "lm loss vs samples", "learning-rate vs samples",
                "lm loss validation", "lm loss validation ppl"):
        assert tag in scalars, (tag, sorted(scalars))
    assert len(scalars["loss"]) == 4  # log_interval 10 over 40 steps
    assert scalars["lm loss validation"] == pytest.approx([v["lm loss"] for v in result.validation])
    assert (run_dir / "config.yaml").is_file()


def _run_config(path, overrides):
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    cfg = load_config(path, overrides)
    init_distributed(seed=cfg.training.seed)
    return train(cfg)


@pytest.mark.parametrize("override, key", [
    ("data.global_batch_size=3", "data.global_batch_size"),
    ("model.preset=jrt-9b", "model.preset"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("training.trian_steps=5", "training.trian_steps"),
    ("model.overrides={num_heads: 5}", "model"),
])
def test_invalid_config_fails_before_any_work(override, key, capsys):
    from megatron_jrt.train import main

    assert main(["--config", "configs/mock-tiny.yaml", "--set", override]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and key in err, err


def test_missing_data_names_the_key(tmp_path):
    result = launch(_expect_error, 1, [f"data.data_dir={tmp_path}/nothing", "model.preset=jrt-tiny",
                                       "data.mock_data=false", f"data.tokenizer={tmp_path}/x.model",
                                       f"logging.run_dir={tmp_path}/run"], in_process=True)[0]
    assert "tok" in result or "data." in result, result


def _expect_error(overrides):
    try:
        _run(overrides)
    except (FileNotFoundError, ValueError) as error:
        return str(error)
    raise AssertionError("training started without data")


def _nan_run(overrides):
    import megatron_jrt.train as train_module

    real_forward_step = train_module._forward_step

    def nan_forward_step(data_iterator, model, **kwargs):
        output, loss_func = real_forward_step(data_iterator, model, **kwargs)
        return output * float("nan"), loss_func

    train_module._forward_step = nan_forward_step
    try:
        _run(overrides)
    except train_module.NonFiniteLossError as error:
        return str(error)
    finally:
        train_module._forward_step = real_forward_step
    raise AssertionError("training went on through non-finite losses")


def test_nonfinite_losses_are_skipped_then_halt_the_run(tmp_path):
    message = launch(_nan_run, 1, MOCK + ["training.max_consecutive_nonfinite=3",
                                          f"logging.run_dir={tmp_path}"], in_process=True)[0]
    assert "step 3: 3 consecutive steps with a non-finite loss" in message
    assert "training.max_consecutive_nonfinite" in message


def _runs_one_after_another(run_dir, engine):
    """Two runs in one process, as a sweep or a notebook makes them; after each, with the
    process group destroyed: is the wrapped model still alive, and how many descriptors are
    open."""
    import gc
    import os
    import weakref

    import megatron_jrt.model
    from megatron_jrt.distributed import destroy_distributed

    built, build = [], megatron_jrt.model.build_model

    def recording_build(*args, **kwargs):
        model = build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    megatron_jrt.model.build_model = recording_build
    alive, descriptors = [], []
    for index in range(2):
        _run(MOCK + [f"logging.run_dir={run_dir}/{index}", "logging.tensorboard=false",
                     "training.eval_steps=0", f"training.engine={engine}"])
        destroy_distributed()
        gc.collect()
        alive.append(built[-1]() is not None)
        descriptors.append(len(os.listdir("/proc/self/fd")))
    return alive, descriptors


@pytest.mark.parametrize("engine", [
    "megatron",
    pytest.param("deepspeed", marks=pytest.mark.skipif(
        find_spec("deepspeed") is None, reason="deepspeed is not installed"))])
def test_a_finished_run_releases_its_model_and_process_groups(engine, tmp_path):
    """megatron's DDP keeps each parameter's gradient accumulator with a hook that refers back
    to the DDP: a cycle through C++ that Python's collector cannot see. Unbroken, every run in
    a process kept its model, optimizer state and process groups (77 descriptors per tiny run
    on CPU: a long sweep ran out of them). DeepSpeed kept its clone of the destroyed world
    group, so its second run in a process failed ("Group ... is not registered")."""
    alive, descriptors = launch(_runs_one_after_another, 1, str(tmp_path), engine)[0]
    assert alive == [False, False]
    assert descriptors[1] <= descriptors[0] + 2, descriptors
