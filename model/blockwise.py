"""The blockwise attention kernel: memory linear in length, with its own backward pass.

Forward: online softmax over key blocks (Milakov & Gimelshein 2018), keeping a running max
and denominator per query row. Backward: the FlashAttention-2 scheme (Dao 2023),
recomputing probabilities block by block from the saved log-sum-exp. `blockwise_forward`
and `blockwise_backward` take one query chunk against one key/value chunk with positions
for each, so ring attention (parallel/ring_attention.py) reuses them at every hop.

Any length, with no padded copy: `block_plan` picks the block size (at most the configured
one, balanced over the blocks the length needs); when the blocks do not tile the length,
the last block is moved back to end at the last token and overlaps its neighbour. The
tokens it shares with earlier blocks are masked as keys (so no key counts twice) and, in
the backward pass, as queries (so no gradient is added twice); in the forward pass those
query rows are simply computed again, to the same values. The waste is less than one
block of compute per chunk, and no memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from model.masking import (MASKED, attention_mask, check_shapes, check_window,
                           default_positions_and_segments, group_queries, padded_length)

# Block sizes are rounded up to a multiple of this (when shorter than the configured
# block): the sublane tile of accelerators, and enough for a balanced split.
BLOCK_GRANULARITY = 8


def block_plan(length: int, block: int) -> tuple[int, int]:
    """(block size, number of blocks) for a chunk of `length` tokens and blocks of at most
    `block`: a chunk no longer than `block` is one block of its own length; a longer one
    takes n = ceil(length / block) blocks of ceil(length / n) tokens rounded up to
    BLOCK_GRANULARITY (at most `block`), so the blocks overlap by less than one block."""
    if length <= block:
        return length, 1
    blocks = -(-length // block)
    size = min(block, padded_length(-(-length // blocks), BLOCK_GRANULARITY))
    return size, -(-length // size)


# Blocks are read and written in place with dynamic slices along the length axis, so no
# blocked copy of q, k, v or of the gradients is ever made.
def _start(index, size: int, length: int):
    """First token of block `index`: index x size, or for a last block that would run past
    the end, length - size (it then overlaps the block before)."""
    return jnp.minimum(index * size, length - size)


def _block(x, start, size: int):
    """`size` tokens from `start` along the length axis (axis 1)."""
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _put_block(x, part, start):
    return jax.lax.dynamic_update_slice_in_dim(x, part, start, axis=1)


def _owned(index, start, size: int):
    """bool [size]: which tokens of the block starting at `start` belong to block `index`
    (False for the ones an overlapping last block shares with the block before)."""
    return start + jnp.arange(size) >= index * size


def blockwise_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal: bool,
                      block_q: int, block_k: int, window=None):
    """Attention of one query chunk over one key/value chunk, in blocks (any lengths;
    `window`: the sliding window, None for none).

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
    block_q, q_blocks = block_plan(lq, block_q)
    block_k, k_blocks = block_plan(lk, block_k)
    scale = 1.0 / np.sqrt(d)

    def query_block(i, carry):
        out, lse, tiles = carry
        qs = _start(i, block_q, lq)
        qb = group_queries(_block(q, qs, block_q), kv_heads)            # [b, bq, hk, g, d]
        qpb, qsb = _block(q_pos, qs, block_q), _block(q_seg, qs, block_q)  # [b, bq]

        def key_block(j, state):
            ks = _start(j, block_k, lk)
            kb, vb = _block(k, ks, block_k), _block(v, ks, block_k)     # [b, bk, hk, d]
            mask = attention_mask(qpb, _block(k_pos, ks, block_k), qsb,
                                  _block(k_seg, ks, block_k), causal, window)  # [b, bq, bk]
            mask &= _owned(j, ks, block_k)[None, None, :]   # shared keys count once

            def compute(state):
                acc, row_max, row_sum, tiles = state
                # tiles in the matmul's natural layout [b, hk, g, bq, bk]: no relayout copy
                s = jnp.einsum("bqhgd,bkhd->bhgqk", qb, kb,
                               preferred_element_type=jnp.float32) * scale
                m = mask[:, None, None]                                  # [b, 1, 1, bq, bk]
                s = jnp.where(m, s, MASKED)
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
        state = (jnp.zeros(rows + (d,), jnp.float32), jnp.full(rows, MASKED, jnp.float32),
                 jnp.zeros(rows, jnp.float32), tiles)
        acc, row_max, row_sum, tiles = jax.lax.fori_loop(0, k_blocks, key_block, state)
        seen = row_sum > 0
        safe_sum = jnp.where(seen, row_sum, 1.0)
        out_b = jnp.where(seen[..., None], acc / safe_sum[..., None], 0.0)  # [b, hk, g, bq, d]
        lse_b = jnp.where(seen, row_max + jnp.log(safe_sum), -jnp.inf)     # [b, hk, g, bq]
        out_b = jnp.moveaxis(out_b, 3, 1).reshape(b, block_q, hq, d)
        lse_b = jnp.moveaxis(lse_b, 3, 1).reshape(b, block_q, hq)
        # rows shared with the block before are written again, with the same values
        out = _put_block(out, out_b, qs)
        lse = _put_block(lse, lse_b, qs)
        return out, lse, tiles

    init = (jnp.zeros((b, lq, hq, d), jnp.float32), jnp.zeros((b, lq, hq), jnp.float32),
            jnp.zeros((), jnp.int32))
    return jax.lax.fori_loop(0, q_blocks, query_block, init)


def merge_partial_attention(out_a, lse_a, out_b, lse_b):
    """Combine attention over two disjoint key sets from their (out, lse) pairs.

    out_* [b, l, h, d] float32 (each normalised over its own keys), lse_* [b, l, h] (or
    head-major: [b, h, l, d] and [b, h, l]). Rows where both are -inf stay zero.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    finite = jnp.isfinite(lse)
    safe = jnp.where(finite, lse, 0.0)
    weight_a = jnp.where(finite, jnp.exp(lse_a - safe), 0.0)[..., None]
    weight_b = jnp.where(finite, jnp.exp(lse_b - safe), 0.0)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


def blockwise_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta, *,
                       causal: bool, block_q: int, block_k: int, accumulators=None,
                       window=None):
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
    block_q, q_blocks = block_plan(lq, block_q)
    block_k, k_blocks = block_plan(lk, block_k)
    scale = 1.0 / np.sqrt(d)
    block_rows = (b, block_q, kv_heads, groups)
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)                # rows seeing nothing: p = 0
    if accumulators is None:
        accumulators = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                        jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = accumulators

    def key_block(j, carry):
        dq, dk, dv = carry
        ks = _start(j, block_k, lk)
        kb, vb = _block(k, ks, block_k), _block(v, ks, block_k)         # [b, bk, hk, d]
        kpb, ksb = _block(k_pos, ks, block_k), _block(k_seg, ks, block_k)
        k_owned = _owned(j, ks, block_k)

        def query_block(i, inner):
            qs = _start(i, block_q, lq)
            qpb, qsb = _block(q_pos, qs, block_q), _block(q_seg, qs, block_q)
            mask = attention_mask(qpb, kpb, qsb, ksb, causal, window)    # [b, bq, bk]
            # each (query, key) pair once: shared rows and keys belong to the earlier block
            mask &= _owned(i, qs, block_q)[None, :, None] & k_owned[None, None, :]

            def compute(inner):
                dq, dk_j, dv_j = inner
                qb = group_queries(_block(q, qs, block_q), kv_heads)   # [b, bq, hk, g, d]
                dob = group_queries(_block(d_out, qs, block_q), kv_heads)
                # row statistics as [b, hk, g, bq] to match the tile layout [b, hk, g, bq, bk]
                lseb = jnp.moveaxis(_block(lse, qs, block_q).reshape(block_rows), 1, 3)
                deltab = jnp.moveaxis(_block(delta, qs, block_q).reshape(block_rows), 1, 3)
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
                dq = _put_block(dq, _block(dq, qs, block_q) + dq_i, qs)
                dk_j = dk_j + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(qb.dtype), qb,
                                         preferred_element_type=jnp.float32)
                return dq, dk_j, dv_j

            return jax.lax.cond(mask.any(), compute, lambda inner: inner, inner)

        # a shared key's rows hold the earlier block's finished sums: they get + 0 here
        inner = (dq, _block(dk, ks, block_k), _block(dv, ks, block_k))
        dq, dk_j, dv_j = jax.lax.fori_loop(0, q_blocks, query_block, inner)
        return dq, _put_block(dk, dk_j, ks), _put_block(dv, dv_j, ks)

    return jax.lax.fori_loop(0, k_blocks, key_block, (dq, dk, dv))


# Checkpoint names of an attention kernel's backward residuals: its output and the per-row
# log-sum-exp. A remat policy that keeps both (model/remat.py: save_attention_out,
# offload_attention) spares the backward pass a rerun of the kernel's forward pass, and of
# a ring's forward transfers (the residuals are named inside the custom VJPs; a name on
# the kernel's result outside would be a second copy of the same buffer).
ATTENTION_OUT = "attention_out"
ATTENTION_LSE = "attention_lse"


def name_residuals(out, lse):
    """(out, lse) under their checkpoint names (identity otherwise)."""
    return checkpoint_name(out, ATTENTION_OUT), checkpoint_name(lse, ATTENTION_LSE)


def opaque(fn):
    """`fn` as one custom_vjp call that has no derivative of its own, for a custom VJP's
    forward pass to run its kernel through.

    Called directly, a custom VJP's forward pass is inlined when the function is
    differentiated, and inside lax.scan (the scanned decoder layers) the scan's partial
    evaluation then keeps every iteration of the kernel's inner loops: measured, the
    [query blocks, key blocks] score tiles of every layer, 48 TB per device for Llama-2-7B
    at 1M tokens. As one call the kernel stays whole and only the declared residuals are
    saved. The result must never be differentiated itself (that raises)."""
    wrapped = jax.custom_vjp(fn)

    def no_derivative(*_):
        raise TypeError("model.blockwise.opaque: this kernel is only run by a custom VJP's "
                        "forward pass and has no derivative of its own")

    wrapped.defvjp(lambda *args: (wrapped(*args), None), no_derivative)
    return wrapped


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _blockwise(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal, block_q, block_k):
    out, _, _ = blockwise_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal,
                                  block_q=block_q, block_k=block_k, window=window)
    return out.astype(q.dtype)


def _blockwise_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal, block_q, block_k):
    kernel = opaque(lambda *args: blockwise_forward(*args[:7], window=args[7], causal=causal,
                                                    block_q=block_q, block_k=block_k))
    out, lse, _ = kernel(q, k, v, q_pos, k_pos, q_seg, k_seg, window)
    out, lse = name_residuals(out.astype(q.dtype), lse)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse)


def _blockwise_bwd(causal, block_q, block_k, residuals, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dq, dk, dv = blockwise_backward(
        q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta, causal=causal,
        block_q=block_q, block_k=block_k, window=window)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None,
            None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def window_argument(window):
    """A sliding window as the kernels take it: None, or an int32 scalar."""
    check_window(window)
    return None if window is None else jnp.asarray(window, jnp.int32)


def blockwise_attention(q, k, v, *, positions=None, segment_ids=None, causal=True,
                        sliding_window=None, block_q: int = 256, block_k: int = 256):
    """Attention with memory linear in length: online softmax over key blocks.

    Same contract as `dot_product_attention`, any length >= 1 (blocks as `block_plan`
    says; no padded copy). Tiles that no query/key pair of sees (causal, other documents,
    outside the window) are skipped. Saves only q, k, v, the output and the per-row
    log-sum-exp for the backward pass.
    """
    check_shapes(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError("self-attention: q and k must have the same length")
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    return blockwise_chunk_attention(q, k, v, positions, positions, segment_ids, segment_ids,
                                     causal=causal, sliding_window=sliding_window,
                                     block_q=block_q, block_k=block_k)


def blockwise_chunk_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True,
                              sliding_window=None, block_q: int = 256, block_k: int = 256):
    """The queries of one chunk [b, lq, hq, d] over the keys/values of another
    [b, lk, hk, d] (any lengths; positions and segment ids [b, lq] / [b, lk] each), with
    the kernel's own backward pass: what all-gather sequence parallelism runs on each
    device (parallel/sequence_parallel.py)."""
    return _blockwise(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                      q_seg.astype(jnp.int32), k_seg.astype(jnp.int32),
                      window_argument(sliding_window), bool(causal), block_q, block_k)


def blockwise_tiles(q, k, v, *, positions=None, segment_ids=None, causal=True,
                    sliding_window=None, block_q: int = 256, block_k: int = 256):
    """(tiles computed, tiles in all) of `blockwise_attention`'s forward pass on these
    inputs: the (query block, key block) tiles that some pair sees, of every tile."""
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
    length = q.shape[1]
    _, _, tiles = jax.jit(functools.partial(blockwise_forward, causal=bool(causal),
                                            block_q=block_q, block_k=block_k))(
        q, k, v, positions, positions, segment_ids, segment_ids,
        window=window_argument(sliding_window))
    return int(tiles), block_plan(length, block_q)[1] * block_plan(length, block_k)[1]
