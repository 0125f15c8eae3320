"""Token layouts for the sequence axis: zigzag (causal load balance) and its inverse.

With a causal mask and a contiguous split, device i's queries see i + 1 of the N key
slices, so the last device works N times as hard as the first. The zigzag layout (as in
Megatron-LM context parallelism) cuts the sequence into 2N chunks and gives device i the
chunks i and 2N-1-i: one early, one late, the same work everywhere.

The layout is a permutation of tokens along the length axis. Because attention masks are
computed from the positions and segment ids that travel with the tokens, permuting
tokens, targets, positions, segment ids and the loss mask together changes nothing else:
apply it once in the input pipeline, after targets are shifted (shifting after the
permutation would pair tokens with the wrong next token).

Any length: a batch whose length the layout does not divide (2N chunks for zigzag, N
slices for contiguous) is first padded at its end with tokens of segment
PAD_SEGMENT and no loss, which no real token attends to; `restore_layout` puts
the tokens back in order and drops that padding.
"""
from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from model.masking import PAD_SEGMENT
from parallel.choices import LAYOUTS

# what padding holds, per batch key (0 for any other key: token 0, position 0, no loss)
PAD_VALUES = {"segment_ids": PAD_SEGMENT}


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """Original token index at each slot of the zigzag layout: int [length].

    Slot range [i * length/N, (i+1) * length/N) (device i's slice) holds chunk i followed
    by chunk 2N-1-i of the original sequence.
    """
    if length % (2 * devices):
        raise ValueError(f"zigzag layout: length {length} is not divisible by 2 x "
                         f"{devices} devices")
    chunk = length // (2 * devices)
    chunks = np.arange(length).reshape(2 * devices, chunk)
    order = [np.concatenate([chunks[i], chunks[2 * devices - 1 - i]]) for i in range(devices)]
    return np.concatenate(order)


def inverse_order(order: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return inverse


def to_zigzag(batch: Mapping[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
    """Permute every [batch, length, ...] array of a batch into the zigzag layout."""
    return _permute(batch, devices, inverse=False)


def from_zigzag(batch: Mapping[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
    """Undo `to_zigzag`: arrays back in the original token order."""
    return _permute(batch, devices, inverse=True)


def _numpy_of(array):
    """numpy for host arrays, jax.numpy for jax arrays (also inside jit)."""
    return jnp if isinstance(array, jax.Array) else np


def _permute(batch, devices, inverse):
    out = {}
    for name, array in batch.items():
        order = zigzag_order(array.shape[1], devices)
        out[name] = _numpy_of(array).take(array, inverse_order(order) if inverse else order,
                                          axis=1)
    return out


def layout_length(length: int, layout: str, devices: int, parts: int | None = None) -> int:
    """The length of a `length`-token batch once laid out over `devices` sequence shards:
    rounded up to whole slices (devices) and, for zigzag, whole chunks (2 x parts; parts:
    the units the zigzag balances, default every device; the hybrid strategy balances
    its groups)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}: expected one of {LAYOUTS}")
    if devices == 1:
        return length
    multiple = devices
    if layout == "zigzag":
        multiple = math.lcm(devices, 2 * (parts or devices))
    return -(-length // multiple) * multiple


def pad_batch(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Every [batch, len, ...] array padded at its end to `length` (PAD_VALUES). The
    functions of this module take numpy arrays (the input pipeline) or jax arrays."""
    out = {}
    for name, array in batch.items():
        extra = length - array.shape[1]
        widths = [(0, 0)] * array.ndim
        widths[1] = (0, extra)
        out[name] = array if extra == 0 else _numpy_of(array).pad(
            array, widths, constant_values=PAD_VALUES.get(name, 0))
    return out


def apply_layout(batch: Mapping[str, np.ndarray], layout: str, devices: int,
                 parts: int | None = None) -> dict:
    """The batch in `layout` over `devices` sequence shards: padded to layout_length, then
    permuted (zigzag over `parts`, default the devices); the batch itself for 1 device."""
    length = next(iter(batch.values())).shape[1]
    batch = pad_batch(batch, layout_length(length, layout, devices, parts))
    if layout == "contiguous" or devices == 1 or (parts or devices) == 1:
        return batch
    return to_zigzag(batch, parts or devices)


def restore_layout(batch: Mapping[str, np.ndarray], layout: str, devices: int,
                   length: int, parts: int | None = None) -> dict:
    """The inverse of `apply_layout` for a batch that had `length` tokens: the original
    order, padding dropped."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "zigzag" and devices > 1 and (parts or devices) > 1:
        batch = from_zigzag(batch, parts or devices)
    return {name: array[:, :length] for name, array in batch.items()}
