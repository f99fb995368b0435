"""jrt-convert to-hf, jrt-ckpt inspect and read_as_hf on checkpoints of the DeepSpeed engine.

The tiny preset (fp32, gloo) trains 2 steps under ZeRO-1 and ZeRO-2 in one process and ZeRO-3
in two (the case whose weights are sharded over the ranks), saving at the end. At that save
each run also records the logits of its own model, the DeepSpeed engine's module (ZeRO-3
gathers its parameters for the forward), on fixed tokens; the HF model converted from the
checkpoint (consolidated by DeepSpeed's zero_to_fp32) must give the same logits. Skipped where
deepspeed is not installed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.multiproc import launch
from tests.test_deepspeed_engine import BASE, needs_deepspeed

pytest.importorskip("transformers")
pytestmark = needs_deepspeed

VOCAB = 257  # mock_vocab_size 256 + the mask id; the embedding is padded to 264
SEQ = 48  # data.seq_length: past the prefix (16) and the window (8)
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
RUNS = {"zero1": (1, 1), "zero2": (2, 1), "zero3": (3, 2)}  # name: (ZeRO stage, processes)


def _engine_logits(engine) -> torch.Tensor:
    """Logits of the DeepSpeed engine's module on TOKENS (collective under ZeRO-3)."""
    positions = torch.arange(SEQ).unsqueeze(0).expand_as(TOKENS)
    engine.eval()
    try:
        with torch.no_grad():
            return engine(TOKENS, positions, None)[..., :VOCAB].clone()
    finally:
        engine.train()


def _train_and_capture(root: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Train each run of `names` for 2 steps into root/NAME/ckpt; the logits of its model
    at its (last) save."""
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.train import train
    from megatron_jrt.train_config import load_config
    from megatron_jrt.training.engines.deepspeed_checkpoint import DeepSpeedSaver

    real_save, captured = DeepSpeedSaver.save, {}
    for name in names:
        def save_and_capture(self, step, _name=name, **kwargs):
            real_save(self, step, **kwargs)
            captured[_name] = _engine_logits(self._engine.engine)

        DeepSpeedSaver.save = save_and_capture
        try:
            cfg = load_config(None, BASE + [
                "training.engine=deepspeed", f"training.zero_stage={RUNS[name][0]}",
                "training.train_steps=2", "optimizer.warmup_steps=1", "training.eval_steps=0",
                f"logging.run_dir={root / name}", f"checkpoint.save_dir={root / name / 'ckpt'}"])
            init_distributed(seed=cfg.training.seed)
            train(cfg)
        finally:
            DeepSpeedSaver.save = real_save
    return captured


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """name: (save_dir, the logits of the trained model at its save)."""
    root = tmp_path_factory.mktemp("deepspeed_runs")
    logits = launch(_train_and_capture, 1, root, ["zero1", "zero2"], timeout=300)[0]
    ranks = launch(_train_and_capture, 2, root, ["zero3"], timeout=300)
    assert torch.equal(ranks[0]["zero3"], ranks[1]["zero3"])
    logits.update(ranks[0])
    return {name: (root / name / "ckpt", logits[name]) for name in RUNS}


@pytest.mark.parametrize("name", list(RUNS))
def test_hf_logits_equal_the_deepspeed_model(name, runs, tmp_path, capsys):
    from checkpoints_tools.convert import main
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    save_dir, reference = runs[name]
    # ZeRO-3 through its save_dir (`latest`), the others through the checkpoint directory
    source = save_dir if name == "zero3" else save_dir / "step_0000002"
    assert main(["to-hf", str(source), str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out.strip() == (f"jrt-convert: {save_dir / 'step_0000002'} -> "
                                               f"{tmp_path / 'hf'}")
    model = JRTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.dtype == torch.float32  # ZeRO's fp32 master weights
    with torch.no_grad():
        logits = model(TOKENS, use_cache=False).logits
    assert logits.shape == (2, SEQ, VOCAB)
    assert (logits - reference).abs().max() <= 1e-5


def test_inspect_lists_the_tensors_of_a_zero3_checkpoint(runs, capsys):
    from checkpoints_tools.cli import main

    assert main(["inspect", str(runs["zero3"][0])]) == 0
    out = capsys.readouterr().out
    assert "engine: deepspeed (ZeRO stage 3)" in out
    assert "layout: TP=1 PP=1 DP=2 (world size 2)" in out
    assert "tensors: 33\n" in out and "\n  embedding.word_embeddings.weight [264, 64] float32\n" in out
    assert out.rstrip().endswith("verified: ok (sizes and sha256)")


def _rewritten(checkpoint: Path, out: Path, **fields) -> Path:
    """A copy of `checkpoint` whose checkpoint.json body has `fields` replaced (still valid)."""
    from megatron_jrt.checkpoint.store import METADATA, read_metadata, write_metadata

    shutil.copytree(checkpoint, out)
    body = {**read_metadata(checkpoint), **fields}
    (out / METADATA).unlink()
    write_metadata(out, body)
    assert json.loads((out / METADATA).read_text())["body"] == body
    return out


def test_impossible_or_unknown_checkpoints_are_one_line_errors(runs, tmp_path, capsys):
    from checkpoints_tools.convert import main

    checkpoint = runs["zero2"][0] / "step_0000002"
    cases = {
        "tp2": ({"layout": {"tp": 2, "pp": 1, "dp": 1, "world": 2}}, "TP=2"),
        "fsdp": ({"engine": "fsdp"}, "engine 'fsdp'"),
        "megatron": ({"engine": "megatron"}, "no torch_dist metadata"),
    }
    for case, (fields, expected) in cases.items():
        bad = _rewritten(checkpoint, tmp_path / case, **fields)
        assert main(["to-hf", str(bad), str(tmp_path / f"{case}_hf")]) == 1
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"jrt-convert: error: {bad}: ") and expected in error, error
        assert not (tmp_path / f"{case}_hf").exists()
