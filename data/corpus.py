"""A tokenized corpus with random access: documents as slices of flat token arrays.

A shard is two arrays: `tokens` (every document's ids one after another, uint16 when the
vocabulary fits, else uint32) and `starts` (int64 [documents + 1], where each document
begins, then the total). A Corpus is one or more shards, documents numbered across them.
Built in memory from texts (the on-the-fly sources: stdlib, text, jsonl, parquet) or
read from the files of a prepared directory (data/prepare.py: slices read by offset, not
memory-mapped, see TokenFile), it reads the same way, so the training stream
(data/stream.py) cannot tell the two apart; host memory for a prepared corpus is two int64
per training document (its start, and the stream's block table), not its tokens.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import threading
from typing import Iterable, Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


OPEN_FILES = 64            # token files a process keeps open for reading (least recently used go)
_files: collections.OrderedDict = collections.OrderedDict()    # TokenFile key -> descriptor
_files_pid = os.getpid()
_files_lock = threading.RLock()
_keys = itertools.count()


def _pread(key: int, path: str, size: int, offset: int) -> bytes:
    """Up to `size` bytes of `path` from `offset` (fewer at its end), through the
    descriptor of TokenFile `key`, opened when first read and kept open (at most
    OPEN_FILES per process)."""
    global _files_pid
    with _files_lock:         # held while reading: no other thread closes the descriptor
        if _files_pid != os.getpid():    # a forked child opens its own
            for descriptor in _files.values():
                os.close(descriptor)
            _files.clear()
            _files_pid = os.getpid()
        descriptor = _files.get(key)
        if descriptor is None:
            descriptor = _files[key] = os.open(path, os.O_RDONLY)
            if len(_files) > OPEN_FILES:
                os.close(_files.popitem(last=False)[1])
        else:
            _files.move_to_end(key)
        return os.pread(descriptor, size, offset)


def _close(key: int) -> None:
    with _files_lock:
        descriptor = _files.pop(key, None) if _files_pid == os.getpid() else None
        if descriptor is not None:
            os.close(descriptor)


class TokenFile:
    """A prepared shard's tokens [count] on disk, read a slice at a time (os.pread into a
    new array): `tokens[a:b]` as from an array. Not a memory map: the pages of a map that a
    process touches count in its resident memory and stay there, so a run reading at random
    over a map grows towards the size of the corpus; read this way, they are only in the
    kernel's page cache, and the process holds just the slices it asked for."""

    def __init__(self, path: str, dtype, count: int):
        self.path, self.dtype, self.count = path, np.dtype(dtype), int(count)
        self._key = next(_keys)

    def __len__(self) -> int:
        return self.count

    def __reduce__(self):          # pickled: another process's TokenFile, with a key of its own
        return TokenFile, (self.path, self.dtype, self.count)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError(f"{self.path}: read a slice of tokens, not {index!r}")
        start, stop, step = index.indices(self.count)
        if step != 1:
            raise ValueError(f"{self.path}: slices of tokens have step 1")
        if stop <= start:
            return np.zeros(0, self.dtype)
        size = self.dtype.itemsize
        data = _pread(self._key, self.path, (stop - start) * size, start * size)
        return np.frombuffer(data, self.dtype, count=len(data) // size)

    def __del__(self):
        try:
            _close(self._key)
        except Exception:  # noqa: BLE001 - at interpreter shutdown the module may be half gone
            pass


@dataclasses.dataclass
class Shard:
    tokens: np.ndarray          # [total tokens] uint16 | uint32 (a TokenFile when prepared)
    starts: np.ndarray          # [documents + 1] int64
    name: str = "memory"        # the file it was read from, for errors

    @property
    def documents(self) -> int:
        return len(self.starts) - 1


class Corpus:
    """Documents 0 .. N-1 over shards; `lengths` [N] int64 in tokens; `read(doc, start,
    stop)` -> int32 ids [stop - start] of one document.

    The shards' `starts` are the only per-document arrays held: `lengths` is computed from
    them at each access (a new array; the training stream keeps none of it), and
    `lengths_of(docs)` gives the lengths of some documents only."""

    def __init__(self, shards: Sequence[Shard], vocab_size: int):
        self.shards = list(shards)
        self.vocab_size = int(vocab_size)
        counts = [shard.documents for shard in self.shards]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [shards + 1]

    @property
    def lengths(self) -> np.ndarray:
        out = np.empty(len(self), np.int64)
        for chunk, first in zip(self.length_chunks(), self._first):
            out[first:first + len(chunk)] = chunk
        return out

    def length_chunks(self):
        """The lengths shard by shard (int64 arrays, new), without an [N] array at once."""
        for shard in self.shards:
            yield np.diff(shard.starts).astype(np.int64, copy=False)

    def lengths_of(self, docs) -> np.ndarray:
        """Token counts [len(docs)] int64 of the documents `docs` (as lengths[docs])."""
        docs = np.asarray(docs, np.int64)
        shard_of = np.searchsorted(self._first, docs, side="right") - 1
        out = np.empty(len(docs), np.int64)
        for shard_index in np.unique(shard_of):
            where = shard_of == shard_index
            local = docs[where] - self._first[shard_index]
            starts = self.shards[shard_index].starts
            out[where] = starts[local + 1] - starts[local]
        return out

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def total_tokens(self) -> int:
        return sum(int(shard.starts[-1]) - int(shard.starts[0]) for shard in self.shards)

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        shard_index = int(np.searchsorted(self._first, doc, side="right") - 1)
        shard = self.shards[shard_index]
        local = doc - int(self._first[shard_index])
        begin, end = int(shard.starts[local]), int(shard.starts[local + 1])
        stop = end - begin if stop is None else stop
        ids = np.asarray(shard.tokens[begin + start:begin + stop], dtype=np.int32)
        if ids.size != stop - start:
            raise ValueError(f"{shard.name}: truncated: document {local} needs tokens "
                             f"{begin + start}..{begin + stop}, the file has {len(shard.tokens)}")
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"{shard.name}: corrupt: token id {int(ids.max())} in document "
                             f"{local} is not below the vocabulary size {self.vocab_size}")
        return ids

    def documents(self) -> Iterable[np.ndarray]:
        """Every document's ids, in order (read one at a time)."""
        for doc in range(len(self)):
            yield self.read(doc)


def shard_from_documents(documents: Iterable[np.ndarray], vocab_size: int,
                         name: str = "memory") -> Shard:
    """One in-memory shard of token arrays."""
    arrays = [np.asarray(d) for d in documents]
    starts = np.zeros(len(arrays) + 1, np.int64)
    starts[1:] = np.cumsum([a.size for a in arrays])
    tokens = (np.concatenate(arrays) if arrays else np.zeros(0)).astype(token_dtype(vocab_size))
    return Shard(tokens, starts, name)


def corpus_from_texts(texts: Sequence[str], tokenizer) -> Corpus:
    """The on-the-fly corpus: `texts` tokenized now, held in memory."""
    return Corpus([shard_from_documents((tokenizer.encode(t) for t in texts),
                                        tokenizer.vocab_size)], tokenizer.vocab_size)
