"""jrt-convert to-hf and the Hugging Face JRT model (megatron_jrt/hf/).

One 2-rank launch trains configs/mock-tiny.yaml (jrt-tiny: prefix 16, window 8; sequences of
64) for 2 steps under three layouts and saves each: TP=1 (DP=2), TP=2, PP=2. Each checkpoint is
converted in this process without a process group; the HF model's logits must equal those of
megatron's own model loaded from the same checkpoint (megatron reshards it to TP=1 itself).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf_tiny import returned_cache
from tests.multiproc import launch

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mock-tiny.yaml")
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
VOCAB = 257  # mock_vocab_size 256 + the mask id; the embedding is padded to 264
SEQ = 64  # longer than the prefix (16) and the window (8)
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _train_layouts(root: Path) -> None:
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config

    for name, (tp, pp) in LAYOUTS.items():
        overrides = {"training.train_steps": 2, "training.eval_steps": 0,
                     "optimizer.decay_steps": 8, "logging.run_dir": str(root / name),
                     "logging.tensorboard": False, "checkpoint.save_dir": str(root / name / "ckpt"),
                     "checkpoint.save_interval": 2, "parallel.tensor_parallel": tp,
                     "parallel.pipeline_parallel": pp}
        cfg = load_config(CONFIG, [f"{k}={v}" for k, v in overrides.items()])
        init_distributed(tp, pp, seed=cfg.training.seed)
        train(cfg)  # init_distributed re-cuts the model-parallel groups for the next layout


def _megatron_logits(checkpoints: dict[str, Path], tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of megatron's model (TP=1, one rank) loaded from each checkpoint."""
    from megatron.core import dist_checkpointing

    from megatron_jrt.checkpoint import find_latest_complete, read_metadata
    from megatron_jrt.config import JRTModelConfig
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed(1, 1, seed=0)
    logits = {}
    for name, save_dir in checkpoints.items():
        path, _ = find_latest_complete(save_dir)
        cfg = JRTModelConfig(**read_metadata(path)["config"]["model"])
        model = build_model(cfg, cfg.to_transformer_config()).eval()
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
        model.load_state_dict(loaded["model"])
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        with torch.no_grad():
            logits[name] = model(tokens, positions, None)[..., :cfg.vocab_size]
    return logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_checkpoints")
    launch(_train_layouts, 2, root, timeout=300)
    return {name: root / name / "ckpt" for name in LAYOUTS}


@pytest.fixture(scope="module")
def converted(checkpoints, tmp_path_factory) -> dict[str, Path]:
    from checkpoints_tools.convert import to_hf

    root = tmp_path_factory.mktemp("hf_models")
    for name, save_dir in checkpoints.items():
        to_hf(save_dir, root / name, max_shard_size="200KB")
    return {name: root / name for name in checkpoints}


@pytest.fixture(scope="module")
def reference_logits(checkpoints) -> dict[str, torch.Tensor]:
    return launch(_megatron_logits, 1, checkpoints, TOKENS, in_process=True)[0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_logits_equal_megatron(layout, converted, reference_logits):
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    model = JRTForCausalLM.from_pretrained(converted[layout]).eval()
    with torch.no_grad():
        logits = model(TOKENS, use_cache=False).logits
    assert logits.shape == (2, SEQ, VOCAB)
    assert (logits - reference_logits[layout]).abs().max() <= 1e-4


def test_conversion_writes_a_sharded_custom_code_directory(converted):
    out = converted["tp2"]
    for name in ("config.json", "configuration_jrt.py", "modeling_jrt.py", "pla_kernels.py",
                 "generation_config.json", "model.safetensors.index.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_jrt.JRTConfig",
                                  "AutoModelForCausalLM": "modeling_jrt.JRTForCausalLM"}
    assert config["vocab_size"] == VOCAB and config["tie_word_embeddings"] is True
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1  # 200KB shards
    assert "lm_head.weight" not in weight_map  # tied: stored once


_OFFLINE_LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, GenerationMixin
model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True,
                                                   output_loading_info=True)
with torch.no_grad():
    logits = model(torch.load(sys.argv[2]), use_cache=False).logits
torch.save(logits, sys.argv[3])
print(json.dumps({"missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]),
                  "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
                  "generation_mixin": isinstance(model, GenerationMixin),
                  "megatron_imported": any(m.startswith("megatron") for m in sys.modules)}))
"""


def test_offline_load_with_remote_code(converted, reference_logits, tmp_path):
    torch.save(TOKENS, tmp_path / "tokens.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-c", _OFFLINE_LOAD, str(converted["pp2"]), str(tmp_path / "tokens.pt"),
         str(tmp_path / "logits.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"missing": [], "unexpected": [], "tied": True, "generation_mixin": True,
                      "megatron_imported": False}
    logits = torch.load(tmp_path / "logits.pt")
    assert (logits - reference_logits["pp2"]).abs().max() <= 1e-4


def test_cli_converts_the_newest_of_a_save_dir_and_names_bad_input(checkpoints, tmp_path,
                                                                   capsys):
    from checkpoints_tools.convert import main

    assert main(["to-hf", str(checkpoints["tp1"]), str(tmp_path / "out")]) == 0
    assert "step_0000002" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors").is_file()  # one file below 5GB
    assert main(["to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out2")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("jrt-convert: error:") and "nowhere" in error and "\n" not in error


def _random_model(initializer_range: float = 0.3):
    """jrt-tiny's architecture, random weights spread enough that greedy tokens vary."""
    from megatron_jrt.hf.configuration_jrt import JRTConfig
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    torch.manual_seed(0)
    config = JRTConfig(vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4,
                       layer_pattern="CPSC", prefix_length=16, swa_window=8,
                       initializer_range=initializer_range)
    return JRTForCausalLM(config).eval()


def test_generate_with_recurrent_cache_equals_recomputation():
    model, prompt = _random_model(), TOKENS[:1, :20]
    fed = []  # tokens read by each forward
    hook = model.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=16, do_sample=False)
    hook.remove()
    assert fed == [20] + [1] * 15  # the cache was used, not rebuilt
    sequence = prompt
    with torch.no_grad():
        for _ in range(16):
            next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(cached, sequence)
    assert len(set(sequence[0, 20:].tolist())) > 1


def test_cached_steps_equal_full_forward_past_window_and_prefix():
    model, sequence = _random_model(), TOKENS[:, :40]
    with torch.no_grad():
        full = model(sequence, use_cache=False).logits
        out = model(sequence[:, :16], use_cache=True)
        steps = [out.logits]
        for i in range(16, 40):
            out = model(sequence[:, i:i + 1], cache=returned_cache(out), use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4


def test_cache_refuses_to_continue_a_prompt_shorter_than_the_prefix():
    model = _random_model()
    out = model(TOKENS[:, :10])  # a plain forward of a short prompt works (use_cache default)
    with pytest.raises(ValueError, match="prefix_length=16"):
        model(TOKENS[:, 10:11], cache=returned_cache(out))
