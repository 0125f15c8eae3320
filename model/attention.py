"""Attention: the dense reference, the blockwise (memory-linear) kernel, and the layer.

Shapes used throughout:
  q            [batch, q_len, q_heads, head_dim]
  k, v         [batch, k_len, kv_heads, head_dim]    (q_heads = kv_heads * groups)
  positions    [batch, len] int32: global position of each token (data, not indices)
  segment_ids  [batch, len] int32: the document each token belongs to

A query attends to a key when their segment ids are equal and, if causal, the key's
position is not after the query's. Masks are built from these arrays only, never from
array indices, so packed rows, the zigzag layout of ring attention and evaluation at any
length all use the same code. A query row that sees no key at all returns zeros.

Grouped-query attention never repeats K/V per query head: queries are reshaped to
[batch, len, kv_heads, groups, head_dim] and contracted against the shared K/V head.

The blockwise kernel follows the online-softmax formulation of Milakov & Gimelshein (2018)
and the FlashAttention-2 backward pass (Dao 2023): the forward keeps running max and
denominator per query row, the backward recomputes probabilities block by block from the
saved log-sum-exp. `blockwise_forward` / `blockwise_backward` work on one query chunk
against one key/value chunk with separate positions for each, so ring attention
(parallel/ring_attention.py) reuses them for every hop of its ring.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Masked scores are set to this (finite, so that max/exp never see inf - inf).
_MASKED = -1e30


# ----------------------------------------------------------------------------- masks
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


def _check_shapes(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention expects q [batch, len, q_heads, head_dim] and k, v [batch, len, "
            f"kv_heads, head_dim] of equal shapes; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q_heads ({q.shape[2]}) must be a multiple of kv_heads ({k.shape[2]})")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k disagree on batch or head_dim: {q.shape} vs {k.shape}")


def _group_queries(q, kv_heads):
    """[b, l, q_heads, d] -> [b, l, kv_heads, groups, d] (a reshape, no copy of K/V)."""
    b, l, hq, d = q.shape
    return q.reshape(b, l, kv_heads, hq // kv_heads, d)


# ------------------------------------------------------------------ dense reference
def dot_product_attention(q, k, v, *, positions=None, segment_ids=None, causal=True):
    """Reference attention: materialises the [q_len, k_len] score matrix.

    Scores and softmax run in float32 whatever the input dtype; the output has q's dtype.
    """
    _check_shapes(q, k, v)
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    if k.shape[1] != q.shape[1]:
        raise ValueError("self-attention: q and k must have the same length")
    kv_heads, head_dim = k.shape[2], k.shape[3]
    qg = _group_queries(q, kv_heads)                                  # [b, lq, hk, g, d]
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                        preferred_element_type=jnp.float32) / np.sqrt(head_dim)
    mask = attention_mask(positions, positions, segment_ids, segment_ids, causal)
    mask = mask[:, None, None]                                        # [b, 1, 1, lq, lk]
    scores = jnp.where(mask, scores, _MASKED)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)     # empty rows -> 0
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


# ------------------------------------------------------------- blockwise building blocks
# Blocks are read and written in place with dynamic slices along the length axis, so no
# blocked copy of q, k, v or of the gradients is ever made.
def _check_block(length: int, block: int, name: str) -> None:
    if length % block:
        raise ValueError(f"{name} length {length} is not a multiple of its block size {block}")


def _block(x, index, size: int):
    """Block `index` of `size` tokens along the length axis (axis 1)."""
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=1)


def _put_block(x, part, index, size: int):
    return jax.lax.dynamic_update_slice_in_dim(x, part, index * size, axis=1)


def fit_block(length: int, block: int) -> int:
    """The block size used for a sequence: `block`, or the whole length if shorter."""
    return min(block, length)


def blockwise_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal: bool,
                      block_q: int, block_k: int):
    """Attention of one query chunk over one key/value chunk, in blocks.

    Returns (out, lse, tiles): out [b, lq, q_heads, d] in float32, normalised over this
    chunk's keys only; lse [b, lq, q_heads] float32, the log-sum-exp of the visible scores
    (-inf for rows that see no key here, whose out is 0); tiles, an int32 count of the
    (query block, key block) tiles actually computed. Two chunks' results merge with
    `merge_partial_attention`. Tiles with no visible pair are skipped (`lax.cond`), not
    computed and discarded.
    """
    b, lq, hq, d = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    groups = hq // kv_heads
    _check_block(lq, block_q, "query")
    _check_block(lk, block_k, "key")
    scale = 1.0 / np.sqrt(d)

    def query_block(i, carry):
        out, lse, tiles = carry
        qb = _group_queries(_block(q, i, block_q), kv_heads)             # [b, bq, hk, g, d]
        qpb, qsb = _block(q_pos, i, block_q), _block(q_seg, i, block_q)  # [b, bq]

        def key_block(j, state):
            kb, vb = _block(k, j, block_k), _block(v, j, block_k)       # [b, bk, hk, d]
            mask = attention_mask(qpb, _block(k_pos, j, block_k), qsb,
                                  _block(k_seg, j, block_k), causal)     # [b, bq, bk]

            def compute(state):
                acc, row_max, row_sum, tiles = state
                # tiles in the matmul's natural layout [b, hk, g, bq, bk]: no relayout copy
                s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb,
                               preferred_element_type=jnp.float32) * scale
                m = mask[:, None, None]                                  # [b, 1, 1, bq, bk]
                s = jnp.where(m, s, _MASKED)
                new_max = jnp.maximum(row_max, s.max(axis=-1))          # [b, hk, g, bq]
                correction = jnp.exp(row_max - new_max)
                p = jnp.where(m, jnp.exp(s - new_max[..., None]), 0.0)
                row_sum = row_sum * correction + p.sum(axis=-1)
                acc = acc * correction[..., None] + jnp.einsum(
                    "bhgqk,bkhd->bhgqd", p.astype(vb.dtype), vb,
                    preferred_element_type=jnp.float32)                  # [b, hk, g, bq, d]
                return acc, new_max, row_sum, tiles + 1

            return jax.lax.cond(mask.any(), compute, lambda state: state, state)

        rows = (b, kv_heads, groups, block_q)
        state = (jnp.zeros(rows + (d,), jnp.float32), jnp.full(rows, _MASKED, jnp.float32),
                 jnp.zeros(rows, jnp.float32), tiles)
        acc, row_max, row_sum, tiles = jax.lax.fori_loop(0, lk // block_k, key_block, state)
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        out_b = jnp.where(seen[..., None], acc / safe_sum[..., None], 0.0)  # [b, hk, g, bq, d]
        lse_b = jnp.where(seen, row_max + jnp.log(safe_sum), -jnp.inf)     # [b, hk, g, bq]
        out_b = jnp.moveaxis(out_b, 3, 1).reshape(b, block_q, hq, d)
        lse_b = jnp.moveaxis(lse_b, 3, 1).reshape(b, block_q, hq)
        out = _put_block(out, out_b, i, block_q)
        lse = _put_block(lse, lse_b, i, block_q)
        return out, lse, tiles

    init = (jnp.zeros((b, lq, hq, d), jnp.float32), jnp.zeros((b, lq, hq), jnp.float32),
            jnp.zeros((), jnp.int32))
    return jax.lax.fori_loop(0, lq // block_q, query_block, init)


def merge_partial_attention(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets from their (out, lse) pairs.

    out_* [b, l, h, d] float32 (each normalised over its own keys), lse_* [b, l, h].
    Rows where both are -inf stay zero.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    finite = jnp.isfinite(lse)
    safe = jnp.where(finite, lse, 0.0)
    weight_a = jnp.where(finite, jnp.exp(lse_a - safe), 0.0)[..., None]
    weight_b = jnp.where(finite, jnp.exp(lse_b - safe), 0.0)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


def blockwise_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta, *,
                       causal: bool, block_q: int, block_k: int, accumulators=None):
    """Gradients of one query chunk's attention with respect to q and one key/value chunk.

    lse [b, lq, hq] is the log-sum-exp over ALL keys the queries attend to (not just this
    chunk) and delta [b, lq, hq] = sum(d_out * out, -1) with the final output, so the
    contributions of several key chunks simply add up. `accumulators` (dq, dk, dv), float32
    arrays shaped like q, k, v, are added to in place (zeros if None); returns the sums.
    Loops over key blocks (outer) and query blocks (inner); masked-out tiles are skipped.
    """
    b, lq, hq, d = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    groups = hq // kv_heads
    _check_block(lq, block_q, "query")
    _check_block(lk, block_k, "key")
    scale = 1.0 / np.sqrt(d)
    block_rows = (b, block_q, kv_heads, groups)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)                # rows seeing nothing: p = 0
    if accumulators is None:
        accumulators = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                        jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = accumulators

    def key_block(j, carry):
        dq, dk, dv = carry
        kb, vb = _block(k, j, block_k), _block(v, j, block_k)           # [b, bk, hk, d]
        kpb, ksb = _block(k_pos, j, block_k), _block(k_seg, j, block_k)

        def query_block(i, inner):
            qpb, qsb = _block(q_pos, i, block_q), _block(q_seg, i, block_q)
            mask = attention_mask(qpb, kpb, qsb, ksb, causal)            # [b, bq, bk]

            def compute(inner):
                dq, dk_j, dv_j = inner
                qb = _group_queries(_block(q, i, block_q), kv_heads)    # [b, bq, hk, g, d]
                dob = _group_queries(_block(d_out, i, block_q), kv_heads)
                # row statistics as [b, hk, g, bq] to match the tile layout [b, hk, g, bq, bk]
                lseb = jnp.moveaxis(_block(lse, i, block_q).reshape(block_rows), 1, 3)
                deltab = jnp.moveaxis(_block(delta, i, block_q).reshape(block_rows), 1, 3)
                s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb,
                               preferred_element_type=jnp.float32) * scale
                m = mask[:, None, None]                                  # [b, 1, 1, bq, bk]
                p = jnp.where(m, jnp.exp(s - lseb[..., None]), 0.0)
                dv_j = dv_j + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(dob.dtype), dob,
                                         preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqhgd,bkhd->bhgqk", dob, vb, preferred_element_type=jnp.float32)
                ds = p * (dp - deltab[..., None]) * scale
                dq_i = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(kb.dtype), kb,
                                  preferred_element_type=jnp.float32)
                dq_i = dq_i.reshape(b, block_q, hq, d)
                dq = _put_block(dq, _block(dq, i, block_q) + dq_i, i, block_q)
                dk_j = dk_j + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(qb.dtype), qb,
                                         preferred_element_type=jnp.float32)
                return dq, dk_j, dv_j

            return jax.lax.cond(mask.any(), compute, lambda inner: inner, inner)

        inner = (dq, _block(dk, j, block_k), _block(dv, j, block_k))
        dq, dk_j, dv_j = jax.lax.fori_loop(0, lq // block_q, query_block, inner)
        return dq, _put_block(dk, dk_j, j, block_k), _put_block(dv, dv_j, j, block_k)

    return jax.lax.fori_loop(0, lk // block_k, key_block, (dq, dk, dv))


# -------------------------------------------------------------- blockwise attention
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _blockwise(q, k, v, positions, segment_ids, causal, block_q, block_k):
    out, _, _ = blockwise_forward(q, k, v, positions, positions, segment_ids, segment_ids,
                                  causal=causal, block_q=block_q, block_k=block_k)
    return out.astype(q.dtype)


def _blockwise_fwd(q, k, v, positions, segment_ids, causal, block_q, block_k):
    out, lse, _ = blockwise_forward(q, k, v, positions, positions, segment_ids, segment_ids,
                                    causal=causal, block_q=block_q, block_k=block_k)
    out = out.astype(q.dtype)
    return out, (q, k, v, positions, segment_ids, out, lse)


def _blockwise_bwd(causal, block_q, block_k, residuals, d_out):
    q, k, v, positions, segment_ids, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq, dk, dv = blockwise_backward(
        q, k, v, positions, positions, segment_ids, segment_ids, lse, d_out, delta,
        causal=causal, block_q=block_q, block_k=block_k)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q, k, v, *, positions=None, segment_ids=None, causal=True,
                        block_q: int = 256, block_k: int = 256):
    """Attention with memory linear in length: online softmax over key blocks.

    Same contract as `dot_product_attention`. Saves only q, k, v, the output and the
    per-row log-sum-exp for the backward pass. The length must be a multiple of the block
    sizes (blocks longer than the sequence shrink to it).
    """
    _check_shapes(q, k, v)
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    length = q.shape[1]
    return _blockwise(q, k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32),
                      bool(causal), fit_block(length, block_q), fit_block(length, block_k))


# ------------------------------------------------------------------------ the layer
AttentionFn = Callable[..., jax.Array]


def attention_function(name: str, *, block_q: int = 256, block_k: int = 256) -> AttentionFn:
    """The attention function a config name stands for (ring is added by parallel/)."""
    if name == "dense":
        return dot_product_attention
    if name == "blockwise":
        return functools.partial(blockwise_attention, block_q=block_q, block_k=block_k)
    raise ValueError(f"unknown model.attention {name!r}: expected dense, blockwise or ring")


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions applied by the caller's hook.

    Weights: wq [d_model, q_heads, head_dim], wk/wv [d_model, kv_heads, head_dim],
    wo [q_heads, head_dim, d_model], each tagged with logical axis names.
    """

    def __init__(self, d_model: int, q_heads: int, kv_heads: int, head_dim: int, *,
                 attention_fn: AttentionFn, init_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        def param(shape, names, std):
            init = nnx.with_partitioning(nnx.initializers.normal(std), names)
            return nnx.Param(init(rngs.params(), shape, param_dtype))

        self.wq = param((d_model, q_heads, head_dim), ("embed", "heads", None), init_std)
        self.wk = param((d_model, kv_heads, head_dim), ("embed", "kv_heads", None), init_std)
        self.wv = param((d_model, kv_heads, head_dim), ("embed", "kv_heads", None), init_std)
        self.wo = param((q_heads, head_dim, d_model), ("heads", None, "embed"), init_std)
        self.attention_fn = attention_fn
        self.dtype = dtype

    def __call__(self, x, positions, segment_ids, rotate: Callable | None = None):
        """x [batch, length, d_model] -> [batch, length, d_model].

        `rotate(t, positions)` applies the position encoding to q and k (RoPE), or None.
        """
        x = x.astype(self.dtype)
        q = jnp.einsum("bld,dhk->blhk", x, self.wq[...].astype(self.dtype))
        k = jnp.einsum("bld,dhk->blhk", x, self.wk[...].astype(self.dtype))
        v = jnp.einsum("bld,dhk->blhk", x, self.wv[...].astype(self.dtype))
        if rotate is not None:
            q, k = rotate(q, positions), rotate(k, positions)
        out = self.attention_fn(q, k, v, positions=positions, segment_ids=segment_ids,
                                causal=True)                          # [b, l, q_heads, head_dim]
        return jnp.einsum("blhk,hkd->bld", out.astype(self.dtype), self.wo[...].astype(self.dtype))
