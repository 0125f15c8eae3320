"""Tokenizers: bytes, SentencePiece (*.model) and Hugging Face tokenizers (tokenizer.json).

Every tokenizer has `vocab_size`, `encode(text) -> int32 ids` (no BOS/EOS added) and
`decode(ids) -> text`; `make_tokenizer(spec)` builds one from the `data.tokenizer` key.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import numpy as np

from util.errors import first_line


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, no BOS/EOS added."""

    def decode(self, ids) -> str:
        """Text of a sequence of ids."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, lossless on any text."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte tokenizer: ids must lie in [0, 255], got "
                             f"[{ids.min()}, {ids.max()}]")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model file (*.model)."""

    def __init__(self, path: str):
        import sentencepiece
        self.path = path
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as error:   # noqa: BLE001 - sentencepiece raises bare errors
            raise ValueError(f"data.tokenizer {path}: not a readable SentencePiece model "
                             f"({first_line(str(error)) or type(error).__name__})") from None
        self.vocab_size = int(self._processor.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def write_byte_tokenizer_json(path: str) -> str:
    """Write ByteTokenizer as a Hugging Face tokenizer.json: id i is byte i (0..255).

    A byte-level BPE without merges: the ByteLevel pre-tokenizer maps each UTF-8 byte to
    GPT-2's printable stand-in character, and the vocabulary gives that character the
    byte's value as id; the ByteLevel decoder maps back. So `tokenizers` (and transformers'
    PreTrainedTokenizerFast) encode any text to exactly ByteTokenizer's ids.
    """
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()            # the 256 stand-in characters
    stand_in = _bytes_to_unicode()
    assert sorted(alphabet) == sorted(stand_in.values())
    vocab = {stand_in[b]: b for b in range(256)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(path)
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the ByteLevel pre-tokenizer's)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` file (tokenizer.json); special tokens are not added."""

    def __init__(self, path: str):
        import tokenizers
        self.path = path
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as error:   # noqa: BLE001 - tokenizers raises bare Exceptions
            raise ValueError(f"data.tokenizer {path}: not a readable tokenizer.json "
                             f"({first_line(str(error)) or type(error).__name__})") from None
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tokenizer.decode(ids, skip_special_tokens=False)


def make_tokenizer(spec: str) -> Tokenizer:
    """"bytes", a SentencePiece "*.model" file or a Hugging Face "*.json" tokenizer file."""
    if spec == "bytes":
        return ByteTokenizer()
    if spec.endswith(".model") or spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data.tokenizer: no tokenizer file {spec!r}")
        if spec.endswith(".model"):
            return SentencePieceTokenizer(spec)
        return HuggingFaceTokenizer(spec)
    raise ValueError(f"data.tokenizer {spec!r}: expected 'bytes', a SentencePiece '.model' "
                     "file or a Hugging Face tokenizer '.json' file")
