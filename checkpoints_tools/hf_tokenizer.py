"""The run's tokenizer as Hugging Face tokenizer files that transformers loads offline.

`PreTrainedTokenizerFast.from_pretrained(OUT)` loads them without custom code;
`AutoTokenizer.from_pretrained(OUT)` needs `trust_remote_code=True` like the model, since it
reads config.json first, whose auto_map names the model's code (without it, transformers 5.x asks
on the terminal and loads them anyway after 15 s).

Both layouts become a `tokenizers` backend (tokenizer.json) behind transformers' generic
`PreTrainedTokenizerFast`, so loading needs neither custom code nor sentencepiece, and the ids
equal data_prep's:
- SentencePiece .model (BPE): converted by spm_backend.py, which follows the model's own
  normaliser settings; pad 0, unk 1, eos = end of document 2, [MASK] 3 (or one id past the
  vocabulary when the model lacks it, as data_prep reserves it).
- GPT-2 layout (`gpt2:/dir`): the byte-level BPE, ids 50257..50262 filled with placeholder
  tokens so that [MASK] is 50263; eos = pad = <|endoftext|> 50256.
Special-token text inside a document is encoded as ordinary text (`split_special_tokens`), as
data_prep does: "[MASK]" typed in a document is never the mask id. The files written are checked
against the training tokenizer (special ids, and the ids of a probe text) before any is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from data_prep.tokenizer import (GPT2_MASK_ID, MASK_PIECE, GPT2Tokenizer, SentencePieceTokenizer,
                                 Tokenizer)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Spaces (leading, doubled), digits, a newline, a tab and accents: where converters go wrong.
PROBE = " Read it twice:  the 2nd pass sees all 123 keys.\n\tÉtude, naïve café."


def _sentencepiece_backend(tokenizer: SentencePieceTokenizer):
    """tokenizers.Tokenizer encoding like the SentencePiece model, its special tokens but
    [MASK], and no placeholders."""
    from sentencepiece import sentencepiece_model_pb2

    from checkpoints_tools.spm_backend import sentencepiece_bpe_backend

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer.path).read_bytes())
    backend = sentencepiece_bpe_backend(proto, tokenizer.path)
    special = {"unk_token": proto.pieces[proto.trainer_spec.unk_id].piece,
               "eos_token": proto.pieces[tokenizer.eod_id].piece}
    if proto.trainer_spec.pad_id >= 0:
        special["pad_token"] = proto.pieces[proto.trainer_spec.pad_id].piece
    return backend, special, []


def _gpt2_backend(tokenizer: GPT2Tokenizer):
    """The GPT-2 BPE, its special tokens but [MASK], and the placeholders before [MASK]."""
    backend = tokenizer._tok  # the tokenizers.Tokenizer data_prep encodes with
    first_free = backend.get_vocab_size(with_added_tokens=True)
    fillers = [f"<|jrt_unused_{i}|>" for i in range(first_free, GPT2_MASK_ID)]
    return backend, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                     "unk_token": "<|endoftext|>"}, fillers


def hf_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """data_prep's `tokenizer` as a transformers tokenizer, checked against it; its
    save_pretrained writes tokenizer.json + tokenizer_config.json. ValueError naming the
    tokenizer when the two disagree."""
    from transformers import PreTrainedTokenizerFast

    build = _gpt2_backend if isinstance(tokenizer, GPT2Tokenizer) else _sentencepiece_backend
    backend, special, fillers = build(tokenizer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, split_special_tokens=True,
                                 clean_up_tokenization_spaces=False, **special)
    hf.add_tokens(fillers, special_tokens=True)  # [MASK] goes last: after the placeholders
    hf.add_special_tokens({"mask_token": MASK_PIECE})
    ids = {"eos": hf.eos_token_id, "mask": hf.mask_token_id}
    expected = {"eos": tokenizer.eod_id, "mask": tokenizer.mask_id}
    if ids != expected:
        raise ValueError(f"{tokenizer.path}: the Hugging Face tokenizer got special ids {ids}, the "
                         f"training tokenizer has {expected}; was it made by jrt-prep?")
    if hf.encode(PROBE, add_special_tokens=False) != tokenizer.encode(PROBE):
        raise ValueError(f"{tokenizer.path}: the Hugging Face tokenizer encodes {PROBE!r} "
                         "differently from the training tokenizer; convert with a tokenizer made "
                         "by `jrt-prep tokenizer` (--tokenizer)")
    return hf
