"""Recurrent decoding reproduces the parallel forward; prompts and generation behave."""
import pytest
import torch

from megatron_jrt.generate import jrt_prompt_extraction, jrt_prompt_qa, read_twice_pad
from tests.multiproc import launch

SEQ, PROMPT = 40, 21  # prefix 16 <= PROMPT < SEQ; the SWA window (8) is crossed while decoding


def _recurrent_vs_parallel(tp: int):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.generate import greedy_generate
    from megatron_jrt.inference import RecurrentDecoder
    from megatron_jrt.model import build_model

    init_distributed(tensor_parallel=tp, seed=3)
    cfg = preset("jrt-tiny")
    model = build_model(cfg, cfg.to_transformer_config(tensor_parallel=tp)).eval()
    tokens = torch.randint(0, 300, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        positions = torch.arange(SEQ).unsqueeze(0).expand(2, -1)
        parallel = gather_from_tensor_model_parallel_region(model(tokens, positions, None))
    decoder = RecurrentDecoder(model, cfg.prefix_length)
    recurrent = [decoder.prefill(tokens[:, :PROMPT])]
    for t in range(PROMPT, SEQ):
        recurrent.append(decoder.step(tokens[:, t]))
    errors = [float((r - parallel[:, PROMPT - 1 + i]).abs().max())
              for i, r in enumerate(recurrent)]
    scale = float(parallel.abs().max())
    with pytest.raises(ValueError, match="shorter than the prefix"):
        decoder.prefill(tokens[:, :cfg.prefix_length - 1])

    # Greedy generation: each new token is the argmax of the parallel forward on the text so far.
    prompt = tokens[0, :5].tolist()
    generated = greedy_generate(model, prompt, prefix_length=cfg.prefix_length, max_new_tokens=6)
    text = read_twice_pad(prompt, cfg.prefix_length)
    expected = []
    with torch.no_grad():
        for _ in range(6):
            ids = torch.tensor([text])
            logits = gather_from_tensor_model_parallel_region(
                model(ids, torch.arange(len(text)).unsqueeze(0), None))
            expected.append(int(logits[0, -1].argmax()))
            text.append(expected[-1])
    stop = expected[2]  # generation ends with the first stop id it generates
    stopped = greedy_generate(model, prompt, prefix_length=cfg.prefix_length, max_new_tokens=6,
                              stop_ids={stop})
    assert stopped == expected[:expected.index(stop) + 1], (stopped, expected)
    return max(errors) / scale, generated, expected


@pytest.mark.parametrize("tp", [1, 2])
def test_recurrent_decoding_matches_the_parallel_forward(tp):
    if tp == 1:
        results = launch(_recurrent_vs_parallel, 1, 1, in_process=True)
    else:
        results = launch(_recurrent_vs_parallel, 2, 2)
    for relative_error, generated, expected in results:
        assert relative_error < 1e-5, relative_error
        assert generated == expected


def _each_mixer_prefill_then_step_matches_its_forward():
    from megatron_jrt.config import preset
    from megatron_jrt.distributed import init_distributed
    from megatron_jrt.inference import RecurrentDecoder
    from megatron_jrt.model import build_model

    init_distributed(seed=4)
    cfg = preset("jrt-tiny")
    model = build_model(cfg, cfg.to_transformer_config()).eval()
    hidden = torch.randn(SEQ, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    errors = {}
    with torch.no_grad():
        for kind, layer in zip(cfg.layer_pattern, model.decoder.layers):
            mixer = layer.self_attention
            out, bias = mixer(hidden, None, rotary_pos_emb=model.rotary_pos_emb(SEQ))
            parallel = out if bias is None else out + bias
            (out, bias), state = mixer.prefill(hidden[:PROMPT],
                                               rotary_pos_emb=model.rotary_pos_emb(PROMPT))
            recurrent = [out if bias is None else out + bias]
            for t in range(PROMPT, SEQ):
                (out, bias), state = mixer.step(
                    hidden[t:t + 1], state, rotary_pos_emb=model.rotary_pos_emb(1, offset=t))
                recurrent.append(out if bias is None else out + bias)
            error = float((torch.cat(recurrent) - parallel).abs().max() / parallel.abs().max())
            errors[kind] = max(errors.get(kind, 0.0), error)

    layer = model.decoder.layers[0]
    layer.self_attention = torch.nn.Identity()  # a mixer without prefill/step
    try:
        RecurrentDecoder(model, cfg.prefix_length)
        rejected = ""
    except TypeError as e:
        rejected = str(e)
    return errors, rejected


def test_each_mixer_prefill_then_step_matches_its_forward():
    errors, rejected = launch(_each_mixer_prefill_then_step_matches_its_forward, 1,
                              in_process=True)[0]
    assert sorted(errors) == ["C", "P", "S"], errors  # jrt-tiny has every kind of mixer
    for kind, relative_error in errors.items():
        assert relative_error < 1e-5, (kind, relative_error)
    assert "layer 1: Identity has no recurrent form" in rejected, rejected


def test_read_twice_pad_fills_the_prefix_then_repeats_the_prompt():
    assert read_twice_pad([1, 2, 3], 7) == [3, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert read_twice_pad([1, 2, 3, 4], 3) == [1, 2, 3, 4]  # long prompts are unchanged
    with pytest.raises(ValueError, match="empty"):
        read_twice_pad([], 4)


def test_jrt_prompt_templates_repeat_the_context():
    assert jrt_prompt_qa("Who?", "Ann met Bob.", "It was") == "Who? Ann met Bob.\nAnn met Bob. It was"
    assert jrt_prompt_extraction("Ann", "Ann is 30.") == "Information about Ann. Ann is 30.\nAnn is 30. Ann:"
