"""Documents, tokenizers and grain pipelines of packed training and validation rows.

Contracts (others code against these):
  make_tokenizer(spec)      "bytes" | path/to/x.model (SentencePiece) | path/to/tokenizer.json
  list_documents(data, split)  the document texts of "train" or "validation", in a fixed order
  make_train_iterator(...)  a checkpointable grain DatasetIterator of packed batches, forever
  make_eval_batches(...)    a list of packed validation batches, deterministic
  retrieval_mix(...)        the validated synthetic-retrieval mix of the data config, or None

Every batch is a dict of numpy arrays, each [batch_size, seq_len]:
  tokens       int32    input token ids
  targets      int32    the next token of the same document (0 on padding)
  positions    int32    position of the input token in its document piece, from 0
  segment_ids  int32    1, 2, 3, ... per document piece within the row; 0 = padding
  loss_mask    float32  the target's loss weight: 0.0 on padding, 1.0 on real targets
                        (data.retrieval_answer_weight on synthetic answers; see below)

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

Retrieval mix (data.retrieval_fraction > 0; training split only, validation stays pure
corpus): each epoch of the N corpus documents also holds M = max(1, round(N * f / (1 - f)))
synthetic retrieval documents, so a share M / (N + M) ~= f of the documents is synthetic.
The epoch is the indices 0 .. N+M-1, shuffled (per epoch, by the seed) like the corpus
alone; index i < N is corpus document i, index N + j is synthetic document j of that epoch,
made on demand by retrieval.make_sample from (seed, epoch, j): task uniform over
data.retrieval_tasks (or in proportion to data.retrieval_task_weights), length uniform over
[min_length, max_length], depth uniform in [0, 1).
A synthetic document is already token ids, prompt + answer (length tokens), and goes through
the same shift and packing as text: inputs = ids[:-1], targets = ids[1:], and since
length <= seq_len it is never split, so its answer tokens are the targets right after the
question's last token. Those answer targets weigh data.retrieval_answer_weight in the loss
(loss_mask; default 1): the answers are a few tokens in hundreds, and raising their weight
is what lets a small model learn to retrieve in a short run (configs/retrieval.py).
Everything before packing is a random-access grain MapDataset, so
the iterator state is still one index and a restore regenerates the same samples.
Sample seeds are drawn from [2^32, 2^63): make_grid's evaluation seeds are uint32, so no
training sample is an evaluation sample.
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
import re
import sysconfig
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import grain
import numpy as np

from train import retrieval

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
class SyntheticDocument:
    """A synthetic retrieval document: its token ids (prompt + answer, int32 [length]) and
    how many of the last ones are the answer."""
    ids: np.ndarray
    answer_tokens: int


@dataclasses.dataclass(frozen=True)
class _TokenizeAndShift:
    """document -> {"inputs": ids[:-1], "targets": ids[1:], "weights": loss weights}
    (int32, int32, float32 [n - 1]); empty if n < 2. A document is a text (encoded here) or
    a SyntheticDocument (its ids used as they are, not decoded and encoded again), whose
    answer targets weigh `answer_weight`; every other target weighs 1."""
    tokenizer: Any
    answer_weight: float = 1.0

    def __call__(self, document: str | SyntheticDocument) -> dict[str, np.ndarray]:
        answer_tokens = 0
        if isinstance(document, SyntheticDocument):
            ids = document.ids.astype(np.int32, copy=False).reshape(-1)  # [n]
            answer_tokens = document.answer_tokens
        else:
            ids = np.asarray(self.tokenizer.encode(document), dtype=np.int32)  # [n]
        if ids.shape[0] < 2:
            ids = ids[:0]
            return {"inputs": ids, "targets": ids, "weights": ids.astype(np.float32)}
        weights = np.ones([ids.shape[0] - 1], np.float32)    # [n - 1], one per target
        if answer_tokens:
            weights[-answer_tokens:] = self.answer_weight    # the answer is the last targets
        return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights}


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
        # the targets' loss weights: 0 on padding (packed with zeros), else 1 but for the
        # answers of synthetic documents (data.retrieval_answer_weight)
        "loss_mask": np.where(segment_ids > 0, packed["weights"], 0.0).astype(np.float32),
    }


def _shuffle_window(texts: Sequence[str], seq_len: int, extra_pieces: int = 0) -> int:
    """Pieces in the training shuffle window: about SHUFFLE_WINDOW_TOKENS tokens, but not
    much more than an epoch (estimated with one token per character, plus `extra_pieces`
    per epoch: the synthetic documents, one piece each), within SHUFFLE_WINDOW_PIECES."""
    pieces_per_epoch = sum(-(-len(text) // seq_len) for text in texts) + extra_pieces
    return int(np.clip(min(SHUFFLE_WINDOW_TOKENS // seq_len, pieces_per_epoch),
                       *SHUFFLE_WINDOW_PIECES))


def _packed_rows(documents: grain.MapDataset, tokenizer, seq_len: int, *,
                 shuffle_seed: int | None, shuffle_window: int = 0,
                 answer_weight: float = 1.0) -> grain.IterDataset:
    """Packed rows (dicts of [seq_len] arrays) of a dataset of documents (texts, or token
    arrays: see _TokenizeAndShift). With a shuffle seed, pieces are shuffled in windows of
    `shuffle_window` and packed rows are shuffled among the packer's bins; with None the
    order is deterministic in the documents' order."""
    pairs = documents.map(_TokenizeAndShift(tokenizer, answer_weight)).to_iter_dataset(
        _READ_OPTIONS)
    pieces = grain.experimental.FlatMapIterDataset(pairs, _SplitPieces(seq_len))
    if shuffle_seed is not None:
        pieces = grain.experimental.WindowShuffleIterDataset(
            pieces, window_size=shuffle_window, seed=shuffle_seed + 1)
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces, length_struct={"inputs": seq_len, "targets": seq_len, "weights": seq_len},
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


# --- synthetic retrieval documents ---------------------------------------------------------

# Training sample seeds lie in [2^32, 2^63); retrieval.make_grid's are uint32 (< 2^32).
_SYNTHETIC_SEEDS = (1 << 32, 1 << 63)
# Tag of the synthetic documents' random streams (so they do not share the shuffle's).
_SYNTHETIC_STREAM = 0x52455452  # "RETR"
# Seeds make_sample is tried with when checking data.retrieval_min_length (the minimum can
# depend on the seed with tokenizers whose digit tokenization varies), and how many seeds a
# synthetic document may draw before a length that is too short for all of them is an error.
_MINIMUM_PROBES = 8
_SYNTHETIC_ATTEMPTS = 16


@dataclasses.dataclass(frozen=True)
class RetrievalMix:
    """The validated retrieval keys of a data config for one training length.

    fraction    share of the training documents that are synthetic, in (0, 1)
    tasks       retrieval task names, a non-empty subset of retrieval.TASKS
    min_length  the shortest sample, in tokens (prompt + answer)
    max_length  the longest sample, <= seq_len
    answer_weight  loss weight of a sample's answer targets (every other target: 1)
    task_probabilities  probability of each task, or None: uniform
    """
    fraction: float
    tasks: tuple[str, ...]
    min_length: int
    max_length: int
    answer_weight: float = 1.0
    task_probabilities: tuple[float, ...] | None = None

    def synthetic_per_epoch(self, corpus_documents: int) -> int:
        """M synthetic documents to go with N corpus documents in one epoch: the nearest
        integer to N * f / (1 - f), at least 1, so the share M / (N + M) is about f."""
        return max(1, int(round(corpus_documents * self.fraction / (1.0 - self.fraction))))


def _task_minimum(task: str, tokenizer, length: int) -> int | None:
    """The minimum length of `task` with this tokenizer when `length` is below it (the
    largest over a few seeds), else None."""
    minimum = None
    for probe in range(_MINIMUM_PROBES):
        try:
            retrieval.make_sample(task, tokenizer, length=length, depth=0.5,
                                  seed=_SYNTHETIC_SEEDS[0] + probe)
        except ValueError as e:
            found = re.search(r"minimum length (\d+)", str(e))
            if found is None:
                raise ValueError(f"data.retrieval_tasks: the {task} task cannot be made with "
                                 f"this tokenizer: {e}") from None
            minimum = max(minimum or 0, int(found.group(1)))
    return minimum


def retrieval_mix(data_config, tokenizer, *, seq_len: int,
                  l_max: int | None = None) -> RetrievalMix | None:
    """The synthetic-retrieval mix of data_config for training rows of seq_len tokens, or
    None when data.retrieval_fraction is 0 (the other retrieval keys are then not read).

    data.retrieval_min_length 0 means l_max // 4 (l_max None: seq_len), and
    data.retrieval_max_length 0 means seq_len. Raises ValueError, naming the key, for a
    fraction outside [0, 1), tasks that are empty, repeated or not in retrieval.TASKS,
    lengths that are negative or not min <= max <= seq_len, or a minimum length below what
    a task needs with this tokenizer (needle + question + answer).
    """
    fraction = getattr(data_config, "retrieval_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.number)):
        raise ValueError(f"data.retrieval_fraction must be a number in [0, 1), got {fraction!r}")
    fraction = float(fraction)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.retrieval_fraction must lie in [0, 1), got {fraction}")
    if fraction == 0.0:
        return None

    tasks = getattr(data_config, "retrieval_tasks", retrieval.TASKS)
    if isinstance(tasks, str) or not isinstance(tasks, (tuple, list)):
        raise ValueError(f"data.retrieval_tasks must be a tuple of task names from "
                         f"{retrieval.TASKS}, got {tasks!r}")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in retrieval.TASKS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        raise ValueError(f"data.retrieval_tasks must be distinct names from "
                         f"{retrieval.TASKS}, at least one, got {tasks!r}")

    raw = {}
    for key in ("retrieval_min_length", "retrieval_max_length"):
        value = getattr(data_config, key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"data.{key} must be an int >= 0 (0: the default), got {value!r}")
        raw[key] = int(value)
    l_max = seq_len if l_max is None else int(l_max)
    min_length = raw["retrieval_min_length"] or l_max // 4
    max_length = raw["retrieval_max_length"] or seq_len
    described = (f"data.retrieval_min_length {min_length}"
                 + ("" if raw["retrieval_min_length"] else f" (0: l_max // 4, l_max {l_max})")
                 + f", data.retrieval_max_length {max_length}"
                 + ("" if raw["retrieval_max_length"] else " (0: the training seq_len)"))
    if not min_length <= max_length <= seq_len:
        raise ValueError(f"data.retrieval_min_length <= data.retrieval_max_length <= seq_len "
                         f"({seq_len}) does not hold: {described}")
    for task in tasks:
        minimum = _task_minimum(task, tokenizer, min_length)
        if minimum is not None:
            raise ValueError(f"data.retrieval_min_length is too short for the {task} task: "
                             f"{described}, but a {task} sample needs at least {minimum} "
                             f"tokens with this tokenizer; set data.retrieval_min_length >= "
                             f"{minimum} (or leave {task} out of data.retrieval_tasks)")
    answer_weight = getattr(data_config, "retrieval_answer_weight", 1.0)
    if (isinstance(answer_weight, bool) or not isinstance(answer_weight, (int, float, np.number))
            or not 0.0 < float(answer_weight) < float("inf")):
        raise ValueError(f"data.retrieval_answer_weight must be a finite number > 0, got "
                         f"{answer_weight!r}")
    task_weights = getattr(data_config, "retrieval_task_weights", None)
    probabilities = None
    if task_weights is not None:
        numbers = (isinstance(task_weights, (tuple, list))
                   and all(isinstance(w, (int, float, np.number)) and not isinstance(w, bool)
                           for w in task_weights))
        if (not numbers or len(task_weights) != len(tasks)
                or not all(0.0 <= float(w) < float("inf") for w in task_weights)
                or sum(task_weights) <= 0):
            raise ValueError(f"data.retrieval_task_weights must be one finite weight >= 0 per "
                             f"task of data.retrieval_tasks {tasks}, not all 0, got "
                             f"{task_weights!r}")
        total = float(sum(task_weights))
        probabilities = tuple(float(w) / total for w in task_weights)
    return RetrievalMix(fraction=fraction, tasks=tasks, min_length=min_length,
                        max_length=max_length, answer_weight=float(answer_weight),
                        task_probabilities=probabilities)


def synthetic_sample(mix: RetrievalMix, tokenizer, *, seed: int, epoch: int,
                     index: int) -> retrieval.Sample:
    """Synthetic document `index` of `epoch` of the mixed training stream of `seed`: task
    (by mix.task_probabilities, else uniform), length and depth (uniform) drawn from a
    random stream keyed by (seed, epoch, index), then retrieval.make_sample with a sample
    seed in [2^32, 2^63) from the same stream. If the length is too short for that seed
    (tokenizers whose digit tokenization varies), a new sample seed is drawn,
    deterministically."""
    key = [int(seed) & ((1 << 64) - 1), int(epoch), int(index), _SYNTHETIC_STREAM]
    rng = np.random.default_rng(key)
    if mix.task_probabilities is None:
        task = mix.tasks[int(rng.integers(len(mix.tasks)))]
    else:
        task = mix.tasks[int(rng.choice(len(mix.tasks), p=mix.task_probabilities))]
    length = int(rng.integers(mix.min_length, mix.max_length + 1))
    depth = float(rng.random())
    for _ in range(_SYNTHETIC_ATTEMPTS):
        sample_seed = int(rng.integers(*_SYNTHETIC_SEEDS))
        try:
            return retrieval.make_sample(task, tokenizer, length=length, depth=depth,
                                         seed=sample_seed)
        except ValueError as e:
            if "too short" not in str(e):
                raise
            error = e
    raise ValueError(f"data: synthetic document {index} of epoch {epoch}: {error} (for "
                     f"{_SYNTHETIC_ATTEMPTS} seeds); raise data.retrieval_min_length")


class _MixedDocument(grain.transforms.MapWithIndex):
    """(global index, index within the epoch) -> corpus text or synthetic token ids: i < N is
    corpus document i, N + j is synthetic document j of epoch global_index // (N + M)."""

    def __init__(self, documents: Sequence[str], synthetic: int, mix: RetrievalMix,
                 tokenizer, seed: int):
        self._documents = list(documents)
        self._epoch_length = len(self._documents) + synthetic
        self._mix, self._tokenizer, self._seed = mix, tokenizer, seed

    def __repr__(self) -> str:  # not the whole corpus
        return (f"_MixedDocument({len(self._documents)} documents, "
                f"{self._epoch_length - len(self._documents)} synthetic per epoch)")

    def map_with_index(self, index: int, item: int) -> str | np.ndarray:
        item = int(item)
        if item < len(self._documents):
            return self._documents[item]
        sample = synthetic_sample(self._mix, self._tokenizer, seed=self._seed,
                                  epoch=index // self._epoch_length,
                                  index=item - len(self._documents))
        ids = np.concatenate([sample.prompt, sample.answer]).astype(np.int32)  # [length]
        return SyntheticDocument(ids, int(sample.answer.size))


def _mixed_epochs(documents: Sequence[str], seed: int, mix: RetrievalMix,
                  tokenizer) -> grain.MapDataset:
    """Like _epochs, with mix.synthetic_per_epoch(N) synthetic documents (token arrays) in
    each epoch, shuffled in with the corpus by index."""
    synthetic = mix.synthetic_per_epoch(len(documents))
    indices = grain.MapDataset.range(len(documents) + synthetic).shuffle(seed=seed).repeat()
    return indices.map_with_index(_MixedDocument(documents, synthetic, mix, tokenizer, seed))


def make_train_iterator(data_config, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        shard_index: int = 0, shard_count: int = 1, split: str = "train",
                        l_max: int | None = None):
    """A grain DatasetIterator of packed batches ([batch_size, seq_len] each, keys as in the
    module docstring), forever: epochs repeat, the documents reshuffled each epoch by
    `seed`. Checkpointable with get_state()/set_state() and grain.checkpoint.

    batch_size is this shard's rows per step. The global stream of rows is the same for any
    shard_count and batch_size; shard s of S takes rows s, s+S, ... of it, so at each step the
    S shards together hold the rows a single shard with batch S*batch_size would.

    With data.retrieval_fraction > 0 and split "train", synthetic retrieval documents are
    mixed in (module docstring; retrieval_mix validates the keys). l_max (None: seq_len) is
    the curriculum's l_max, only read for data.retrieval_min_length = 0 (l_max // 4).
    """
    _check_shards(shard_index, shard_count, seq_len, batch_size)
    mix = (retrieval_mix(data_config, tokenizer, seq_len=seq_len, l_max=l_max)
           if split == "train" else None)
    documents = list_documents(data_config, split)
    _require_tokens(documents, tokenizer, split)
    if mix is None:
        epochs, synthetic = _epochs(documents, seed), 0
    else:
        epochs = _mixed_epochs(documents, seed, mix, tokenizer)
        synthetic = mix.synthetic_per_epoch(len(documents))
    rows = _packed_rows(epochs, tokenizer, seq_len, shuffle_seed=seed,
                        shuffle_window=_shuffle_window(documents, seq_len, synthetic),
                        answer_weight=1.0 if mix is None else mix.answer_weight)
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
