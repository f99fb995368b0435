"""jrt-convert from-hf (HF directory -> a model-only megatron checkpoint) and to-hf's tokenizer.

A random HF model of jrt-tiny's architecture (prefix 16, window 8, vocab 257 padded to 264) is
written as to-hf writes it, converted back to megatron without a process group, loaded by
megatron_jrt.checkpoint.load_checkpoint under TP=2 (logits must equal the HF model's) and
converted to HF again (tensors must be identical).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multiproc import launch

pytest.importorskip("transformers")

VOCAB, PADDED_VOCAB, SEQ = 257, 264, 40  # SEQ: past the prefix (16) and the window (8)
TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _random_hf_state(config) -> dict[str, torch.Tensor]:
    """Every tensor random (norms around 1), so that a swapped or transposed one shows."""
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    torch.manual_seed(0)
    state = JRTForCausalLM(config).state_dict()
    return {name: (1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(tensor)
            for name, tensor in state.items() if name != "lm_head.weight"}


def _hf_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_jrt.hf.modeling_jrt import JRTForCausalLM

    model = JRTForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def _write_random_hf_dir(out: Path, vocab_size: int) -> Path:
    """A random model of jrt-tiny's architecture, written as to-hf writes one (sharded)."""
    from checkpoints_tools.hf_dir import write_hf_dir
    from megatron_jrt.hf.configuration_jrt import JRTConfig

    config = JRTConfig(vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                       layer_pattern="CPSC", prefix_length=16, swa_window=8,
                       max_sequence_length=64)
    write_hf_dir(_random_hf_state(config), config, out, max_shard_size="200KB")
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return _write_random_hf_dir(tmp_path_factory.mktemp("hf") / "model", VOCAB)


@pytest.fixture(scope="module")
def checkpoint(hf_dir, tmp_path_factory) -> Path:
    from checkpoints_tools.convert import from_hf

    return from_hf(hf_dir, tmp_path_factory.mktemp("megatron") / "save_dir")


def test_from_hf_writes_a_verified_model_only_checkpoint(hf_dir, checkpoint):
    from checkpoints_tools.read_tensors import read_tensors
    from megatron_jrt.checkpoint import verify_checkpoint

    assert checkpoint.name == "step_0000000"
    assert (checkpoint.parent / "latest").read_text().strip() == "step_0000000"
    assert (json.loads((hf_dir / "config.json").read_text())["auto_map"]
            and (hf_dir / "model.safetensors.index.json").is_file())  # sharded input
    body = verify_checkpoint(checkpoint)
    assert (body["step"], body["consumed_samples"], body["optimizer_sharding"]) == (0, 0, None)
    assert body["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world": 1}
    model = body["config"]["model"]
    assert body["config"]["train"] == {}
    assert (model["vocab_size"], model["layer_pattern"], model["rotary_base"]) == (VOCAB, "CPSC",
                                                                                10000)
    assert not (checkpoint / "rank_state").exists()
    embedding = read_tensors(checkpoint, ["embedding.word_embeddings.weight"])
    embedding = embedding["embedding.word_embeddings.weight"]
    assert embedding.shape == (PADDED_VOCAB, 64) and not embedding[VOCAB:].any()


def test_hf_to_megatron_to_hf_gives_identical_tensors(hf_dir, checkpoint, tmp_path):
    from checkpoints_tools.convert import to_hf
    from checkpoints_tools.hf_dir import read_hf_dir

    to_hf(checkpoint.parent, tmp_path / "again")
    config, before = read_hf_dir(hf_dir)
    config_again, after = read_hf_dir(tmp_path / "again")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert config_again.to_diff_dict() == config.to_diff_dict()


def _tp2_logits(checkpoint: Path, tokens: torch.Tensor):
    """Logits of megatron's model at TP=2 after load_checkpoint of the model-only checkpoint."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_jrt.checkpoint import load_checkpoint, read_metadata
    from megatron_jrt.config import JRTModelConfig
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed(2, 1, seed=0)
    model_config = read_metadata(checkpoint)["config"]["model"]
    cfg = JRTModelConfig(**model_config)
    model = build_model(cfg, cfg.to_transformer_config(tensor_parallel=2)).eval()
    state = load_checkpoint(checkpoint, [model], None, None, expected_model_config=model_config)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    return logits[..., :cfg.vocab_size], state.step, state.layout_changed


def test_megatron_loads_it_under_tp2_with_the_hf_logits(hf_dir, checkpoint):
    ranks = launch(_tp2_logits, 2, checkpoint, TOKENS, timeout=240)
    expected = _hf_logits(hf_dir, TOKENS)
    for logits, step, layout_changed in ranks:
        assert (step, layout_changed) == (0, True)
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max() <= 1e-4


def test_from_hf_cli_refuses_a_used_save_dir_and_a_non_hf_dir(hf_dir, checkpoint, tmp_path,
                                                             capsys):
    from checkpoints_tools.convert import main

    assert main(["from-hf", str(hf_dir), str(tmp_path / "fresh")]) == 0
    assert "step_0000000" in capsys.readouterr().out
    for source, target, named in ((hf_dir, checkpoint.parent, "already holds"),
                                  (tmp_path, tmp_path / "other", "config.json")):
        assert main(["from-hf", str(source), str(target)]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith("jrt-convert: error:") and named in error and "\n" not in error


# ------------------------------------------------------------------------ to-hf --tokenizer

SENTENCE = "Read it twice: the 2nd pass sees  all 123 keys.\nÉtude [MASK] </s> <|endoftext|>"

# The ways to load a to-hf tokenizer with no question asked. AutoTokenizer reads config.json
# first, whose auto_map names custom code: without trust_remote_code, transformers 5.x asks on
# the terminal whether to run it (15 s, then loads it anyway); no file layout avoids that while
# the model's auto_map stays (README, Hugging Face export).
_OFFLINE_TOKENIZER = """
import json, sys
from pathlib import Path
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from megatron_jrt.generate_cli import load_codec

loaders = {"AutoTokenizer": lambda d: AutoTokenizer.from_pretrained(d, trust_remote_code=True),
           "PreTrainedTokenizerFast": PreTrainedTokenizerFast.from_pretrained,
           "jrt-generate": lambda d: load_codec(Path(d)).tokenizer}
for name, load in loaders.items():
    tok = load(sys.argv[1])
    ids = tok.encode(sys.argv[2])
    print(json.dumps({"loader": name, "ids": ids, "text": tok.decode(ids), "eos": tok.eos_token_id,
                      "pad": tok.pad_token_id, "mask": tok.mask_token_id}))
"""


def _run_in_terminal(args: list[str], env: dict, cwd: Path, timeout: float = 180
                     ) -> tuple[int, str]:
    """(exit status, output) of `args` with a pseudo-terminal as stdin, stdout and stderr, as
    from a user's shell: a question asked with input() shows in the output (and waits)."""
    import os
    import pty
    import selectors
    import subprocess
    import time

    leader, follower = pty.openpty()
    process = subprocess.Popen(args, stdin=follower, stdout=follower, stderr=follower, env=env,
                               cwd=cwd)
    os.close(follower)
    output, deadline = b"", time.monotonic() + timeout
    readable = selectors.DefaultSelector()  # epoll: select() fails on descriptors past 1023
    readable.register(leader, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if readable.select(1.0):
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    readable.close()
    os.close(leader)
    if process.poll() is None:
        process.kill()
    return process.wait(), output.decode(errors="replace")


def _gpt2_vocab_dir(root: Path) -> Path:
    """A GPT-2-shaped byte-level BPE (50257 ids, <|endoftext|> = 50256) with a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("Ġa", "l"), ("Ġal", "l")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), 50256)})
    vocab["<|endoftext|>"] = 50256
    root.mkdir()
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return root


@pytest.fixture(scope="module")
def tokenizer_specs(tmp_path_factory) -> dict[str, str]:
    from tests.smalldata import small_corpus

    root = tmp_path_factory.mktemp("tokenizers")
    _, sentencepiece_model = small_corpus(root, documents=50)
    return {"sentencepiece": str(sentencepiece_model),
            "gpt2": f"gpt2:{_gpt2_vocab_dir(root / 'gpt2')}"}


@pytest.mark.parametrize("layout", ["sentencepiece", "gpt2"])
def test_to_hf_tokenizer_loads_offline_with_the_training_ids(layout, tokenizer_specs, tmp_path):
    import os
    import sys

    from checkpoints_tools.convert import from_hf, main
    from data_prep.tokenizer import load_tokenizer

    training = load_tokenizer(tokenizer_specs[layout])
    source = _write_random_hf_dir(tmp_path / "random", training.vocab_size)
    checkpoint = from_hf(source, tmp_path / "save_dir")
    out = tmp_path / "hf"
    assert main(["to-hf", str(checkpoint), str(out), "--tokenizer",
                 tokenizer_specs[layout]]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    status, output = _run_in_terminal([sys.executable, "-c", _OFFLINE_TOKENIZER, str(out),
                                       SENTENCE], env, tmp_path)
    assert status == 0, output[-3000:]
    assert "Do you wish to run the custom code?" not in output
    loaded = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [entry["loader"] for entry in loaded] == ["AutoTokenizer", "PreTrainedTokenizerFast",
                                                     "jrt-generate"]
    for entry in loaded:
        assert entry["ids"] == training.encode(SENTENCE)
        assert entry["text"] == training.decode(training.encode(SENTENCE))
        assert (entry["eos"], entry["pad"], entry["mask"]) == (training.eod_id,
                                                               training.pad_id,
                                                               training.mask_id)
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (training.eod_id, training.pad_id)


@pytest.mark.parametrize("problem", ["not BPE", "encodes differently"])
def test_to_hf_refuses_a_tokenizer_it_cannot_reproduce(problem, tokenizer_specs, tmp_path,
                                                      monkeypatch, capsys):
    from sentencepiece import sentencepiece_model_pb2

    from checkpoints_tools import spm_backend
    from checkpoints_tools.convert import from_hf, main

    spec = tokenizer_specs["sentencepiece"]
    if problem == "not BPE":  # the same pieces read as a unigram model
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(spec).read_bytes())
        proto.trainer_spec.model_type = 1
        spec = str(tmp_path / "unigram.model")
        Path(spec).write_bytes(proto.SerializeToString())
    else:  # a converter that forgets the dummy prefix
        build = spm_backend.sentencepiece_bpe_backend

        def no_prefix(proto, path):
            proto.normalizer_spec.add_dummy_prefix = False
            return build(proto, path)

        monkeypatch.setattr(spm_backend, "sentencepiece_bpe_backend", no_prefix)
    checkpoint = from_hf(_write_random_hf_dir(tmp_path / "random", 1000), tmp_path / "save_dir")
    capsys.readouterr()
    assert main(["to-hf", str(checkpoint), str(tmp_path / "hf"), "--tokenizer", spec]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"jrt-convert: error: {spec}:") and "\n" not in error
    assert {"not BPE": "not BPE; train the tokenizer with `jrt-prep tokenizer`",
            "encodes differently": "differently from the training tokenizer"}[problem] in error
    assert not (tmp_path / "hf").exists()  # refused before anything is written


# ---------------------------------------------------------------- from-authors (section 7)

AUTHORS_D, AUTHORS_VOCAB, AUTHORS_PATTERN = 256, 264, "CPSCS"
AUTHORS_M, AUTHORS_WINDOW = 16, 16  # encoder region, keys looked back by SWA


def _authors_release(root: Path) -> Path:
    """Their files at a small size: GPT2Config-style config.json with hydra mixer dicts, and a
    pytorch_model.bin with `model.` prefixes, a metrics key and `conv1` names."""
    d, g = AUTHORS_D, torch.Generator().manual_seed(1)

    def rand(*shape, base=0.0):
        return base + 0.1 * torch.randn(*shape, generator=g)

    state = {"transformer.embeddings.word_embeddings.weight": rand(AUTHORS_VOCAB, d),
             "transformer.ln_f.weight": rand(d, base=1.0), "metrics.train.loss": torch.zeros(1)}
    for i, letter in enumerate(AUTHORS_PATTERN):
        layer = f"transformer.layers.{i}."
        state.update({f"{layer}norm1.weight": rand(d, base=1.0), f"{layer}norm2.weight": rand(d, base=1.0),
                      f"{layer}mlp.fc1.weight": rand(4 * d, d), f"{layer}mlp.fc2.weight": rand(d, 2 * d)})
        if letter == "P":
            state.update({f"{layer}mixer.{name}.weight": rand(256, d)
                          for name in ("proj_q", "proj_k", "proj_k_enc")})
            state.update({f"{layer}mixer.{name}.weight": rand(d, d)
                          for name in ("proj_v", "proj_v_enc", "out_proj")})
        elif letter == "S":
            state.update({f"{layer}mixer.Wqkv.weight": rand(3 * d, d),
                          f"{layer}mixer.out_proj.weight": rand(d, d)})
        else:
            state.update({f"{layer}mixer.in_proj.weight": rand(4 * d, d),
                          f"{layer}mixer.in_proj.bias": rand(4 * d),
                          f"{layer}mixer.conv1.conv.weight": rand(2 * d, 1, 3, base=0.3),
                          f"{layer}mixer.out_proj.weight": rand(d, 2 * d),
                          f"{layer}mixer.out_proj.bias": rand(d)})
    state["lm_head.weight"] = state["transformer.embeddings.word_embeddings.weight"].clone()
    config = {"model_type": "gpt2", "n_embd": d, "n_layer": len(AUTHORS_PATTERN),
              "vocab_size": AUTHORS_VOCAB, "n_positions": 64,
              "mixer": {"_target_": "based.models.mixers.convolution.BaseConv", "l_max": 64,
                        "kernel_sizes": 3},
              "alt_mixer": {"_target_": "based.models.mixers.prefix_linear_attention."
                                        "PrefixLinearAttention", "num_heads": 16,
                            "feature_dim": 16, "enc_length": AUTHORS_M},
              "alt_mixer_2": {"_target_": "based.models.mixers.slide_attention.SlidingAttention",
                              "num_heads": 16, "window_size": 2 * AUTHORS_WINDOW}}
    root.mkdir()
    torch.save({f"model.{key}": tensor for key, tensor in state.items()},
               root / "pytorch_model.bin")
    (root / "config.json").write_text(json.dumps(config))
    return root


def _rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def _taylor(x):
    f = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / 2 ** 0.5
    return torch.cat([x[..., :1] ** 0, x / f ** 0.25, x2 / f ** 0.5], dim=-1)


def _authors_forward(state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Their model's forward from section 7, written from the spec, quadratic and plain."""
    import torch.nn.functional as F

    d, h = AUTHORS_D, 16
    b, n = tokens.shape
    heads = lambda t: t.view(b, n, h, -1).transpose(1, 2)  # noqa: E731
    merge = lambda t: t.transpose(1, 2).reshape(b, n, -1)  # noqa: E731
    x = state["transformer.embeddings.word_embeddings.weight"][tokens]
    for i, letter in enumerate(AUTHORS_PATTERN):
        w = {k.split(f"layers.{i}.", 1)[1]: v for k, v in state.items() if f"layers.{i}." in k}
        u = _rms(x, w["norm1.weight"])
        if letter == "C":
            u1, u2 = (u @ w["mixer.in_proj.weight"].T + w["mixer.in_proj.bias"]).chunk(2, -1)
            conv = F.conv1d(u1.transpose(1, 2), w["mixer.conv.conv.weight"], padding=2,
                            groups=2 * d)[..., :n]
            mixed = (F.silu(conv).transpose(1, 2) * u2) @ w["mixer.out_proj.weight"].T \
                + w["mixer.out_proj.bias"]
        elif letter == "S":
            q, k, v = (heads(t) for t in (u @ w["mixer.Wqkv.weight"].T).split(d, -1))
            dh = q.shape[-1]
            inv = 1.0 / 10000 ** (torch.arange(0, dh, 2).float() / dh)
            angles = torch.outer(torch.arange(n).float(), inv).repeat(1, 2)
            rot = lambda t: t * angles.cos() + torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1) * angles.sin()  # noqa: E731
            q, k = rot(q), rot(k)
            i_, j_ = torch.arange(n)[:, None], torch.arange(n)[None]
            allowed = (j_ <= i_) & (j_ >= i_ - AUTHORS_WINDOW)
            scores = (q @ k.transpose(-1, -2) * dh ** -0.5).masked_fill(~allowed, float("-inf"))
            mixed = merge(scores.softmax(-1) @ v) @ w["mixer.out_proj.weight"].T
        else:
            q, k, k_enc = (_taylor(heads(u @ w[f"mixer.{p}.weight"].T))
                           for p in ("proj_q", "proj_k", "proj_k_enc"))
            v, v_enc = (heads(u @ w[f"mixer.{p}.weight"].T) for p in ("proj_v", "proj_v_enc"))
            m = min(AUTHORS_M, n)
            k_enc, v_enc = k_enc[:, :, :m], v_enc[:, :, :m]
            y = (q @ k.transpose(-1, -2)).tril() @ v + (q @ k_enc.transpose(-1, -2)) @ v_enc
            z = (q * (k_enc.sum(2, keepdim=True) + k.cumsum(2))).sum(-1, keepdim=True)
            mixed = merge(y / (z + 1e-12)) @ w["mixer.out_proj.weight"].T
        x = x + mixed
        value, gate = (_rms(x, w["norm2.weight"]) @ w["mlp.fc1.weight"].T).chunk(2, -1)
        x = x + (value * F.silu(gate)) @ w["mlp.fc2.weight"].T
    return _rms(x, state["transformer.ln_f.weight"]) @ state["lm_head.weight"].T


def _megatron_logits_1rank(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megatron.core import dist_checkpointing

    from megatron_jrt.checkpoint import read_metadata
    from megatron_jrt.config import JRTModelConfig
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.model import build_model

    init_distributed(1, 1, seed=0)
    cfg = JRTModelConfig(**read_metadata(checkpoint)["config"]["model"])
    model = build_model(cfg, cfg.to_transformer_config()).eval()
    model.load_state_dict(dist_checkpointing.load({"model": model.sharded_state_dict()},
                                                  str(checkpoint))["model"])
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)[..., :cfg.vocab_size]


def test_from_authors_matches_their_forward_and_loads_in_megatron(tmp_path):
    from checkpoints_tools.convert import main

    release = _authors_release(tmp_path / "release")
    tokens = torch.randint(0, AUTHORS_VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(2))
    state = {k.removeprefix("model.").replace("conv1", "conv"): v for k, v in
             torch.load(release / "pytorch_model.bin").items() if "metrics" not in k}
    with torch.no_grad():
        theirs = _authors_forward(state, tokens)
    assert main(["from-authors", str(release), str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["layer_pattern"], config["prefix_length"], config["swa_window"],
            config["eos_token_id"]) == (AUTHORS_PATTERN, AUTHORS_M, AUTHORS_WINDOW, 50256)
    assert (_hf_logits(tmp_path / "hf", tokens) - theirs).abs().max() <= 1e-4
    assert main(["from-authors", str(release), str(tmp_path / "mg"), "--megatron"]) == 0
    megatron = launch(_megatron_logits_1rank, 1, tmp_path / "mg" / "step_0000000", tokens,
                      in_process=True)[0]
    assert (megatron - theirs).abs().max() <= 1e-4


def _train_from(checkpoint: Path, run_dir: Path):
    import contextlib
    import io

    from tests import runs

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = runs.run_in_process(run_dir, **{"checkpoint.init_from": str(checkpoint.parent),
                                                 "training.train_steps": 2})
    return result.start_step, result.losses, printed.getvalue()


def test_jrt_train_starts_from_a_converted_checkpoint(checkpoint, tmp_path):
    """configs/mock-tiny.yaml is jrt-tiny with 256 + 1 tokens: the HF model's architecture."""
    start, losses, printed = launch(_train_from, 1, checkpoint, tmp_path / "run",
                                    in_process=True)[0]
    assert start == 0 and len(losses) == 2 and all(v == v and v < 20 for v in losses), losses
    assert f"initialised the model from {checkpoint}" in printed
