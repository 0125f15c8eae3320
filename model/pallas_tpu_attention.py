"""The Pallas attention kernel for TPUs (Mosaic), with the blockwise contract of
model/blockwise.py, as model/pallas_attention.py's Triton kernel has it: separate query and
key segment ids (PAD_SEGMENT included), global positions for causal masking and sliding
windows, any lengths, GQA, and the per-row log-sum-exp in natural log.

Why our own and not splash attention: splash's masks are static (NumPy) arrays, and a ring
hop's causal offset depends on the device and the hop, a traced value; here the mask comes
from the position and segment arrays on every tile, as in every other kernel.

Mosaic runs a grid sequentially on a core, so the reductions are grid axes ("arbitrary")
with VMEM scratch accumulators, where the Triton kernel loops inside a program:
- forward: grid (row, query head, query block, key block), online softmax;
- dq: grid (row, query head, query block, key block);
- dk, dv: grid (row, key head, key block, query head of the group, query block).
A tile no query of its block can see is skipped (`pl.when`); its DMA still happens.

Layouts Mosaic tiles well: blocks of 128-multiples along the sequence; positions, segment
ids, the log-sum-exp and delta as lane-dense rows [b, 1, L] / [b, h, 1, L], turned into
columns inside the kernel by one transpose per block (not stored 128 times over).
`interpret=True` runs the same kernel in Pallas' interpreter on any backend.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.masking import MASKED, visible_pairs
from model.pallas_tiles import (Layout, any_set, dims, dot, dot_t, finish_rows, from_kernel,
                                padded_ids, to_kernel, visible)

LANES = 128                        # a TPU vector register's lanes: the block granule


def _column(row):
    """[1, n] -> [n, 1] (Mosaic transposes whole (8, 128) tiles, hence the broadcast)."""
    return jnp.broadcast_to(row, (LANES, row.shape[1])).T[:, :1]


def _row(column):
    """[n, 1] -> [1, n]."""
    return jnp.broadcast_to(column, (column.shape[0], LANES)).T[:1, :]


def _group_of(head, groups: int):
    """The key head of query `head` (lax.div: floor division lowers to a sign op Mosaic
    resolves against the host's platform)."""
    return jax.lax.div(head, jnp.asarray(groups, head.dtype))


def _window(window_ref):
    return None if window_ref is None else window_ref[0]


def _forward_kernel(*refs, causal, scale, windowed, accumulate):
    window_ref, refs = (refs[0], refs[1:]) if windowed else (None, refs)
    q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref = refs[:7]
    running_refs, refs = (refs[7:9], refs[9:]) if accumulate else ((), refs[7:])
    out_ref, lse_ref, acc_ref, max_ref, total_ref, q_pos_ref, q_seg_ref = refs
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _start():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        max_ref[...] = jnp.full_like(max_ref, MASKED)
        total_ref[...] = jnp.zeros_like(total_ref)
        q_pos_ref[...], q_seg_ref[...] = _column(qp_ref[...]), _column(qs_ref[...])

    mask = visible(q_pos_ref[...], q_seg_ref[...], kp_ref[...], ks_ref[...],
                   _window(window_ref), causal)                       # [bq, bk]

    @pl.when(any_set(mask))
    def _tile():
        v = v_ref[...]
        s = jnp.where(mask, dot_t(q_ref[...], k_ref[...]) * scale, MASKED)     # [bq, bk]
        m_old = max_ref[...]                                          # [bq, 1]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        correction = jnp.exp(m_old - m_new)
        acc_ref[...] = acc_ref[...] * correction + dot(p.astype(v.dtype), v)
        total_ref[...] = total_ref[...] * correction + jnp.sum(p, axis=1, keepdims=True)
        max_ref[...] = m_new

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():
        running = None
        if running_refs:                              # the same buffers: merged in place
            running = (running_refs[0][...], _column(running_refs[1][...]))
        out, lse = finish_rows(acc_ref[...], max_ref[...], total_ref[...], running)
        out_ref[...] = out.astype(out_ref.dtype)
        lse_ref[...] = _row(lse)


def _dq_kernel(*refs, causal, scale, windowed, accumulate):
    window_ref, refs = (refs[0], refs[1:]) if windowed else (None, refs)
    (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref) = refs[:10]
    dq_in_ref, refs = (refs[10], refs[11:]) if accumulate else (None, refs[10:])
    dq_ref, acc_ref, q_pos_ref, q_seg_ref, lse_col_ref, delta_col_ref = refs
    key_block = pl.program_id(3)

    @pl.when(key_block == 0)
    def _start():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        q_pos_ref[...], q_seg_ref[...] = _column(qp_ref[...]), _column(qs_ref[...])
        lse = lse_ref[...]
        lse_col_ref[...] = _column(jnp.where(jnp.isfinite(lse), lse, 0.0))  # unseen: p = 0
        delta_col_ref[...] = _column(delta_ref[...])

    mask = visible(q_pos_ref[...], q_seg_ref[...], kp_ref[...], ks_ref[...],
                   _window(window_ref), causal)                       # [bq, bk]

    @pl.when(any_set(mask))
    def _tile():
        q, k = q_ref[...], k_ref[...]
        p = jnp.where(mask, jnp.exp(dot_t(q, k) * scale - lse_col_ref[...]), 0.0)
        ds = p * (dot_t(do_ref[...], v_ref[...]) - delta_col_ref[...])          # [bq, bk]
        acc_ref[...] += dot(ds.astype(k.dtype), k)

    @pl.when(key_block == pl.num_programs(3) - 1)
    def _finish():
        dq = acc_ref[...] * scale
        dq_ref[...] = dq if dq_in_ref is None else dq_in_ref[...] + dq   # one buffer: in place


def _dkv_kernel(*refs, causal, scale, windowed, accumulate):
    window_ref, refs = (refs[0], refs[1:]) if windowed else (None, refs)
    (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref) = refs[:10]
    sum_refs, refs = (refs[10:12], refs[12:]) if accumulate else ((), refs[10:])
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref, k_pos_ref, k_seg_ref = refs
    first = (pl.program_id(3) == 0) & (pl.program_id(4) == 0)
    last = ((pl.program_id(3) == pl.num_programs(3) - 1)
            & (pl.program_id(4) == pl.num_programs(4) - 1))

    @pl.when(first)
    def _start():
        dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
        dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)
        k_pos_ref[...], k_seg_ref[...] = _column(kp_ref[...]), _column(ks_ref[...])

    # keys are the tile's rows: query rows [1, bq] against key columns [bk, 1] -> [bk, bq]
    mask = visible_pairs(qp_ref[...], k_pos_ref[...], qs_ref[...], k_seg_ref[...], causal,
                         _window(window_ref))

    @pl.when(any_set(mask))
    def _tile():
        q, k, d_out = q_ref[...], k_ref[...], do_ref[...]
        lse = lse_ref[...]                                            # [1, bq]
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        p = jnp.where(mask, jnp.exp(dot_t(k, q) * scale - lse), 0.0)  # [bk, bq]
        dv_acc_ref[...] += dot(p.astype(d_out.dtype), d_out)
        ds = p * (dot_t(v_ref[...], d_out) - delta_ref[...])
        dk_acc_ref[...] += dot(ds.astype(q.dtype), q)

    @pl.when(last)
    def _finish():
        dk, dv = dk_acc_ref[...] * scale, dv_acc_ref[...]
        if sum_refs:                                  # the same buffers: added in place
            dk, dv = sum_refs[0][...] + dk, sum_refs[1][...] + dv
        dk_ref[...], dv_ref[...] = dk, dv


def block_size(length: int, block: int) -> int:
    """A multiple of 128 near `block`, no larger than the chunk needs."""
    granule = lambda n: -(-n // LANES) * LANES                        # noqa: E731
    return min(granule(block), granule(length))


def _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k, heads_major):
    """(block_q, block_k, padded lengths, layout, q/k/v as it reads them, id rows
    [b, 1, L]). Always head-major: XLA:TPU already lays [b, L, h, d] out head-major
    (minor-to-major {3,1,2,0}), so the transposes are bitcasts, and a token-major
    [b, L, h * d] view would be a relayout copy (tried: ring attention, 32k tokens on
    v5p seq 8, 98.3 -> 129.6 MiB of temp)."""
    _, n_q, hq, d, n_k, hk = dims(q, k, heads_major)
    block_q, block_k = block_size(n_q, block_q), block_size(n_k, block_k)
    lq, lk = pl.cdiv(n_q, block_q) * block_q, pl.cdiv(n_k, block_k) * block_k
    layout = Layout(d, hq // hk, heads_major, token_major=False)
    ids = [x[:, None, :] for x in padded_ids(q_pos, k_pos, q_seg, k_seg, lq, lk)]
    return (block_q, block_k, lq, lk, layout, layout.operand(q, lq), layout.operand(k, lk),
            layout.operand(v, lk), *ids)


def _window_args(window):
    if window is None:
        return [], []
    return ([jnp.asarray(window, jnp.int32).reshape(1)],
            [pl.BlockSpec(memory_space=pltpu.SMEM)])


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _query_grid_specs(layout: Layout, block_q: int, block_k: int):
    """BlockSpecs of the grid (row, query head, query block, key block) that the forward
    and dq passes share: (query block, its head's K/V block, query id row, key id row,
    the head's row of per-query values: lse, delta)."""
    groups = layout.groups
    return (layout.block(block_q, lambda bi, hi, qi, ki: (bi, hi, qi)),
            layout.block(block_k, lambda bi, hi, qi, ki: (bi, _group_of(hi, groups), ki)),
            pl.BlockSpec((None, 1, block_q), lambda bi, hi, qi, ki: (bi, 0, qi)),
            pl.BlockSpec((None, 1, block_k), lambda bi, hi, qi, ki: (bi, 0, ki)),
            pl.BlockSpec((None, None, 1, block_q), lambda bi, hi, qi, ki: (bi, hi, 0, qi)))


def tpu_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal: bool, block_q: int = 128,
                block_k: int = 128, window=None, interpret: bool = False,
                heads_major: bool = False, out_dtype=jnp.float32, accumulators=None):
    """(out [b, lq, hq, d] out_dtype, lse [b, lq, hq] float32): `blockwise_forward`'s
    contract (lse -inf and out 0 for rows that see no key here; float32 out for merging
    hops, the activations' dtype for a single call). `accumulators` (out, lse) float32 of
    other key sets: returned merged with this one's (`merge_partial_attention`), in place.
    `heads_major`: q/k/v [b, h, l, d] in, out [b, hq, lq, d] and lse [b, hq, lq] out."""
    b, n_q, hq, d, _, _ = dims(q, k, heads_major)
    block_q, block_k, lq, lk, layout, qh, kh, vh, qp, kp, qs, ks = _prepare(
        q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k, heads_major)
    window_args, window_specs = _window_args(window)
    q_block, kv_block, q_row, k_row, lse_row = _query_grid_specs(layout, block_q, block_k)
    running = () if accumulators is None else (
        layout.operand(accumulators[0].astype(jnp.float32), lq),
        to_kernel(accumulators[1].astype(jnp.float32), lq, heads_major, -jnp.inf)[:, :, None])
    first_running = len(window_args) + 7
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, causal=causal, scale=float(1.0 / np.sqrt(d)),
                          windowed=window is not None, accumulate=bool(running)),
        grid=(b, hq, lq // block_q, lk // block_k),
        in_specs=[*window_specs, q_block, kv_block, kv_block, q_row, q_row, k_row, k_row,
                  *[q_block, lse_row] * bool(running)],
        out_specs=[q_block, lse_row],
        input_output_aliases={first_running: 0, first_running + 1: 1} if running else {},
        out_shape=[jax.ShapeDtypeStruct(layout.shape(b, hq, lq), out_dtype),
                   jax.ShapeDtypeStruct((b, hq, 1, lq), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.int32),
                        pltpu.VMEM((block_q, 1), jnp.int32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret, name="boundless_attention_forward",
    )(*window_args, qh, kh, vh, qp, qs, kp, ks, *running)
    return layout.result(out, n_q), from_kernel(lse[:, :, 0], n_q, heads_major)


def tpu_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta, *, causal: bool,
                 block_q: int = 128, block_k: int = 128, window=None,
                 interpret: bool = False, heads_major: bool = False, accumulators=None):
    """(dq, dk, dv) in float32: `blockwise_backward`'s contract (lse from the forward pass
    over the whole key set, delta = sum(d_out * out, -1) [b, lq, hq]; `accumulators`
    (dq, dk, dv) float32 that the gradients are added to, in place); `heads_major` as in
    tpu_forward, for every argument and result."""
    b, n_q, hq, d, n_k, hk = dims(q, k, heads_major)
    groups = hq // hk
    block_q, block_k, lq, lk, layout, qh, kh, vh, qp, kp, qs, ks = _prepare(
        q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k, heads_major)
    do = layout.operand(d_out.astype(q.dtype), lq)
    rows = lambda x, value: to_kernel(  # noqa: E731
        x.astype(jnp.float32), lq, heads_major, value)[:, :, None]
    lse, delta = rows(lse, -jnp.inf), rows(delta, 0.0)                # [b, hq, 1, Lq]
    sums = () if accumulators is None else tuple(     # added to in place: they alias
        layout.operand(a.astype(jnp.float32), n)      # the outputs
        for a, n in zip(accumulators, (lq, lk, lk)))
    window_args, window_specs = _window_args(window)
    options = dict(causal=causal, scale=float(1.0 / np.sqrt(d)), windowed=window is not None,
                   accumulate=bool(sums))
    first_sum = len(window_args) + 10                 # the index of dq's (dk's) running sum

    q_block, kv_block, q_row, k_row, head_row = _query_grid_specs(layout, block_q, block_k)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **options),
        grid=(b, hq, lq // block_q, lk // block_k),
        in_specs=[*window_specs, q_block, kv_block, kv_block, q_row, q_row, k_row, k_row,
                  q_block, head_row, head_row, *[q_block] * bool(sums)],
        out_specs=q_block,
        input_output_aliases={first_sum: 0} if sums else {},
        out_shape=jax.ShapeDtypeStruct(layout.shape(b, hq, lq), jnp.float32),
        scratch_shapes=[pltpu.VMEM((block_q, d), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.int32),
                        pltpu.VMEM((block_q, 1), jnp.int32),
                        pltpu.VMEM((block_q, 1), jnp.float32),
                        pltpu.VMEM((block_q, 1), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret, name="boundless_attention_dq",
    )(*window_args, qh, kh, vh, qp, qs, kp, ks, do, lse, delta, *sums[:1])

    # grid (row, key head, key block, query head of the group, query block)
    query_head = lambda hi, gi: hi * groups + gi                      # noqa: E731
    g_block = layout.block(block_q, lambda bi, hi, ki, gi, qi: (bi, query_head(hi, gi), qi))
    k_block = layout.block(block_k, lambda bi, hi, ki, gi, qi: (bi, hi, ki))
    g_q_row = pl.BlockSpec((None, 1, block_q), lambda bi, hi, ki, gi, qi: (bi, 0, qi))
    g_k_row = pl.BlockSpec((None, 1, block_k), lambda bi, hi, ki, gi, qi: (bi, 0, ki))
    g_head_row = pl.BlockSpec((None, None, 1, block_q),
                              lambda bi, hi, ki, gi, qi: (bi, query_head(hi, gi), 0, qi))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **options),
        grid=(b, hk, lk // block_k, groups, lq // block_q),
        in_specs=[*window_specs, g_block, k_block, k_block, g_q_row, g_q_row, g_k_row,
                  g_k_row, g_block, g_head_row, g_head_row, *[k_block, k_block] * bool(sums)],
        out_specs=[k_block, k_block],
        input_output_aliases={first_sum: 0, first_sum + 1: 1} if sums else {},
        out_shape=[jax.ShapeDtypeStruct(layout.shape(b, hk, lk), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((block_k, d), jnp.float32),
                        pltpu.VMEM((block_k, d), jnp.float32),
                        pltpu.VMEM((block_k, 1), jnp.int32),
                        pltpu.VMEM((block_k, 1), jnp.int32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        interpret=interpret, name="boundless_attention_dkv",
    )(*window_args, qh, kh, vh, qp, qs, kp, ks, do, lse, delta, *sums[1:])
    return layout.result(dq, n_q), layout.result(dk, n_k), layout.result(dv, n_k)
