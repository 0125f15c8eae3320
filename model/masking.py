"""What every attention implementation shares: default positions and segment ids, the
mask built from them, shape checks and the grouped-query reshape.

Shapes: q [batch, q_len, q_heads, head_dim], k/v [batch, k_len, kv_heads, head_dim],
positions/segment_ids [batch, len] int32. A query attends to a key when their segment ids
are equal and, if causal, the key's position is not after its own; with a sliding window
of w tokens, also not more than w - 1 before it (without causal: |q - k| < w). Masks come
from these arrays, never from array indices, so packed rows and permuted (zigzag) layouts
need nothing special.

Any length: where a sequence must be padded (whole slices of a sequence-parallel mesh),
the padding carries the segment id PAD_SEGMENT (negative ids are reserved for it), so no
real token attends to it; its outputs are dropped.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Masked scores are set to this (finite, so that max/exp never see inf - inf).
MASKED = -1e30

# Segment id of padding (real segment ids are >= 0): isolated from every real token, it
# meets only other padding.
PAD_SEGMENT = int(np.iinfo(np.int32).min)


def default_positions_and_segments(q, positions, segment_ids):
    """Fill in `arange(length)` positions and all-zero segment ids where None."""
    batch, length = q.shape[0], q.shape[1]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    return positions, segment_ids


def attention_mask(q_pos, k_pos, q_seg, k_seg, causal: bool, window=None):
    """Which keys each query may see: bool [batch, q_len, k_len].

    `window`: None (no limit) or the sliding window w in tokens (a Python int, or a traced
    int32 scalar when layers differ): the key is at most w - 1 positions before the query
    (and, without causal, at most w - 1 after it)."""
    return visible_pairs(q_pos[:, :, None], k_pos[:, None, :], q_seg[:, :, None],
                         k_seg[:, None, :], causal, window)             # [b, q_len, k_len]


def visible_pairs(q_pos, k_pos, q_seg, k_seg, causal: bool, window=None):
    """The masking rule on arrays that broadcast query against key (attention_mask's
    [b, q, 1] x [b, 1, k], a kernel tile's [q, 1] x [1, k]): same segment, and with
    `causal` not after the query, and within `window`."""
    mask = q_seg == k_seg
    distance = q_pos - k_pos
    if causal:
        mask &= distance >= 0
    if window is not None:
        mask &= distance < window
        if not causal:
            mask &= distance > -window
    return mask


def check_window(window) -> None:
    """ValueError unless `window` is None or an integer >= 1 (traced values pass)."""
    if window is None or not isinstance(window, (int, float, np.integer, np.floating)):
        return
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"sliding_window must be None or an integer >= 1, got {window!r}")


def padded_length(length: int, multiple: int) -> int:
    """`length` rounded up to a multiple of `multiple`."""
    return -(-length // multiple) * multiple


def pad_axis1(x, length: int, value=0):
    """x [b, l, ...] padded with `value` along axis 1 to `length` tokens (x itself if it
    has them already)."""
    extra = length - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q [batch, len, q_heads, head_dim] and k, v [batch, len, "
            f"kv_heads, head_dim] of equal shapes; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q_heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k disagree on batch or head_dim: {q.shape} vs {k.shape}")


def group_queries(q, kv_heads):
    """[b, l, q_heads, d] -> [b, l, kv_heads, groups, d] (a reshape, no copy of K/V)."""
    b, length, hq, d = q.shape
    return q.reshape(b, length, kv_heads, hq // kv_heads, d)
