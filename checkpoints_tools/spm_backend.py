"""A SentencePiece BPE model as a `tokenizers.Tokenizer` that encodes and decodes like it.

Built here from the model's protobuf with the `tokenizers` library alone, following the model's
own settings: BPE merges ranked by the score of the merged piece, the normaliser spec (its
precompiled character map, extra-whitespace removal, whitespace escaping, the dummy prefix, which
SentencePiece adds even before a leading space), user-defined pieces emitted whole, byte fallback.
transformers 5.24's `SpmConverter.build_tokenizer_from_spm_proto` does the same; before 5.24 that
helper drops the merges and the normaliser settings, and the tokenizer.json written under
5.17-5.23 encoded differently from the training tokenizer (tests/test_hf_convert.py). Doing it
here makes `jrt-convert to-hf` write the same file under every transformers version.
"""
from __future__ import annotations

import re

BPE_MODEL_TYPE = 2  # sentencepiece_model.proto TrainerSpec.ModelType
NORMAL, USER_DEFINED = 1, 4  # ModelProto.SentencePiece.Type
SPACE = "\u2581"  # SentencePiece's escaped space


def _merges(proto) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the best-scored merged piece first
    (then the lower id), as SentencePiece BPE applies them."""
    normal = {piece.piece: (piece.score, index) for index, piece in enumerate(proto.pieces)
              if piece.type == NORMAL}
    ranked = sorted((-score, index, token[:cut], token[cut:])
                    for token, (score, index) in normal.items() for cut in range(1, len(token))
                    if token[:cut] in normal and token[cut:] in normal)
    return [(left, right) for _, _, left, right in ranked]


def sentencepiece_bpe_backend(proto, path: str):
    """tokenizers.Tokenizer of SentencePiece ModelProto `proto` (a BPE model read from `path`)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    if proto.trainer_spec.model_type != BPE_MODEL_TYPE:
        raise ValueError(f"{path}: a SentencePiece model of type "
                         f"{proto.trainer_spec.model_type}, not BPE; train the tokenizer with "
                         "`jrt-prep tokenizer` (BPE) to convert it")
    spec = proto.normalizer_spec
    user_defined = [piece.piece for piece in proto.pieces if piece.type == USER_DEFINED]
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    backend = Tokenizer(BPE(vocab=vocab, merges=_merges(proto),
                            unk_token=proto.trainer_spec.unk_piece, fuse_unk=True,
                            byte_fallback=proto.trainer_spec.byte_fallback,
                            ignore_merges=bool(user_defined)))

    steps = []  # the normaliser, in SentencePiece's order
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only: newlines stay
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if spec.add_dummy_prefix:  # Metaspace adds no prefix before a leading SPACE; SentencePiece does
        steps.append(normalizers.Replace(Regex(rf"\A{SPACE}"), SPACE * 2))
    backend.normalizer = normalizers.Sequence(steps)

    splits = []
    if spec.add_dummy_prefix:
        splits.append(pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always",
                                               split=False))
    if user_defined:  # emitted whole, never merged with their neighbours
        pattern = "|".join(re.escape(piece) for piece in sorted(user_defined, key=len,
                                                                 reverse=True))
        splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if splits:
        backend.pre_tokenizer = pre_tokenizers.Sequence(splits)

    steps = [decoders.Replace(SPACE, " ")]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:  # fuse first: Strip applies to each token
        steps += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif proto.trainer_spec.byte_fallback:
        steps.append(decoders.Fuse())
    backend.decoder = decoders.Sequence(steps)
    return backend
