"""Ring attention: sequence-parallel attention over the `seq` axis of a mesh.

Each device holds a slice of the sequence (its queries, keys and values, with their global
positions and segment ids). Key/value slices travel around the ring with `lax.ppermute`;
after N hops every query has met every key. Each hop is one call of the blockwise kernel
(model/blockwise.py) and the partial results merge by log-sum-exp, in float32.

The backward pass is a ring of its own (Liu, Zaharia & Abbeel 2023): K/V travel again and
their gradients dK/dV travel with them, arriving back at their home device after N hops.
Residuals are the local q, k, v, output and log-sum-exp: O(length / N) per device.

The next hop's `ppermute` is issued before the current hop's compute so the transfer can
overlap the math where collectives run asynchronously (GPUs, TPUs).

Only kv_heads travel (grouped-query attention groups queries locally). Masks come from the
travelling positions and segment ids, so any token order works: with the zigzag layout
(parallel/layout.py) every device does the same causal work at every hop.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from model.blockwise import (blockwise_attention, blockwise_backward, blockwise_forward,
                             fit_block, merge_partial_attention, opaque)
from model.masking import check_shapes, default_positions_and_segments
from parallel.mesh import BATCH_AXES, heads_spec


def _shift(tree, axis_name: str, axis_size: int):
    """Send every array in `tree` to the next device of the ring (i -> i + 1)."""
    perm = [(i, (i + 1) % axis_size) for i in range(axis_size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _run_hops(hop, carry, axis_size: int):
    """Apply `hop` axis_size - 1 times. The first hop is peeled off the loop so that it
    reads the caller's K/V directly (a loop would first copy them into its carry)."""
    if axis_size > 1:
        carry, _ = hop(carry, None)
    if axis_size > 2:
        carry, _ = jax.lax.scan(hop, carry, None, length=axis_size - 2)
    return carry


def _ring_forward(q, k, v, q_pos, q_seg, *, axis_name, axis_size, causal, block_q, block_k):
    """Per-device forward: returns (out float32, lse, tiles computed)."""
    b, lq, hq, d = q.shape

    def attend(kv, out, lse, tiles):
        k_c, v_c, kp_c, ks_c = kv
        out_c, lse_c, tiles_c = blockwise_forward(
            q, k_c, v_c, q_pos, kp_c, q_seg, ks_c, causal=causal, block_q=block_q,
            block_k=block_k)
        out, lse = merge_partial_attention(out, lse, out_c, lse_c)
        return out, lse, tiles + tiles_c

    def hop(carry, _):
        kv, out, lse, tiles = carry
        next_kv = _shift(kv, axis_name, axis_size)          # issued before this hop's math
        out, lse, tiles = attend(kv, out, lse, tiles)
        return (next_kv, out, lse, tiles), None

    out = jnp.zeros((b, lq, hq, d), jnp.float32)
    lse = jnp.full((b, lq, hq), -jnp.inf, jnp.float32)
    tiles = jnp.zeros((), jnp.int32)
    carry = ((k, v, q_pos, q_seg), out, lse, tiles)         # self-attention: keys share q's slice
    kv, out, lse, tiles = _run_hops(hop, carry, axis_size)
    return attend(kv, out, lse, tiles)                      # last hop: nothing left to send


def _ring_backward(q, k, v, q_pos, q_seg, out, lse, d_out, *, axis_name, axis_size, causal,
                   block_q, block_k):
    """Per-device backward: dq stays home; dK/dV ride along with K/V for N hops."""
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, lq, hq]

    def accumulate(kv, accumulators):
        k_c, v_c, kp_c, ks_c = kv
        return blockwise_backward(q, k_c, v_c, q_pos, kp_c, q_seg, ks_c, lse, d_out, delta,
                                  causal=causal, block_q=block_q, block_k=block_k,
                                  accumulators=accumulators)

    def hop(carry, _):
        kv, dk, dv, dq = carry
        next_kv = _shift(kv, axis_name, axis_size)          # issued before this hop's math
        dq, dk, dv = accumulate(kv, (dq, dk, dv))
        dk, dv = _shift((dk, dv), axis_name, axis_size)     # dK/dV follow their K/V
        return (next_kv, dk, dv, dq), None

    kv = (k, v, q_pos, q_seg)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    kv, dk, dv, dq = _run_hops(hop, (kv, dk, dv, dq), axis_size)
    # Last hop: the K/V here came from device i+1; after adding our part, one more shift
    # brings each dK/dV home (N shifts in all).
    dq, dk, dv = accumulate(kv, (dq, dk, dv))
    dk, dv = _shift((dk, dv), axis_name, axis_size)
    return dq, dk, dv


def _local_ring(axis_name: str, axis_size: int, causal: bool, block_q: int, block_k: int):
    """The per-device ring attention with its custom backward ring."""
    options = dict(axis_name=axis_name, axis_size=axis_size, causal=causal,
                   block_q=block_q, block_k=block_k)

    @jax.custom_vjp
    def ring(q, k, v, q_pos, q_seg):
        out, _, _ = _ring_forward(q, k, v, q_pos, q_seg, **options)
        return out.astype(q.dtype)

    def ring_fwd(q, k, v, q_pos, q_seg):
        kernel = opaque(functools.partial(_ring_forward, **options))   # see model.blockwise
        out, lse, _ = kernel(q, k, v, q_pos, q_seg)
        out = out.astype(q.dtype)
        return out, (q, k, v, q_pos, q_seg, out, lse)

    def ring_bwd(residuals, d_out):
        q, k, v, q_pos, q_seg, out, lse = residuals
        dq, dk, dv = _ring_backward(q, k, v, q_pos, q_seg, out, lse, d_out, **options)
        return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


def _specs(mesh: Mesh, axis_name: str):
    heads = heads_spec(mesh, axis_name)
    return heads, P(heads[0], axis_name)


def check_sequence_split(length: int, axis_size: int, block_q: int, block_k: int,
                         axis_name: str = "seq") -> None:
    """Raise ValueError unless a sequence of `length` tokens splits into 2 x axis_size
    zigzag chunks (when axis_size > 1) and each device's part into whole query and key
    blocks (a block longer than the part shrinks to it)."""
    if axis_size > 1 and length % (2 * axis_size):
        raise ValueError(f"length {length} is not divisible by 2 x {axis_name} = "
                         f"{2 * axis_size} (mesh {axis_name} axis, zigzag chunks)")
    local = length // axis_size
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if local % fit_block(local, block):
            raise ValueError(f"length {length} (per device {local}) is not a multiple of "
                             f"model.{name} = {block}")


def _validate(q, k, v, mesh: Mesh, axis_name: str, block_q: int, block_k: int):
    check_shapes(q, k, v)
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis_name!r}: {dict(mesh.shape)}")
    check_sequence_split(q.shape[1], mesh.shape[axis_name], block_q, block_k, axis_name)
    batch_split = 1
    for axis in BATCH_AXES:
        batch_split *= mesh.shape.get(axis, 1)
    if q.shape[0] % batch_split:
        raise ValueError(f"ring attention: batch {q.shape[0]} is not divisible by the mesh's "
                         f"data x fsdp = {batch_split}")
    if k.shape[2] % mesh.shape.get("tensor", 1):
        raise ValueError(f"ring attention: kv_heads {k.shape[2]} not divisible by tensor = "
                         f"{mesh.shape['tensor']}")


def ring_attention(q, k, v, *, mesh: Mesh, axis_name: str = "seq", positions=None,
                   segment_ids=None, causal: bool = True, block_q: int = 256,
                   block_k: int = 256):
    """Attention with the sequence split over `axis_name` of `mesh`.

    Same contract as `model.attention.dot_product_attention`: q [batch, length, q_heads,
    head_dim], k/v [batch, length, kv_heads, head_dim], positions/segment_ids [batch,
    length]; returns [batch, length, q_heads, head_dim]. The batch is split over the
    mesh's data/fsdp axes and heads over `tensor`. With an axis of size 1 this is the
    blockwise kernel. The length must be divisible by 2 x the axis size.
    """
    _validate(q, k, v, mesh, axis_name, block_q, block_k)
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    positions, segment_ids = positions.astype(jnp.int32), segment_ids.astype(jnp.int32)
    n = mesh.shape[axis_name]
    if n == 1:
        return blockwise_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                                   causal=causal, block_q=block_q, block_k=block_k)
    local = q.shape[1] // n
    ring = _local_ring(axis_name, n, bool(causal), fit_block(local, block_q),
                       fit_block(local, block_k))
    heads_spec, rows_spec = _specs(mesh, axis_name)
    sharded = jax.shard_map(ring, mesh=mesh,
                            in_specs=(heads_spec, heads_spec, heads_spec, rows_spec, rows_spec),
                            out_specs=heads_spec, check_vma=False)
    return sharded(q, k, v, positions, segment_ids)


def ring_tiles_per_device(q, k, v, *, mesh: Mesh, axis_name: str = "seq", positions=None,
                          segment_ids=None, causal: bool = True, block_q: int = 256,
                          block_k: int = 256):
    """How many (query block, key block) tiles each device of the ring computes in the
    forward pass: int32 [axis size]. Runs the same kernel as `ring_attention`."""
    _validate(q, k, v, mesh, axis_name, block_q, block_k)
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    n = mesh.shape[axis_name]
    local = q.shape[1] // n
    options = dict(axis_name=axis_name, axis_size=n, causal=causal,
                   block_q=fit_block(local, block_q), block_k=fit_block(local, block_k))

    def count(q, k, v, q_pos, q_seg):
        _, _, tiles = _ring_forward(q, k, v, q_pos, q_seg, **options)
        # identical on every batch/head shard only if they hold identical masks; sum them
        other_axes = tuple(a for a in mesh.axis_names if a != axis_name)
        return jax.lax.psum(tiles, other_axes)[None] if other_axes else tiles[None]

    heads_spec, rows_spec = _specs(mesh, axis_name)
    counted = jax.shard_map(count, mesh=mesh,
                            in_specs=(heads_spec, heads_spec, heads_spec, rows_spec, rows_spec),
                            out_specs=P(axis_name), check_vma=False)
    return jax.jit(counted)(q, k, v, positions.astype(jnp.int32), segment_ids.astype(jnp.int32))


@functools.lru_cache(maxsize=None)
def make_ring_attention(mesh: Mesh, *, axis_name: str = "seq", block_q: int = 256,
                        block_k: int = 256):
    """`ring_attention` bound to a mesh, with the attention-function signature the model
    layer calls: fn(q, k, v, *, positions, segment_ids, causal). One function object per
    argument set (cached), so models built with it compare equal and reuse compilations."""
    return functools.partial(ring_attention, mesh=mesh, axis_name=axis_name,
                             block_q=block_q, block_k=block_k)
