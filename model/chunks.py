"""Token chunks that split evenly over a sequence-sharded length.

A row of `length` tokens is cut into n chunks of `length / n` tokens, chunk j holding the
tokens j, j + n, j + 2n, ... So when the length axis is split over devices (mesh axis
`seq`, contiguous parts), every chunk takes an equal share of every device's part and
cutting or restoring moves no data between devices. Used by the chunked LM head + loss
(model/loss.py) and the chunked MLP (model/transformer.py).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def chunk_count(length: int, chunk_tokens: int, key: str = "model.loss_chunk_tokens") -> int:
    """How many chunks of `chunk_tokens` a row of `length` tokens is cut into (1: none, for
    chunk_tokens 0 or >= length); ValueError naming `key` unless the chunk divides the
    length."""
    if chunk_tokens <= 0 or chunk_tokens >= length:
        return 1
    if length % chunk_tokens:
        raise ValueError(f"{key} ({chunk_tokens}) must divide the length ({length})")
    return length // chunk_tokens


def to_chunks(x, chunks: int):
    """[b, l, ...] -> [chunks, b, l / chunks, ...]; chunk j = tokens j, j + chunks, ..."""
    b, l = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, l // chunks, chunks, *x.shape[2:]), 2, 0)


def from_chunks(y):
    """The inverse of to_chunks: [chunks, b, l / chunks, ...] -> [b, l, ...]."""
    chunks, b, per_chunk = y.shape[:3]
    return jnp.moveaxis(y, 0, 2).reshape(b, per_chunk * chunks, *y.shape[3:])


def map_chunks(fn: Callable, x, chunks: int):
    """fn applied to each chunk of x [b, l, ...] in turn (a lax.scan; fn per token, so the
    result is fn(x)), each chunk rematerialised in the backward pass: only one chunk's
    intermediates exist at a time."""
    if chunks == 1:
        return fn(x)
    step = jax.checkpoint(lambda chunk: fn(chunk))
    _, ys = jax.lax.scan(lambda _, chunk: (None, step(chunk)), None, to_chunks(x, chunks))
    return from_chunks(ys)
