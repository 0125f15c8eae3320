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
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

LAYOUTS = ("zigzag", "contiguous")


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


def _permute(batch, devices, inverse):
    out = {}
    for name, array in batch.items():
        order = zigzag_order(array.shape[1], devices)
        out[name] = np.take(array, inverse_order(order) if inverse else order, axis=1)
    return out


def apply_layout(batch: Mapping[str, np.ndarray], layout: str, devices: int) -> dict:
    """The batch in `layout` over `devices` sequence shards (identity for 1 device or
    the contiguous layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}: expected one of {LAYOUTS}")
    if layout == "contiguous" or devices == 1:
        return dict(batch)
    return to_zigzag(batch, devices)
