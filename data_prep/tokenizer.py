"""Tokenizers behind one adapter interface, and SentencePiece training.

Special ids of a tokenizer trained by `train_sentencepiece` (fixed, see docs/DATA.md):
    0 = <pad>   1 = <unk>   2 = </s> (end of document, appended by the shard tool)   3 = [MASK]
There is no bos. [MASK] is a control symbol: the text "[MASK]" in a document is encoded as
ordinary characters, never as the mask id. `vocab_size` is the SentencePiece vocabulary size; the model pads its
embedding table itself.

GPT-2 layout (the reference checkpoints): `load_tokenizer("gpt2:/dir")` with /dir holding
tokenizer.json, or vocab.json + merges.txt, read through the optional `tokenizers` package.
vocab_size = 50264 (50257 padded), eod = pad = 50256 (<|endoftext|>), mask = 50263.
"""
import hashlib
import io
import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

from megatron_jrt.fsutil import atomic_write_bytes

PAD_ID, UNK_ID, EOD_ID, MASK_ID = 0, 1, 2, 3
MASK_PIECE = "[MASK]"
# Every trained vocabulary holds the 4 special pieces, the 256 byte-fallback pieces and each distinct
# character of the training text (character coverage 1.0), so no corpus can do with fewer than this.
MIN_VOCAB_SIZE = 4 + 256 + 1

GPT2_VOCAB_SIZE = 50264  # 50257 rounded up to a multiple of 8
GPT2_EOD_ID = 50256
GPT2_MASK_ID = 50263


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int   # rows of the embedding table to use (padded where the layout says so)
    eod_id: int
    mask_id: int
    pad_id: int
    hash: str         # sha256 hex of the vocabulary file bytes

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece .model. A model without [MASK] (or pad) gets them appended past its vocab."""

    def __init__(self, model_path: str | Path):
        import sentencepiece as spm

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} not found; train one with "
                                    "`jrt-prep tokenizer --input ... --out tok.model`")
        data = path.read_bytes()
        self.path = str(path)
        self.hash = hashlib.sha256(data).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from e
        n = self._sp.get_piece_size()
        self.vocab_size = n
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise ValueError(f"{path}: SentencePiece model has no eos piece, which this project uses as "
                             "end-of-document; retrain with eos_id set (jrt-prep tokenizer does this)")
        mask = self._sp.piece_to_id(MASK_PIECE)
        if mask == self._sp.unk_id() and self._sp.id_to_piece(mask) != MASK_PIECE:
            mask = self.vocab_size  # reserve one id past the vocabulary
            self.vocab_size += 1
        self.mask_id = mask
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: the shard tool parallelises over processes, one per core
        return self._sp.encode(texts, out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        n = self._sp.get_piece_size()
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < n])


class GPT2Tokenizer:
    """GPT-2 byte-level BPE in the reference checkpoints' layout, via the `tokenizers` package."""

    vocab_size = GPT2_VOCAB_SIZE
    eod_id = GPT2_EOD_ID
    pad_id = GPT2_EOD_ID
    mask_id = GPT2_MASK_ID

    def __init__(self, vocab_dir: str | Path | None):
        need = ("the GPT-2 layout needs the GPT-2 vocabulary on disk: pass 'gpt2:/path/to/dir' where the "
                "folder holds tokenizer.json, or vocab.json and merges.txt (from the Hugging Face 'gpt2' "
                "repository), and `pip install tokenizers`")
        if not vocab_dir:
            raise ValueError(f"no folder given; {need}")
        d = Path(vocab_dir)
        files = [d / "tokenizer.json"] if (d / "tokenizer.json").is_file() else [d / "vocab.json", d / "merges.txt"]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"missing {', '.join(missing)}; {need}")
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"the `tokenizers` package is not installed; {need}") from e
        if len(files) == 1:
            tok = tokenizers.Tokenizer.from_file(str(files[0]))
        else:
            tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(files[0]), str(files[1])))
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
        eot = tok.token_to_id("<|endoftext|>")
        if eot != GPT2_EOD_ID:
            raise ValueError(f"{d}: '<|endoftext|>' has id {eot}, expected {GPT2_EOD_ID}; not a GPT-2 vocabulary")
        top = max(tok.get_vocab(with_added_tokens=True).values())
        if top >= GPT2_MASK_ID:
            raise ValueError(f"{d}: vocabulary uses id {top}, which collides with [MASK] = {GPT2_MASK_ID}")
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes())
        self.hash = h.hexdigest()
        self.path = str(d)
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) < GPT2_MASK_ID], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`spec` is a path to a SentencePiece .model, or "gpt2:/dir" for the GPT-2 layout."""
    spec = str(spec)
    if spec == "gpt2" or spec.startswith("gpt2:"):
        return GPT2Tokenizer(spec[5:] or None)
    return SentencePieceTokenizer(spec)


class TrainingError(ValueError):
    """SentencePiece could not train on the input; the message is in jrt-prep's terms."""


# SentencePiece's messages name its own options (--vocab_size, --character_coverage, ...), which
# jrt-prep does not have; the ones a user can meet get a jrt-prep sentence instead.
_SPM_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_SPM_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _explain_training_error(message: str) -> str:
    """SentencePiece's error `message` as advice in jrt-prep's flags; sentences naming its options are dropped."""
    if m := _SPM_TOO_LARGE.search(message):
        return (f"--vocab-size {m[1]} is more than SentencePiece can learn from this input (at most {m[2]} "
                f"pieces); pass --vocab-size {m[2]} or less, or give it more text (more input, or a larger "
                "--max-sentences)")
    if m := _SPM_TOO_SMALL.search(message):
        return (f"--vocab-size {m[1]} is too small for this input: it needs {m[2]} pieces (4 special, 256 bytes "
                f"and each distinct character of the text); pass --vocab-size {m[2]} or more")
    sentences = re.split(r"(?<=\.)\s+", message.strip())
    return "SentencePiece training failed: " + " ".join(s for s in sentences if "--" not in s)


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"--vocab-size {vocab_size}: must be at least {MIN_VOCAB_SIZE} (4 special pieces, "
                         "256 byte pieces and the characters of the text); 8000-64000 is usual")


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a folder, and an existing file unless `overwrite` (as `jrt-prep shards` does for its folder)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; --out is the .model file to write, e.g. {out / 'tok.model'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")


def _training_lines(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    for doc in docs:
        for line in doc.split("\n"):
            line = line.strip()
            if line:
                yield line[:max_chars]


def train_sentencepiece(docs: Iterable[str], out: str | Path, vocab_size: int = 32000,
                        max_sentences: int = 2_000_000, num_threads: int = 2, seed: int = 0,
                        overwrite: bool = False) -> Path:
    """Train a BPE SentencePiece model on the lines of `docs`, written atomically to `out`.

    byte_fallback, split_digits and character_coverage=1.0, special ids as in the module docstring.
    At most `max_sentences` lines (sampled with a fixed seed) are used, which bounds the time.
    An existing `out` is replaced only with `overwrite`. Raises TrainingError when SentencePiece fails.
    """
    import sentencepiece as spm

    out = Path(out)
    _check_vocab_size(vocab_size)
    _check_out(out, overwrite)
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(docs, 8192), model_writer=buf,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            character_coverage=1.0, pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOD_ID, bos_id=-1,
            control_symbols=[MASK_PIECE], input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=16384, num_threads=num_threads,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece reports bad training input as RuntimeError
        raise TrainingError(_explain_training_error(str(e))) from e
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    tok = SentencePieceTokenizer(out)
    assert (tok.pad_id, tok.eod_id, tok.mask_id) == (PAD_ID, EOD_ID, MASK_ID), "special ids moved"
    return out
