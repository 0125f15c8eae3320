"""Documents, tokenizers and grain pipelines of packed training and validation rows.

Contracts (others code against these):
  make_tokenizer(spec)      "bytes" | path/to/x.model (SentencePiece) | path/to/tokenizer.json
  list_documents(data, split)  the document texts of "train" or "validation", in a fixed order
  make_train_iterator(...)  a checkpointable grain DatasetIterator of packed batches, forever
  make_eval_batches(...)    a list of packed validation batches, deterministic

Every batch is a dict of numpy arrays, each [batch_size, seq_len]:
  tokens       int32    input token ids
  targets      int32    the next token of the same document (0 on padding)
  positions    int32    position of the input token in its document piece, from 0
  segment_ids  int32    1, 2, 3, ... per document piece within the row; 0 = padding
  loss_mask    float32  1.0 where the target is real, 0.0 on padding

Packing: a document of n tokens gives inputs = ids[:-1] and targets = ids[1:] (the shift is per
document, so a target never crosses a document boundary; documents with n < 2 are dropped).
A pair longer than seq_len is cut into pieces of seq_len (the last one shorter), each piece
with positions from 0. In training the pieces are shuffled in a window of about
SHUFFLE_WINDOW_TOKENS tokens, so that one long document does not fill whole batches. Pieces
are packed into rows of seq_len by grain's first-fit packer (FirstFitPackIterDataset), whose
convention is already ours: segment ids 1, 2, ... in each row, 0 and position 0 on padding,
targets 0 on padding. Only the rename to the keys above and the loss mask are added here.

Sharding is by rows: every process builds the same global stream of packed rows; shard s of
S takes rows s, s+S, s+2S, ... of it (global batches of S*b rows, each sliced [s::S]).
"""
from __future__ import annotations

import dataclasses
import functools
import glob as glob_lib
import gzip
import hashlib
import json
import logging
import os
import sysconfig
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import grain
import numpy as np

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
SOURCES = ("stdlib", "text", "jsonl", "parquet")

# Rows the first-fit packer fills before it emits them (and shuffles them, in training).
# It must not depend on the batch size or the shard count: the global row stream has to be
# the same whatever the sharding.
PACKING_BINS = 64
# In training, pieces of documents are shuffled in a window of about this many tokens
# before packing, so that the consecutive pieces of one long document spread over many steps
# instead of filling whole batches. A restore re-tokenizes the window, so it stays moderate.
SHUFFLE_WINDOW_TOKENS = 1 << 20
SHUFFLE_WINDOW_PIECES = (64, 8192)  # at least, at most
# The texts are in memory: grain's reader threads would only contend for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# --- tokenizers ---------------------------------------------------------------------------

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
        self._processor = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self._processor.get_piece_size())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        return self._processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` file (tokenizer.json); special tokens are not added."""

    def __init__(self, path: str):
        import tokenizers
        self.path = path
        self._tokenizer = tokenizers.Tokenizer.from_file(path)
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
        return SentencePieceTokenizer(spec) if spec.endswith(".model") else HuggingFaceTokenizer(spec)
    raise ValueError(f"data.tokenizer {spec!r}: expected 'bytes', a SentencePiece '.model' "
                     "file or a Hugging Face tokenizer '.json' file")


# --- documents ----------------------------------------------------------------------------

class DocumentList(list):
    """The document texts of a split (a plain list of str), plus `skipped_files`: the files
    of that split that were not valid UTF-8 and were left out."""

    def __init__(self, texts: Sequence[str] = (), skipped_files: Sequence[str] = ()):
        super().__init__(texts)
        self.skipped_files = list(skipped_files)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)


def in_validation(identity: str, validation_percent: int) -> bool:
    """Whether the document named `identity` is held out: a stable hash (not Python's
    salted hash()) of the name, taken modulo 100, is below validation_percent."""
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < validation_percent


def _wanted(identity: str, split: str, validation_percent: int) -> bool:
    return in_validation(identity, validation_percent) == (split == "validation")


def _stdlib_files() -> list[tuple[str, str]]:
    """(absolute path, relative path) of the interpreter's standard-library *.py files,
    sorted by relative path, without site-packages / dist-packages."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "dist-packages")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                files.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
    return sorted(files, key=lambda f: f[1])


def _glob_root(pattern: str) -> str:
    """The directory part of `pattern` before its first wildcard: names are made relative
    to it, so the split does not depend on where the corpus lies on disk."""
    parts = pattern.split(os.sep)
    for i, part in enumerate(parts):
        if glob_lib.has_magic(part):
            return os.sep.join(parts[:i]) or "."
    return os.path.dirname(pattern) or "."


def _matched_files(pattern: str) -> list[tuple[str, str]]:
    """(path, name relative to the glob's root) of the files `pattern` matches, sorted.
    Raises when the pattern is empty, names a missing file or matches nothing."""
    if not pattern:
        raise ValueError("data.path is empty: give a file or a glob of files")
    if not glob_lib.has_magic(pattern):
        if os.path.isdir(pattern):
            raise ValueError(f"data.path {pattern!r} is a directory: give a glob such as "
                             f"'{os.path.join(pattern, '**', '*.txt')}'")
        if not os.path.isfile(pattern):
            raise FileNotFoundError(f"data.path: no such file {pattern!r}")
    paths = sorted(p for p in glob_lib.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"data.path: the glob {pattern!r} matches no file")
    root = _glob_root(pattern)
    return sorted(((p, os.path.relpath(p, root).replace(os.sep, "/")) for p in paths),
                  key=lambda f: f[1])


def _read_utf8(path: str) -> str | None:
    """The file's text (gunzipped if it ends in .gz), or None if it is not valid UTF-8."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_texts(path: str, name: str, text: str, field: str) -> Iterator[tuple[str, str]]:
    """(identity "name:line", text) of each non-blank line of a JSONL file."""
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise ValueError(f"{path}:{line_number}: no field {field!r} (data.text_field)")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(f"{path}:{line_number}: field {field!r} is "
                             f"{type(value).__name__}, not a string")
        yield f"{name}:{line_number}", value


def _parquet_texts(path: str, name: str, field: str) -> Iterator[tuple[str, str]]:
    """(identity "name:row", text) of each row of a Parquet file (rows from 0; nulls are
    empty documents)."""
    import pyarrow.parquet as pq
    parquet_file = pq.ParquetFile(path)
    if field not in parquet_file.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (data.text_field); columns: "
                         f"{', '.join(parquet_file.schema_arrow.names)}")
    column = parquet_file.read(columns=[field]).column(field).to_pylist()
    for row, value in enumerate(column):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}: row {row} of column {field!r} is "
                             f"{type(value).__name__}, not a string")
        yield f"{name}:{row}", value or ""


def list_documents(data_config, split: str) -> DocumentList:
    """The document texts of `split` ("train" or "validation") of the configured source, in
    a deterministic order (files sorted by relative path, rows in file order).

    A document goes to validation when a hash of its identity (relative path of a file;
    "path:line" of a JSONL line, "path:row" of a Parquet row) modulo 100 is below
    data_config.validation_percent. Files that are not valid UTF-8 are left out, counted in
    the result's `skipped_files` and logged as a warning. Raises ValueError or
    FileNotFoundError, with one line naming the problem, for an unknown source, a missing
    path, a glob that matches nothing, malformed JSONL, a missing column/field, or a split
    without documents (including one whose every file failed to decode).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    source = data_config.source
    percent = data_config.validation_percent
    field = data_config.text_field
    if source == "stdlib":
        files = _stdlib_files()
    elif source in ("text", "jsonl", "parquet"):
        files = _matched_files(data_config.path)
    else:
        raise ValueError(f"data.source {source!r} is not one of {', '.join(SOURCES)}")

    texts, skipped = [], []
    for path, name in files:
        if source in ("stdlib", "text"):
            if not _wanted(name, split, percent):
                continue
            text = _read_utf8(path)
            if text is None:
                skipped.append(path)
            else:
                texts.append(text)
        elif source == "jsonl":
            text = _read_utf8(path)
            if text is None:
                skipped.append(path)
                continue
            texts.extend(t for identity, t in _jsonl_texts(path, name, text, field)
                         if _wanted(identity, split, percent))
        else:
            texts.extend(t for identity, t in _parquet_texts(path, name, field)
                         if _wanted(identity, split, percent))

    where = "the standard library" if source == "stdlib" else repr(data_config.path)
    if skipped:
        log.warning("data: skipped %d file(s) of %s (%s split) that are not valid UTF-8, "
                    "e.g. %s", len(skipped), where, split, skipped[0])
    if not texts:
        if skipped:
            raise ValueError(f"data: every file of the {split} split of {where} "
                             f"({len(skipped)}) failed to decode as UTF-8")
        raise ValueError(f"data: {source} source {where} has no documents in the {split} "
                         f"split (validation_percent={percent})")
    return DocumentList(texts, skipped)


# --- tokenizing, splitting, packing ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _TokenizeAndShift:
    """text -> {"inputs": ids[:-1], "targets": ids[1:]} (int32 [n - 1]); empty if n < 2."""
    tokenizer: Any

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int32)  # [n]
        if ids.shape[0] < 2:
            ids = ids[:0]
            return {"inputs": ids, "targets": ids}
        return {"inputs": ids[:-1], "targets": ids[1:]}


class _SplitPieces(grain.experimental.FlatMapTransform):
    """A shifted document -> pieces of at most seq_len tokens (none for an empty one)."""

    max_fan_out = 1  # not enforced by FlatMapIterDataset; the fan-out is unbounded here

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, pair: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        n = pair["inputs"].shape[0]
        return [{key: value[start:start + self.seq_len] for key, value in pair.items()}
                for start in range(0, n, self.seq_len)]


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packed features -> ours. Grain's segment ids are already 1, 2, ... with 0 on
    padding, and positions restart at 0 per piece (0 on padding)."""
    segment_ids = packed["inputs_segment_ids"].astype(np.int32)  # [seq_len]
    return {
        "tokens": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "segment_ids": segment_ids,
        "loss_mask": (segment_ids > 0).astype(np.float32),
    }


def _shuffle_window(texts: Sequence[str], seq_len: int) -> int:
    """Pieces in the training shuffle window: about SHUFFLE_WINDOW_TOKENS tokens, but not
    much more than an epoch (estimated with one token per character), within
    SHUFFLE_WINDOW_PIECES."""
    pieces_per_epoch = sum(-(-len(text) // seq_len) for text in texts)
    return int(np.clip(min(SHUFFLE_WINDOW_TOKENS // seq_len, pieces_per_epoch),
                       *SHUFFLE_WINDOW_PIECES))


def _packed_rows(documents: grain.MapDataset, tokenizer, seq_len: int, *,
                 shuffle_seed: int | None, shuffle_window: int = 0) -> grain.IterDataset:
    """Packed rows (dicts of [seq_len] arrays) of a dataset of texts. With a shuffle seed,
    pieces are shuffled in windows of `shuffle_window` and packed rows are shuffled among
    the packer's bins; with None the order is deterministic in the documents' order."""
    pairs = documents.map(_TokenizeAndShift(tokenizer)).to_iter_dataset(_READ_OPTIONS)
    pieces = grain.experimental.FlatMapIterDataset(pairs, _SplitPieces(seq_len))
    if shuffle_seed is not None:
        pieces = grain.experimental.WindowShuffleIterDataset(
            pieces, window_size=shuffle_window, seed=shuffle_seed + 1)
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=PACKING_BINS, seed=0 if shuffle_seed is None else shuffle_seed + 2,
        shuffle_bins=shuffle_seed is not None)
    return packed.map(_to_row)


def _shard_rows(batch: dict[str, np.ndarray], shard_index: int,
                shard_count: int) -> dict[str, np.ndarray]:
    """Rows shard_index, shard_index + shard_count, ... of a global batch."""
    return {key: value[shard_index::shard_count] for key, value in batch.items()}


def _check_shards(shard_index: int, shard_count: int, seq_len: int, batch_size: int) -> None:
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, shard_count={shard_count})")
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")


def _require_tokens(documents: Sequence[str], tokenizer, split: str) -> None:
    """Raise unless some document has at least 2 tokens (else an endlessly repeated
    dataset would never yield a row). Stops at the first such document, usually the first."""
    for text in documents:
        if len(tokenizer.encode(text)) >= 2:
            return
    raise ValueError(f"data: no document of the {split} split has 2 or more tokens")


def _epochs(documents: Sequence[str], seed: int) -> grain.MapDataset:
    """The documents repeated forever, each epoch in another order drawn from `seed`."""
    return grain.MapDataset.source(list(documents)).shuffle(seed=seed).repeat()


def make_train_iterator(data_config, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, split: str = "train"):
    """A grain DatasetIterator of packed batches ([batch_size, seq_len] each, keys as in the
    module docstring), forever: epochs repeat, the documents reshuffled each epoch by
    `seed`. Checkpointable with get_state()/set_state() and grain.checkpoint.

    batch_size is this shard's rows per step. The global stream of rows is the same for any
    shard_count and batch_size; shard s of S takes rows s, s+S, ... of it, so at each step the
    S shards together hold the rows a single shard with batch S*batch_size would.
    """
    _check_shards(shard_index, shard_count, seq_len, batch_size)
    documents = list_documents(data_config, split)
    _require_tokens(documents, tokenizer, split)
    rows = _packed_rows(_epochs(documents, seed), tokenizer, seq_len, shuffle_seed=seed,
                        shuffle_window=_shuffle_window(documents, seq_len))  # [seq_len] each
    batches = rows.batch(batch_size * shard_count, drop_remainder=True)  # [S * b, seq_len]
    batches = batches.map(functools.partial(
        _shard_rows, shard_index=shard_index, shard_count=shard_count))  # [b, seq_len]
    return iter(batches)


def _padding_row(seq_len: int) -> dict[str, np.ndarray]:
    """A row with no tokens: segment 0 and loss_mask 0 everywhere."""
    zeros = np.zeros([seq_len], np.int32)
    return {"tokens": zeros, "targets": zeros, "positions": zeros, "segment_ids": zeros,
            "loss_mask": zeros.astype(np.float32)}


def make_eval_batches(data_config, tokenizer, *, seq_len: int, batch_size: int,
                      max_batches: int, shard_index: int = 0,
                      shard_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Packed batches ([batch_size, seq_len] each) of the validation split, in a fixed order:
    at most max_batches (0: all). The global stream is cut into batches of
    shard_count * batch_size rows, the last one padded with empty rows (loss_mask 0), and
    shard s takes rows s, s+S, ... of each, so every shard gets the same number of batches.
    Raises ValueError if the split gives no rows."""
    _check_shards(shard_index, shard_count, seq_len, batch_size)
    if max_batches < 0:
        raise ValueError(f"max_batches must be >= 0, got {max_batches}")
    documents = list_documents(data_config, "validation")
    rows_per_batch = batch_size * shard_count
    rows = _packed_rows(grain.MapDataset.source(list(documents)), tokenizer, seq_len,
                        shuffle_seed=None)
    if max_batches:
        rows = grain.experimental.LimitIterDataset(rows, count=max_batches * rows_per_batch)
    rows = list(rows)
    if not rows:
        raise ValueError("data: the validation split gives no rows (every document has "
                         "fewer than 2 tokens)")
    rows += [_padding_row(seq_len)] * (-len(rows) % rows_per_batch)
    batches = []
    for start in range(0, len(rows), rows_per_batch):
        group = rows[start:start + rows_per_batch]
        batch = {key: np.stack([row[key] for row in group]) for key in group[0]}  # [S*b, L]
        batches.append(_shard_rows(batch, shard_index, shard_count))  # [b, seq_len]
    return batches
