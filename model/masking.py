"""What every attention implementation shares: default positions and segment ids, the
mask built from them, shape checks and the grouped-query reshape.

Shapes: q [batch, q_len, q_heads, head_dim], k/v [batch, k_len, kv_heads, head_dim],
positions/segment_ids [batch, len] int32. A query attends to a key when their segment ids
are equal and, if causal, the key's position is not after its own: masks come from these
arrays, never from array indices, so packed rows and permuted (zigzag) layouts need nothing
special.
"""
from __future__ import annotations

import jax.numpy as jnp

# Masked scores are set to this (finite, so that max/exp never see inf - inf).
MASKED = -1e30


def default_positions_and_segments(q, positions, segment_ids):
    """Fill in `arange(length)` positions and all-zero segment ids where None."""
    batch, length = q.shape[0], q.shape[1]
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
        segment_ids = jnp.zeros((batch, length), jnp.int32)
    return positions, segment_ids


def attention_mask(q_pos, k_pos, q_seg, k_seg, causal: bool):
    """Which keys each query may see: bool [batch, q_len, k_len]."""
    mask = q_seg[:, :, None] == k_seg[:, None, :]
    if causal:
        mask &= q_pos[:, :, None] >= k_pos[:, None, :]
    return mask


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
    b, l, hq, d = q.shape
    return q.reshape(b, l, kv_heads, hq // kv_heads, d)
