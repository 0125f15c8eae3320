"""A tokenized corpus with random access: documents as slices of flat token arrays.

A shard is two arrays: `tokens` (every document's ids one after another, uint16 when the
vocabulary fits, else uint32) and `starts` (int64 [documents + 1], where each document
begins, then the total). A Corpus is one or more shards, documents numbered across them.
Built in memory from texts (the on-the-fly sources: stdlib, text, jsonl, parquet) or
memory-mapped from a prepared directory (data/prepare.py), it reads the same way, so the
training stream (data/stream.py) cannot tell the two apart; host memory for a prepared
corpus is 8 bytes per document (the lengths), not its tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding ids below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclasses.dataclass
class Shard:
    tokens: np.ndarray          # [total tokens] uint16 | uint32 (np.memmap when prepared)
    starts: np.ndarray          # [documents + 1] int64
    name: str = "memory"        # the file it was read from, for errors

    @property
    def documents(self) -> int:
        return len(self.starts) - 1


class Corpus:
    """Documents 0 .. N-1 over shards; `lengths` [N] int64 in tokens; `read(doc, start,
    stop)` -> int32 ids [stop - start] of one document."""

    def __init__(self, shards: Sequence[Shard], vocab_size: int):
        self.shards = list(shards)
        self.vocab_size = int(vocab_size)
        counts = [shard.documents for shard in self.shards]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # [shards + 1]
        self.lengths = (np.concatenate([np.diff(s.starts) for s in self.shards])
                        if self.shards else np.zeros(0, np.int64)).astype(np.int64)

    def __len__(self) -> int:
        return int(self._first[-1])

    @property
    def total_tokens(self) -> int:
        return int(self.lengths.sum())

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
