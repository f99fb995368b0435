"""Run config (load, --set, validation, round trip), FLOPs count, and the metrics logger."""
from __future__ import annotations

import math

import pytest
import yaml

from megatron_jrt.config import BASECONV, PLA, SWA, ConfigError, preset
from megatron_jrt.flops import flops_per_token, peak_flops_per_device, swa_mean_keys
from megatron_jrt.metrics import MetricsLogger
from megatron_jrt.train_config import (TrainConfig, config_to_dict, format_config, load_config,
                                       save_config)

SMALL = {  # a valid config for the tiny model, as a YAML file would give it
    "model": {"preset": "jrt-tiny"},
    "data": {"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 8},
    "optimizer": {"warmup_steps": 5},
    "training": {"train_steps": 20},
}


def write_yaml(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# --- config -------------------------------------------------------------------------------

def test_load_yaml_and_set_overrides(tmp_path):
    cfg = load_config(write_yaml(tmp_path, SMALL), [
        "optimizer.lr=1e-3", "training.recompute=full", "model.overrides.prefix_length=32",
        "data.tokenizer=123", "optimizer.decay_steps=null", "parallel.overlap_grad_reduce=true",
    ])
    assert cfg.model.preset == "jrt-tiny"
    assert cfg.data.global_batch_size == 8 and cfg.data.num_workers == 2  # default kept
    assert cfg.optimizer.lr == 1e-3 and cfg.optimizer.min_lr == 8e-5
    assert cfg.training.recompute == "full"
    assert cfg.data.tokenizer == "123"  # a str field keeps the text as written
    assert cfg.parallel.overlap_grad_reduce is True
    assert cfg.model_config().prefix_length == 32
    text = format_config(cfg)
    assert "optimizer.lr: 0.001" in text and "model.overrides.prefix_length: 32" in text
    assert "data.seq_length: 64" in text and "checkpoint.resume: none" in text
    cfg.validate(world_size=4)  # dp 4 x micro 2 divides 8


def test_defaults_are_the_paper_recipe():
    cfg = load_config(None)
    assert (cfg.optimizer.lr, cfg.optimizer.min_lr, cfg.optimizer.adam_beta2) == (8e-4, 8e-5, 0.95)
    assert cfg.data.global_batch_size * cfg.data.seq_length == 256 * 2048
    assert cfg.model_config().hidden_size == 1024


def test_round_trip(tmp_path):
    cfg = load_config(write_yaml(tmp_path, SMALL), ["model.overrides.swa_window=4",
                                                    "training.sample_prompt=Once upon"])
    path = tmp_path / "ckpt" / "config.yaml"
    save_config(cfg, path)
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    again = load_config(str(path))
    assert again == cfg and config_to_dict(again) == config_to_dict(cfg)


def _err(tmp_path, data=None, sets=(), world_size=None):
    cfg = load_config(write_yaml(tmp_path, data if data is not None else SMALL), list(sets))
    cfg.validate(world_size)


@pytest.mark.parametrize("data, sets, world_size, expected", [
    (None, ["dataa.seq_length=3"], None, "dataa: unknown section; did you mean 'data'"),
    (None, ["data.seq_lenght=3"], None, "data.seq_lenght: unknown key in section 'data'; "
                                        "did you mean 'seq_length'"),
    ({**SMALL, "optimiser": {}}, [], None, "optimiser: unknown section; did you mean 'optimizer'"),
    ({**SMALL, "training": {"train_step": 5}}, [], None, "training.train_step: unknown key"),
    (None, ["training.train_steps=abc"], None, "training.train_steps: expected int, got 'abc'"),
    (None, ["training.bf16=1"], None, "training.bf16: expected bool, got 1"),
    (None, ["optimizer.lr=fast"], None, "optimizer.lr: expected float, got 'fast'"),
    (None, ["training.recompute=3"], None, "training.recompute: expected str | None, got 3"),
    (None, ["data.micro_batch_size=0"], None, "data.micro_batch_size: must be a positive"),
    (None, ["optimizer.min_lr=0.01"], None, "optimizer.min_lr: 0.01 is larger than optimizer.lr"),
    (None, ["optimizer.min_lr=-1", "optimizer.lr=1"], None, "optimizer.min_lr: must be >= 0"),
    (None, ["optimizer.adam_beta2=1.0"], None, "optimizer.adam_beta2: must be in [0, 1)"),
    (None, ["optimizer.lr_decay_style=step"], None, "optimizer.lr_decay_style: 'step' is not"),
    (None, ["optimizer.warmup_steps=50"], None, "optimizer.warmup_steps: 50 must be shorter"),
    (None, ["training.recompute=selective"], None, "training.recompute: 'selective'"),
    (None, ["checkpoint.resume=/no/such/ckpt"], None, "checkpoint.resume: '/no/such/ckpt'"),
    (None, ["checkpoint.resume=auto"], None, "checkpoint.resume: 'auto'"),
    (None, ["data.seq_length=128"], None, "data.seq_length: 128 is longer than the model's "
                                          "max_sequence_length 64"),
    (None, ["data.seq_length=8"], None, "model.prefix_length: 16 leaves no next-token positions"),
    # prefix == sequence: no position left for the next-token loss (it would log lm loss 0)
    (None, ["data.seq_length=16"], None, "model.prefix_length: 16 leaves no next-token "
                                         "positions in data.seq_length 16"),
    (None, ["optimizer.lr=.inf"], None, "optimizer.lr: must be a finite number, got inf"),
    (None, ["optimizer.adam_eps=.nan"], None, "optimizer.adam_eps: must be a finite number"),
    (None, ["model.overrides.norm_eps=-.inf"], None, "model.overrides.norm_eps: must be a finite"),
    (None, ["training.train_steps=0"], None, "training.train_steps: must be a positive integer"),
    (None, ["data.global_batch_size=7"], None, "data.global_batch_size: 7 is not divisible"),
    (None, [], 3, "data.global_batch_size: 8 is not divisible by data.micro_batch_size * "
                  "data_parallel = 2 * 3 = 6"),
    (None, ["parallel.tensor_parallel=2"], 3, "parallel.tensor_parallel: world size 3"),
    (None, ["parallel.tensor_parallel=3"], None, "model.num_heads: 4 heads cannot be split"),
    (None, ["model.overrides.prefix_lenght=8"], None, "model.overrides.prefix_lenght: unknown "
                                                      "JRTModelConfig field"),
    (None, ["model.overrides.hidden_size=big"], None, "model.overrides.hidden_size: expected int"),
    (None, ["model.preset=jrt-7b"], None, "model.preset: unknown preset 'jrt-7b'"),
    (["not", "a", "mapping"], [], None, "the top level must be a mapping"),
    ({**SMALL, "data": [1, 2]}, [], None, "data: expected a mapping"),
])
def test_validation_errors_name_the_key(tmp_path, data, sets, world_size, expected):
    with pytest.raises(ConfigError) as info:
        _err(tmp_path, data, sets, world_size)
    assert expected in str(info.value), str(info.value)


def test_validate_catches_edits_in_code():
    cfg = TrainConfig()
    cfg.training.train_steps = "10"  # not an int
    with pytest.raises(ConfigError, match="training.train_steps: expected int"):
        cfg.validate()


# --- FLOPs --------------------------------------------------------------------------------

def param_count(cfg) -> tuple[int, int]:
    """(non-embedding params, tied embedding = LM head params), from the spec's layer shapes."""
    d, h, f, dh = cfg.hidden_size, cfg.num_heads, cfg.feature_dim, cfg.head_dim
    mixer = {PLA: d * h * (2 * f + dh) + d * h * (f + dh) + d * d,
             SWA: 3 * d * d + d * d,
             BASECONV: d * 4 * d + 4 * d + 2 * d * cfg.conv_kernel + 2 * d * d + d}
    per_layer_rest = 4 * d * d + 2 * d * d + 2 * d  # gated MLP + two RMSNorms
    body = sum(mixer[c] + per_layer_rest for c in cfg.layer_pattern) + d  # + final norm
    return body, cfg.padded_vocab_size() * d


def test_360m_flops_vs_6n():
    cfg = preset("jrt-360m")
    body, head = param_count(cfg)
    assert body + head == 356_578_304  # JRT_SPEC.md section 3: our shapes are the model's
    six_n = 6 * (body + head)
    ours = flops_per_token(cfg, 2048)
    ratio = ours / six_n
    print(f"jrt-360m @2048: {ours / 1e9:.3f} GFLOP/token vs 6N {six_n / 1e9:.3f} "
          f"(ratio {ratio:.3f})")
    # 6N counts every weight once per token; we add the token-mixing terms (SWA band,
    # PLA state ~1.4% of 6N) and drop the encoder projection on the non-prefix half (-0.5%)
    # and biases/norms. Those corrections are a few percent, so the ratio must be near 1.
    assert 0.98 < ratio < 1.05
    assert flops_per_token(cfg, 2048, training=False) * 3 == pytest.approx(ours)


def _tiny(pattern: str):
    return preset("jrt-tiny", layer_pattern=pattern)


def test_flops_hand_count_tiny_per_mixer():
    # jrt-tiny: d 64, 4 heads (dh 16), f 16, M 16, window 8, kernel 3, vocab 50264 (pad 8 -> same)
    L = 64
    mlp = 8 * 64 * 64 + 128 + 4 * 64 * 64  # fc1 + gate product + fc2 = 49280
    head = 2 * 64 * 50264
    assert mlp == 49280

    # BaseConv: in 2*64*256, conv 2*128*3, gate 128, out 2*128*64
    conv = 32768 + 768 + 128 + 16384
    assert flops_per_token(_tiny("CCCC"), L, training=False) == 4 * (conv + mlp) + head

    # SWA: keys seen by positions 0..63 with window 8: 1..9 then 9 each -> (45 + 55*9)/64
    keys = (45 + 55 * 9) / 64
    assert swa_mean_keys(L, 8) == keys
    swa = 2 * 64 * 192 + 2 * 64 * 64 + 4 * 64 * keys
    assert flops_per_token(_tiny("SSSS"), L, training=False) == pytest.approx(
        4 * (swa + mlp) + head)

    # PLA: D = 273, dv = 16, prefix share 16/64
    D, share = 273, 16 / 64
    proj = 2 * 64 * 4 * 48 + share * 2 * 64 * 4 * 32 + 2 * 64 * 64
    per_head = (2 * 256 + (2 * D * 16 + D) + (2 * D * 16 + 2 * D + 16)
                + share * (256 + 2 * D * 16 + D))
    pla = proj + 4 * per_head
    assert flops_per_token(_tiny("PPPP"), L, training=False) == pytest.approx(
        4 * (pla + mlp) + head)
    # training = 3 x forward, and the real pattern is the sum of its layers
    mixed = 2 * (conv + mlp) + (pla + mlp) + (swa + mlp) + head
    assert flops_per_token(preset("jrt-tiny"), L) == pytest.approx(3 * mixed)


def test_swa_keys_short_sequence_and_peak_on_cpu():
    assert swa_mean_keys(4, 128) == (1 + 2 + 3 + 4) / 4
    import torch
    if not torch.cuda.is_available():
        assert peak_flops_per_device("bf16") is None


# --- metrics logger -----------------------------------------------------------------------

def _read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_logger_console_and_tensorboard(tmp_path, capsys):
    log = MetricsLogger(tmp_path, enabled=True, tensorboard=True, flops_per_token=6e9,
                        peak_flops=989e12, world_size=8, progress_total=100, progress_bar=True)
    common = dict(lr=8e-4, tokens_per_step=256 * 2048, skipped_steps=0, nonfinite_steps=1,
                  max_memory_bytes=20 * 2**30)
    line10 = log.log_train(step=10, consumed_samples=2560, consumed_tokens=2560 * 2048,
                           losses={"lm loss": 3.0, "mlm loss": 2.0, "loss": 3.5}, grad_norm=1.5,
                           step_time=2.0, **common)
    line20 = log.log_train(step=20, consumed_samples=5120, consumed_tokens=5120 * 2048,
                           losses={"lm loss": 2.5, "mlm loss": 1.0, "loss": 2.75}, grad_norm=None,
                           step_time=1.0, **common)
    val = log.log_validation(step=20, consumed_samples=5120,
                             losses={"lm loss": 2.0, "mlm loss": 1.0, "loss": 2.25})
    log.close()
    out = capsys.readouterr().out
    assert line10 in out and val in out
    # 524288 tokens / 2 s = 262144 tokens/s; x 6e9 / 8 devices = 196.6 TFLOP/s; / 989 = 19.9%
    assert "tokens/s 262,144" in line10 and "TFLOP/s/device 196.6" in line10
    assert "MFU 19.9%" in line10 and "mem 20.00 GiB" in line10 and "step 10/100" in line10
    assert "grad norm n/a" in line20 and "nonfinite 1" in line20
    assert "lm loss ppl 7.389" in val

    tb = _read_scalars(tmp_path)
    assert tb["lm loss"] == [(10, 3.0), (20, 2.5)]
    assert tb["lm loss vs samples"] == [(2560, 3.0), (5120, 2.5)]
    assert tb["mlm loss"][1] == (20, 1.0) and tb["loss"][0] == (10, 3.5)
    assert tb["learning-rate"][0] == (10, pytest.approx(8e-4))
    assert tb["grad-norm"] == [(10, 1.5)]  # None is not written
    assert tb["batch-size"] == [(10, 256.0), (20, 256.0)]
    assert tb["iteration-time"] == [(10, 2.0), (20, 1.0)]
    assert tb["tokens-per-sec"][1] == (20, 524288.0)
    assert tb["throughput"][0][1] == pytest.approx(6e9 * 262144 / 8 / 1e12, rel=1e-6)
    assert tb["mfu"][0][1] == pytest.approx(6e9 * 262144 / 8 / 989e12, rel=1e-6)
    assert tb["mem-max-allocated-bytes"][0] == (10, float(20 * 2**30))
    assert tb["nonfinite-iterations"][0] == (10, 1.0) and tb["skipped-iterations"][0] == (10, 0)
    assert tb["consumed-tokens"][1] == (20, float(5120 * 2048))
    assert tb["lm loss validation"] == [(20, 2.0)]
    assert tb["lm loss validation vs samples"] == [(5120, 2.0)]
    assert tb["lm loss validation ppl"][0][1] == pytest.approx(math.exp(2.0))
    assert tb["mlm loss validation"] == [(20, 1.0)]
    # every tag has its " vs samples" twin
    for tag in [t for t in tb if not t.endswith(" vs samples")]:
        assert tag + " vs samples" in tb


def test_logger_disabled_and_no_peak(tmp_path, capsys):
    off = MetricsLogger(tmp_path / "off", enabled=False, tensorboard=True, flops_per_token=1.0,
                        peak_flops=None, world_size=1, progress_total=None, progress_bar=False)
    kwargs = dict(step=1, consumed_samples=4, consumed_tokens=256, losses={"loss": 1.0}, lr=1e-3,
                  grad_norm=0.5, step_time=0.1, tokens_per_step=256, skipped_steps=0,
                  nonfinite_steps=0, max_memory_bytes=None)
    assert off.log_train(**kwargs) == ""
    off.close()
    assert not (tmp_path / "off").exists() and capsys.readouterr().out == ""
    on = MetricsLogger(tmp_path / "on", enabled=True, tensorboard=False, flops_per_token=1e6,
                       peak_flops=None, world_size=1, progress_total=None, progress_bar=True)
    line = on.log_train(**kwargs)
    on.close()
    assert "MFU n/a" in line and "mem n/a" in line and "tokens/s 2,560" in line
    assert not (tmp_path / "on" / "tensorboard").exists()
