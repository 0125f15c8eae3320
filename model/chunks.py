"""Token chunks that split evenly over a sequence-sharded length.

A row of `length` tokens is cut into n chunks of `length / n` tokens, chunk j holding the
tokens j, j + n, j + 2n, ... So when the length axis is split over devices (mesh axis
`seq`, contiguous parts) and n divides each device's part, every chunk takes an equal share
of every device's part and cutting or restoring moves no data between devices. Any length
works: `chunk_count` prefers a count that divides the length, and a length that none near
the requested size divides is padded to whole chunks (the padding's results are dropped).
Used by the chunked LM head + loss (model/loss.py) and the chunked MLP
(model/transformer.py).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from model.masking import pad_axis1


def chunk_count(length: int, chunk_tokens: int) -> int:
    """How many chunks of at most about `chunk_tokens` a row of `length` tokens is cut
    into (1: none, for chunk_tokens 0 or >= length): the smallest n >= length /
    chunk_tokens that divides the length, if one is at most twice that; else that
    smallest count, with padding."""
    if chunk_tokens <= 0 or chunk_tokens >= length:
        return 1
    fewest = -(-length // chunk_tokens)
    for n in range(fewest, 2 * fewest + 1):
        if length % n == 0:
            return n
    return fewest


def to_chunks(x, chunks: int):
    """[b, l, ...] -> [chunks, b, ceil(l / chunks), ...]; chunk j = tokens j, j + chunks,
    ...; a length that `chunks` does not divide is padded with zeros first."""
    b, length = x.shape[:2]
    per_chunk = -(-length // chunks)
    x = pad_axis1(x, per_chunk * chunks)
    return jnp.moveaxis(x.reshape(b, per_chunk, chunks, *x.shape[2:]), 2, 0)


def from_chunks(y, length: int | None = None):
    """The inverse of to_chunks: [chunks, b, l / chunks, ...] -> [b, length, ...] (the
    first `length` tokens; default all)."""
    chunks, b, per_chunk = y.shape[:3]
    x = jnp.moveaxis(y, 0, 2).reshape(b, per_chunk * chunks, *y.shape[3:])
    return x if length is None else x[:, :length]


def map_chunks(fn: Callable, x, chunks: int):
    """fn applied to each chunk of x [b, l, ...] in turn (a lax.scan; fn per token, so the
    result is fn(x)), each chunk rematerialised in the backward pass: only one chunk's
    intermediates exist at a time."""
    if chunks == 1:
        return fn(x)
    step = jax.checkpoint(lambda chunk: fn(chunk))
    _, ys = jax.lax.scan(lambda _, chunk: (None, step(chunk)), None, to_chunks(x, chunks))
    return from_chunks(ys, x.shape[1])
