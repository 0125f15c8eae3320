"""Ring attention: sequence-parallel attention over the `seq` axis of a mesh.

Each device holds a slice of the sequence (its queries, keys and values, with their global
positions and segment ids). Key/value slices travel around the ring with `lax.ppermute`;
after N hops every query has met every key. Each hop is one call of the blockwise kernel
(model/blockwise.py) and the partial results merge by log-sum-exp, in float32.

The backward pass is a ring of its own (Liu, Zaharia & Abbeel 2023): K/V travel again and
their gradients dK/dV travel with them, arriving back at their home device at the end.
Residuals are the local q, k, v, output and log-sum-exp: O(length / N) per device.

The next hop's `ppermute` is issued before the current hop's compute so the transfer can
overlap the math where collectives run asynchronously (GPUs, TPUs).

Only kv_heads travel (grouped-query attention groups queries locally). Masks come from the
travelling positions and segment ids, so any token order works: with the zigzag layout
(parallel/layout.py) every device does the same causal work at every hop.

Any length: a length the ring does not divide is padded at its end (segment PAD_SEGMENT:
isolated from every real token) and the padding dropped from the output; each device's
slice may be any length (the kernel's last block overlaps instead of padding,
model/blockwise.py). The trainer's input layout already pads batches to whole slices, so
inside a model nothing is padded here and no data moves between devices for it.

Sliding windows: a hop whose keys no local query can see (bounds of the positions) skips
its compute, and inside a hop every tile outside the window is skipped. With
layout="contiguous" (the caller promises slices in sequence order, documents contiguous
in a row) and causal attention, keys more than w - 1 tokens back live at most
ceil((w - 1) / slice) devices back, so the ring stops after that many hops: the other
transfers never happen.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from model.blockwise import (block_plan, blockwise_attention, blockwise_backward,
                             blockwise_forward, merge_partial_attention, name_residuals,
                             opaque, window_argument)
from model.masking import (PAD_SEGMENT, check_shapes, check_window,
                           default_positions_and_segments, pad_axis1, padded_length)
from model.pallas_attention import (HEADS_MAJOR_KERNELS, PALLAS_KERNELS, pallas_attention,
                                    pallas_passes)
from parallel.choices import LAYOUTS
from parallel.mesh import BATCH_AXES, heads_spec


def _shift(tree, axis_name: str, axis_size: int, offset: int = 1):
    """Send every array in `tree` `offset` devices along the ring (i -> i + offset)."""
    perm = [(i, (i + offset) % axis_size) for i in range(axis_size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, perm), tree)


def _run_hops(hop, carry, count: int):
    """Apply `hop` `count` times. The first is peeled off the loop so that it reads the
    caller's K/V directly (a loop would first copy them into its carry)."""
    if count > 0:
        carry, _ = hop(carry, None)
    if count > 1:
        carry, _ = jax.lax.scan(hop, carry, None, length=count - 1)
    return carry


_INT32_MIN, _INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


def _position_range(positions, segments):
    """(min, max) of the positions of real tokens (segment >= 0); (MAX, MIN) if none."""
    real = segments >= 0
    return (jnp.min(jnp.where(real, positions, _INT32_MAX)),
            jnp.max(jnp.where(real, positions, _INT32_MIN)))


def _may_see(q_pos, q_seg, k_pos, k_seg, causal: bool, window):
    """False when no local query can see any key of this chunk, judged from position
    bounds alone (cheap; True is only a maybe, the kernel's tiles decide exactly)."""
    q_min, q_max = _position_range(q_pos, q_seg)
    k_min, k_max = _position_range(k_pos, k_seg)
    possible = (q_min <= q_max) & (k_min <= k_max)
    if causal:
        possible &= q_max >= k_min
    if window is not None:
        possible &= (q_min - k_max) < window        # the closest pair is within the window
        if not causal:
            possible &= (k_min - q_max) < window
    return possible


def _hop_forward(kernel: str, interpret: bool, q, k, v, q_pos, k_pos, q_seg, k_seg, *,
                 causal, block_q, block_k, window, running):
    """(out float32, lse) of the hops so far (`running`) merged with this hop's, and the
    tiles this hop computed, by the per-device kernel: "blockwise", or a Pallas one, which
    merges in place and whose tiles are not counted (0). Arrays in the kernel's layout."""
    if kernel in PALLAS_KERNELS:
        forward, _ = pallas_passes(kernel)
        out, lse = forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal,
                           block_q=block_q, block_k=block_k, window=window,
                           interpret=interpret, heads_major=kernel in HEADS_MAJOR_KERNELS,
                           accumulators=running)
        return out, lse, jnp.zeros((), jnp.int32)
    out, lse, tiles = blockwise_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal,
                                        block_q=block_q, block_k=block_k, window=window)
    return *merge_partial_attention(*running, out, lse), tiles


def _hop_backward(kernel: str, interpret: bool, q, k, v, q_pos, k_pos, q_seg, k_seg, lse,
                  d_out, delta, *, causal, block_q, block_k, accumulators, window):
    """(dq, dk, dv) accumulators plus one hop's gradients."""
    if kernel in PALLAS_KERNELS:
        _, backward = pallas_passes(kernel)
        return backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta,
                        causal=causal, block_q=block_q, block_k=block_k, window=window,
                        interpret=interpret, heads_major=kernel in HEADS_MAJOR_KERNELS,
                        accumulators=accumulators)
    return blockwise_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta,
                              causal=causal, block_q=block_q, block_k=block_k,
                              accumulators=accumulators, window=window)


def _swap_heads(*arrays):
    """Each array with its length and heads axes swapped ([b, l, h, ...] <-> [b, h, l, ...])."""
    return tuple(jnp.swapaxes(x, 1, 2) for x in arrays)


def _ring_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, window, *, axis_name, axis_size, hops,
                  causal, block_q, block_k, stride=1, kernel="blockwise", interpret=False):
    """Per-device forward over this device's keys and `hops` others: (out float32, lse,
    tiles computed, hops computed). K/V move `stride` devices per hop (1: the plain ring;
    the hybrid's ring links the devices of the same rank in each group). `kernel`: each
    hop's kernel, "blockwise" or a Pallas one (PALLAS_KERNELS; interpret: run it with
    Pallas' interpreter). Arrays in the kernel's layout: [b, l, h, ...], or head-major for
    a head-major Pallas kernel (see local_ring)."""

    def attend(kv, out, lse, tiles, computed):
        k_c, v_c, kp_c, ks_c = kv

        def compute(state):
            out, lse, tiles, computed = state
            out, lse, tiles_c = _hop_forward(
                kernel, interpret, q, k_c, v_c, q_pos, kp_c, q_seg, ks_c, causal=causal,
                block_q=block_q, block_k=block_k, window=window, running=(out, lse))
            return out, lse, tiles + tiles_c, computed + 1

        return jax.lax.cond(_may_see(q_pos, q_seg, kp_c, ks_c, causal, window), compute,
                            lambda state: state, (out, lse, tiles, computed))

    def hop(carry, _):
        kv, out, lse, tiles, computed = carry
        next_kv = _shift(kv, axis_name, axis_size, stride)  # issued before this hop's math
        out, lse, tiles, computed = attend(kv, out, lse, tiles, computed)
        return (next_kv, out, lse, tiles, computed), None

    out = jnp.zeros(q.shape, jnp.float32)                   # [b, lq, hq, d] (or head-major)
    lse = jnp.full(q.shape[:3], -jnp.inf, jnp.float32)
    zero = jnp.zeros((), jnp.int32)
    carry = ((k, v, k_pos, k_seg), out, lse, zero, zero)
    kv, out, lse, tiles, computed = _run_hops(hop, carry, hops)
    return attend(kv, out, lse, tiles, computed)            # last hop: nothing left to send


def _ring_backward(q, k, v, q_pos, q_seg, k_pos, k_seg, window, lse, d_out, delta, *,
                   axis_name, axis_size, hops, causal, block_q, block_k, stride=1,
                   kernel="blockwise", interpret=False):
    """Per-device backward: dq stays home; dK/dV ride along with K/V and go home at the
    end (one more shift for the full ring, `hops` back for a shortened one). Arrays in the
    kernel's layout, as _ring_forward's; delta = sum(d_out * out, -1)."""

    def accumulate(kv, accumulators):
        k_c, v_c, kp_c, ks_c = kv

        def compute(accumulators):
            return _hop_backward(kernel, interpret, q, k_c, v_c, q_pos, kp_c, q_seg, ks_c,
                                 lse, d_out, delta, causal=causal, block_q=block_q,
                                 block_k=block_k, accumulators=accumulators, window=window)

        return jax.lax.cond(_may_see(q_pos, q_seg, kp_c, ks_c, causal, window), compute,
                            lambda accumulators: accumulators, accumulators)

    def hop(carry, _):
        kv, dk, dv, dq = carry
        next_kv = _shift(kv, axis_name, axis_size, stride)  # issued before this hop's math
        dq, dk, dv = accumulate(kv, (dq, dk, dv))
        dk, dv = _shift((dk, dv), axis_name, axis_size, stride)  # dK/dV follow their K/V
        return (next_kv, dk, dv, dq), None

    kv = (k, v, k_pos, k_seg)
    dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    dq = jnp.zeros(q.shape, jnp.float32)
    kv, dk, dv, dq = _run_hops(hop, (kv, dk, dv, dq), hops)
    # The K/V here came from `hops` members back; after adding our part, dK/dV go there.
    dq, dk, dv = accumulate(kv, (dq, dk, dv))
    dk, dv = _shift((dk, dv), axis_name, axis_size, offset=-hops * stride)
    return dq, dk, dv


def local_ring(options: dict):
    """The per-device ring attention with its custom backward ring: (q, k, v, q_pos,
    q_seg, k_pos, k_seg, window) -> out (keys start as the device's own tokens).

    A head-major Pallas kernel (HEADS_MAJOR_KERNELS: Mosaic's, [b, h, l, d]) gets q, K/V
    transposed once for all the ring's hops, not inside each; those copies are the
    backward pass's residuals in place of the originals.
    """
    to_kernel = _swap_heads if options["kernel"] in HEADS_MAJOR_KERNELS else (lambda *a: a)

    def forward(q, k, v, q_pos, q_seg, k_pos, k_seg, window):
        """(out, lse) in the caller's layout, from q/k/v in the kernel's."""
        out, lse, _, _ = _ring_forward(q, k, v, q_pos, q_seg, k_pos, k_seg, window, **options)
        return to_kernel(out, lse)

    @jax.custom_vjp
    def ring(q, k, v, q_pos, q_seg, k_pos, k_seg, window):
        out, _ = forward(*to_kernel(q, k, v), q_pos, q_seg, k_pos, k_seg, window)
        return out.astype(q.dtype)

    def ring_fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, window):
        dtype = q.dtype
        q, k, v = to_kernel(q, k, v)
        out, lse = opaque(forward)(q, k, v, q_pos, q_seg, k_pos, k_seg, window)  # see
        out, lse = name_residuals(out.astype(dtype), lse)       # model.blockwise
        return out, (q, k, v, q_pos, q_seg, k_pos, k_seg, window, out, lse)

    def ring_bwd(residuals, d_out):
        q, k, v, q_pos, q_seg, k_pos, k_seg, window, out, lse = residuals
        delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
        d_out, lse, delta = to_kernel(d_out, lse, delta)
        dq, dk, dv = _ring_backward(q, k, v, q_pos, q_seg, k_pos, k_seg, window, lse, d_out,
                                    delta, **options)
        dq, dk, dv = to_kernel(dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))
        return dq, dk, dv, None, None, None, None, None

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


def ring_hops(axis_size: int, local_length: int, *, causal: bool, sliding_window=None,
              layout: str | None = None) -> int:
    """Hops the ring makes (each one K/V transfer): axis_size - 1, or fewer for a causal
    sliding window over slices in contiguous layout (only keys that many devices back can
    be inside any local query's window)."""
    full = axis_size - 1
    if not (causal and layout == "contiguous" and isinstance(sliding_window, (int, np.integer))):
        return full
    return min(full, math.ceil((int(sliding_window) - 1) / local_length))


def _specs(mesh: Mesh, axis_name: str):
    heads = heads_spec(mesh, axis_name)
    return heads, P(heads[0], axis_name)


def on_each_device(kernel_fn, mesh: Mesh):
    """kernel_fn(q, k, v, positions, segments, window) over whole sequences, run on each
    device's rows and heads (shard_map over the batch axes and tensor): a Pallas kernel is
    a custom call the compiler cannot partition itself (Mosaic refuses to)."""
    heads = heads_spec(mesh)                          # the length whole on every device
    rows = P(heads[0], None)

    def call(q, k, v, positions, segments, window):
        window = window_argument(window)
        windows = () if window is None else (window,)  # a window rides along as an array

        def local(q, k, v, positions, segments, *windows):
            return kernel_fn(q, k, v, positions, segments, windows[0] if windows else None)

        return jax.shard_map(local, mesh=mesh,
                             in_specs=(heads, heads, heads, rows, rows) + (P(),) * len(windows),
                             out_specs=heads, check_vma=False)(q, k, v, positions, segments,
                                                               *windows)
    return call


def _validate(q, k, v, mesh: Mesh, axis_name: str, sliding_window, layout):
    check_shapes(q, k, v)
    check_window(sliding_window)
    if k.shape[1] != q.shape[1]:
        raise ValueError("self-attention: q and k must have the same length")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"ring attention: layout must be None or one of {LAYOUTS}, got "
                         f"{layout!r}")
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis_name!r}: {dict(mesh.shape)}")
    batch_split = 1
    for axis in BATCH_AXES:
        batch_split *= mesh.shape.get(axis, 1)
    if q.shape[0] % batch_split:
        raise ValueError(f"ring attention: batch {q.shape[0]} is not divisible by the mesh's "
                         f"data x fsdp = {batch_split}")
    if k.shape[2] % mesh.shape.get("tensor", 1):
        raise ValueError(f"ring attention: kv_heads {k.shape[2]} not divisible by tensor = "
                         f"{mesh.shape['tensor']}")


def interpret_kernels(mesh: Mesh, kernel: str) -> bool:
    """Whether a Pallas `kernel` runs in Pallas' interpreter on this mesh: on any platform
    but the one it is written for (PALLAS_KERNELS; the CPU runs both that way)."""
    return mesh.devices.flat[0].platform != PALLAS_KERNELS.get(kernel)


def _ring_setup(q, mesh, axis_name, positions, segment_ids, causal, sliding_window, layout,
                block_q, block_k, kernel="blockwise"):
    """The globally padded positions/segments, the padded length and the ring's static
    options."""
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    n = mesh.shape[axis_name]
    length = padded_length(q.shape[1], n)
    positions = pad_axis1(positions.astype(jnp.int32), length)
    segment_ids = pad_axis1(segment_ids.astype(jnp.int32), length, PAD_SEGMENT)
    options = dict(axis_name=axis_name, axis_size=n, causal=bool(causal),
                   hops=ring_hops(n, length // n, causal=causal, sliding_window=sliding_window,
                                  layout=layout),
                   block_q=block_q, block_k=block_k, kernel=kernel,
                   interpret=interpret_kernels(mesh, kernel))
    return positions, segment_ids, length, options


def ring_attention(q, k, v, *, mesh: Mesh, axis_name: str = "seq", positions=None,
                   segment_ids=None, causal: bool = True, sliding_window=None,
                   layout: str | None = None, block_q: int = 256, block_k: int = 256,
                   kernel: str = "blockwise"):
    """Attention with the sequence split over `axis_name` of `mesh`.

    Same contract as `model.attention.dot_product_attention`: q [batch, length, q_heads,
    head_dim], k/v [batch, length, kv_heads, head_dim], positions/segment_ids [batch,
    length]; returns [batch, length, q_heads, head_dim]. Any length >= 1. The batch is
    split over the mesh's data/fsdp axes and heads over `tensor` (those must divide). With
    an axis of size 1 this is the blockwise kernel. `layout="contiguous"` promises slices
    in sequence order (see the module docstring); a causal sliding window then shortens
    the ring. `kernel`: a Pallas kernel's name (PALLAS_KERNELS) runs each hop with it,
    anything else with the blockwise one.
    """
    _validate(q, k, v, mesh, axis_name, sliding_window, layout)
    n = mesh.shape[axis_name]
    if n == 1 and kernel not in PALLAS_KERNELS:
        return blockwise_attention(q, k, v, positions=positions, segment_ids=segment_ids,
                                   causal=causal, sliding_window=sliding_window,
                                   block_q=block_q, block_k=block_k)
    if n == 1:
        interpret = interpret_kernels(mesh, kernel)
        positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
        return on_each_device(lambda q, k, v, pos, seg, window: pallas_attention(
            q, k, v, positions=pos, segment_ids=seg, causal=causal, sliding_window=window,
            block_q=block_q, block_k=block_k, interpret=interpret, kernel=kernel), mesh)(
            q, k, v, positions, segment_ids, sliding_window)
    length = q.shape[1]
    positions, segment_ids, padded, options = _ring_setup(
        q, mesh, axis_name, positions, segment_ids, causal, sliding_window, layout, block_q,
        block_k, kernel)
    ring = local_ring(options)
    window = window_argument(sliding_window)

    def local(q, k, v, pos, seg, window):
        return ring(q, k, v, pos, seg, pos, seg, window)

    heads, rows = _specs(mesh, axis_name)
    sharded = jax.shard_map(local, mesh=mesh,
                            in_specs=(heads, heads, heads, rows, rows, P()),
                            out_specs=heads, check_vma=False)
    q, k, v = (pad_axis1(x, padded) for x in (q, k, v))
    return sharded(q, k, v, positions, segment_ids, window)[:, :length]


def ring_work(q, k, v, *, mesh: Mesh, axis_name: str = "seq", positions=None,
              segment_ids=None, causal: bool = True, sliding_window=None,
              layout: str | None = None, block_q: int = 256, block_k: int = 256) -> dict:
    """What `ring_attention`'s forward pass does on these inputs, per device of the ring:
    {"tiles": int [N] (query x key block tiles computed), "tiles_in_full_ring": int (per
    device, every tile of every hop), "hops": int (K/V transfers made), "hops_in_full_ring":
    N - 1, "hops_computed": int [N] (key slices, own included, whose tiles were looked at)}.
    Runs the same kernel."""
    _validate(q, k, v, mesh, axis_name, sliding_window, layout)
    positions, segment_ids, padded, options = _ring_setup(
        q, mesh, axis_name, positions, segment_ids, causal, sliding_window, layout, block_q,
        block_k)
    n = mesh.shape[axis_name]
    window = window_argument(sliding_window)
    other_axes = tuple(a for a in mesh.axis_names if a != axis_name)

    def count(q, k, v, pos, seg, window):
        _, _, tiles, computed = _ring_forward(q, k, v, pos, seg, pos, seg, window, **options)
        # identical on every batch/head shard only if they hold identical masks; sum them
        if other_axes:
            tiles, computed = jax.lax.psum(tiles, other_axes), jax.lax.pmax(computed, other_axes)
        return tiles[None], computed[None]

    heads, rows = _specs(mesh, axis_name)
    counted = jax.shard_map(count, mesh=mesh,
                            in_specs=(heads, heads, heads, rows, rows, P()),
                            out_specs=(P(axis_name), P(axis_name)), check_vma=False)
    q, k, v = (pad_axis1(x, padded) for x in (q, k, v))
    tiles, computed = jax.jit(counted)(q, k, v, positions, segment_ids, window)
    local = padded // n
    per_hop = block_plan(local, block_q)[1] * block_plan(local, block_k)[1]
    return {"tiles": np.asarray(tiles), "tiles_in_full_ring": per_hop * n,
            "hops": options["hops"], "hops_in_full_ring": n - 1,
            "hops_computed": np.asarray(computed)}


def ring_tiles_per_device(q, k, v, **kwargs):
    """How many (query block, key block) tiles each device of the ring computes in the
    forward pass: int32 [axis size] (`ring_work`'s "tiles")."""
    return ring_work(q, k, v, **kwargs)["tiles"]


@functools.lru_cache(maxsize=None)
def make_ring_attention(mesh: Mesh, *, axis_name: str = "seq", layout: str | None = None,
                        block_q: int = 256, block_k: int = 256, kernel: str = "blockwise"):
    """`ring_attention` bound to a mesh, with the attention-function signature the model
    layer calls: fn(q, k, v, *, positions, segment_ids, causal, sliding_window). One
    function object per argument set (cached), so models built with it compare equal and
    reuse compilations."""
    return functools.partial(ring_attention, mesh=mesh, axis_name=axis_name, layout=layout,
                             block_q=block_q, block_k=block_k, kernel=kernel)
