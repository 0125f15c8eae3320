"""A Pallas attention kernel with the blockwise contract (model/blockwise.py): one query chunk
against one key/value chunk, separate query and key segment ids (PAD_SEGMENT included),
global positions for causal masking and sliding windows, any lengths, GQA, and the per-row
log-sum-exp in natural log, so that partial results over disjoint key sets merge as the
blockwise kernel's do (`merge_partial_attention`).

Forward: FlashAttention's online softmax, one program per (row, query head, query block)
looping over the key blocks; a tile no query of the block can see (causal, other
documents, the window) is skipped, in every kernel. Backward (FlashAttention-2): one
kernel for dq (per query block, over the key blocks) and one for dk, dv (per key block,
over the query heads of its group and the query blocks), probabilities recomputed from the
saved log-sum-exp.

Written for Pallas' GPU (Triton) lowering; `interpret=True` runs the same kernel code on any
backend (the CPU tests check its numerics against the float64 reference). It reads the
caller's [b, L, h, d] in place (`Layout`: a free reshape to [b, L, h * d]). Lengths are
padded to whole blocks inside; padded keys and queries get segment ids no real token has.
`model.attention_kernel=pallas` runs it (on a TPU: model/pallas_tpu_attention.py's kernel) on
one device and in every sequence-parallel strategy (each ring hop, the all-gather's chunk,
Ulysses' and the hybrid's calls); `pallas_attention` and `pallas_chunk_attention` are the
differentiable entry points for either kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from model.blockwise import name_residuals, window_argument
from model.masking import MASKED, check_shapes, default_positions_and_segments
from model.pallas_tiles import any_set as _any
from model.pallas_tiles import dot as _dot
from model.pallas_tiles import dot_t as _dot_t
from model.pallas_tiles import finish_rows as _finish_rows
from model.pallas_tiles import Layout, dims, from_kernel, padded_ids, to_kernel
from model.pallas_tiles import visible as _visible
from model.pallas_tpu_attention import tpu_backward, tpu_forward

# The Pallas kernels by the name `choose_kernel` resolves `pallas` to, and the platform each
# is written for (elsewhere it runs in Pallas' interpreter)
PALLAS_KERNELS = {"pallas": "gpu", "pallas_tpu": "tpu"}
# Those that read head-major blocks ([b, h, L, d]); a ring hands them head-major arrays,
# transposed once per ring (`heads_major=True`). Triton's reads [b, L, h, d] in place.
HEADS_MAJOR_KERNELS = ("pallas_tpu",)
# Triton, not Mosaic GPU (Pallas' default on GPUs, which would stage each program's whole
# K/V in shared memory); interpret mode ignores it
_TRITON = pl_triton.CompilerParams(num_warps=4, num_stages=2)
# The largest Triton tile side: with heads of 128 and two pipeline stages, 512-token tiles
# ask 384 KiB of shared memory, over an H100's 227 KiB (XLA:GPU refused Llama-2-7B's)
MAX_BLOCK = 128


def _forward_kernel(*refs, causal, block_k, k_blocks, scale, windowed, accumulate):
    window_ref, refs = (refs[0], refs[1:]) if windowed else (None, refs)
    q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref = refs[:7]
    running_refs, (out_ref, lse_ref) = (refs[7:9], refs[9:]) if accumulate else ((), refs[7:])
    q = q_ref[...]                                                    # [bq, d]
    q_pos, q_seg = qp_ref[...], qs_ref[...]                           # [bq]
    window = window_ref[0] if windowed else None
    bq, d = q.shape

    def key_block(j, carry):
        keys = pl.ds(j * block_k, block_k)
        mask = _visible(q_pos, q_seg, kp_ref[keys], ks_ref[keys], window, causal)

        def compute(carry):
            acc, m, total = carry
            k, v = k_ref[keys, :], v_ref[keys, :]                     # [bk, d]
            s = jnp.where(mask, _dot_t(q, k) * scale, MASKED)         # [bq, bk]
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            correction = jnp.exp(m - m_new)
            acc = acc * correction[:, None] + _dot(p.astype(v.dtype), v)
            return acc, m_new, total * correction + jnp.sum(p, axis=1)

        # a tile no query of the block can see (causal, other documents, the window)
        return jax.lax.cond(_any(mask), compute, lambda carry: carry, carry)

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), MASKED, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, total = jax.lax.fori_loop(0, k_blocks, key_block, init)
    running = None
    if running_refs:                                  # the same buffers: merged in place
        running = (running_refs[0][...], running_refs[1][...][:, None])
    out, lse = _finish_rows(acc, m[:, None], total[:, None], running)
    out_ref[...] = out.astype(out_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _dq_kernel(*refs, causal, block_k, k_blocks, scale, windowed, accumulate):
    window_ref, refs = (refs[0], refs[1:]) if windowed else (None, refs)
    (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref) = refs[:10]
    dq_in_ref, dq_ref = (refs[10], refs[11]) if accumulate else (None, refs[10])
    q, d_out = q_ref[...], do_ref[...]                                # [bq, d]
    q_pos, q_seg = qp_ref[...], qs_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]                         # [bq]
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)      # rows that saw no key: p = 0 below
    window = window_ref[0] if windowed else None

    def key_block(j, dq):
        keys = pl.ds(j * block_k, block_k)
        mask = _visible(q_pos, q_seg, kp_ref[keys], ks_ref[keys], window, causal)

        def compute(dq):
            k, v = k_ref[keys, :], v_ref[keys, :]
            p = jnp.where(mask, jnp.exp(_dot_t(q, k) * scale - lse[:, None]), 0.0)
            ds = p * (_dot_t(d_out, v) - delta[:, None])              # [bq, bk]
            return dq + _dot(ds.astype(k.dtype), k)

        return jax.lax.cond(_any(mask), compute, lambda dq: dq, dq)

    dq = jax.lax.fori_loop(0, k_blocks, key_block, jnp.zeros(q.shape, jnp.float32))
    dq = dq * scale
    dq_ref[...] = dq if dq_in_ref is None else dq_in_ref[...] + dq   # one buffer: in place


def _dkv_kernel(*refs, causal, block_q, q_blocks, groups, scale, windowed, accumulate,
                token_major):
    window_ref, refs = (refs[0], refs[1:]) if windowed else (None, refs)
    (q_ref, k_ref, v_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref, delta_ref) = refs[:10]
    dk_ref, dv_ref = refs[-2:]
    k, v = k_ref[...], v_ref[...]                                     # [bk, d]
    k_pos, k_seg = kp_ref[...], ks_ref[...]
    window = window_ref[0] if windowed else None

    def query_block(g, i, carry):                     # the group's query head g, block i
        rows = pl.ds(i * block_q, block_q)
        mask = _visible(qp_ref[rows], qs_ref[rows], k_pos, k_seg, window, causal).T

        def compute(carry):
            dk, dv = carry
            if token_major:                           # [Lq, groups * d]: head g's columns
                head = pl.ds(g * k.shape[1], k.shape[1])
                q, d_out = q_ref[rows, head], do_ref[rows, head]       # [bq, d]
            else:                                     # [groups, Lq, d]
                q, d_out = q_ref[g, rows, :], do_ref[g, rows, :]
            lse, delta = lse_ref[g, rows], delta_ref[g, rows]
            lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
            p = jnp.where(mask, jnp.exp(_dot_t(k, q) * scale - lse[None, :]), 0.0)  # [bk, bq]
            dv = dv + _dot(p.astype(d_out.dtype), d_out)
            ds = p * (_dot_t(v, d_out) - delta[None, :])
            return dk + _dot(ds.astype(q.dtype), q), dv

        return jax.lax.cond(_any(mask), compute, lambda carry: carry, carry)

    def query_head(g, carry):
        return jax.lax.fori_loop(0, q_blocks, functools.partial(query_block, g), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, query_head, (zeros, zeros))
    dk = dk * scale
    if accumulate:                                  # the same buffers: added in place
        dk, dv = refs[10][...] + dk, refs[11][...] + dv
    dk_ref[...], dv_ref[...] = dk, dv


def _block_sizes(lq: int, lk: int, block_q: int, block_k: int) -> tuple[int, int]:
    """Power-of-two blocks (Triton's rule), at least 16, at most MAX_BLOCK and no larger
    than the chunk needs."""
    def size(length, block):
        return max(16, min(pl.next_power_of_2(block), pl.next_power_of_2(length), MAX_BLOCK))
    return size(lq, block_q), size(lk, block_k)


def _reads_token_major(d: int, groups: int, heads_major: bool) -> bool:
    """Whether the kernel reads the caller's [b, L, h, d] in place: d and the group size
    powers of two (Triton's block shapes), and the caller's arrays not head-major."""
    return not heads_major and all(n > 0 and n & (n - 1) == 0 for n in (d, groups))


def _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q: int, block_k: int,
             heads_major: bool):
    """The shapes, block sizes, layout and padded operands both passes start from:
    (b, lq, hq, d, lk, groups, block_q, block_k, layout, operands, padded lq, padded lk);
    operands q, k, v as `layout` reads them, positions and segment ids [b, L] (int32)."""
    b, lq, hq, d, lk, hk = dims(q, k, heads_major)
    block_q, block_k = _block_sizes(lq, lk, block_q, block_k)
    padded_q, padded_k = pl.cdiv(lq, block_q) * block_q, pl.cdiv(lk, block_k) * block_k
    layout = Layout(d, hq // hk, heads_major,
                    _reads_token_major(d, hq // hk, heads_major))
    qp, kp, qs, ks = padded_ids(q_pos, k_pos, q_seg, k_seg, padded_q, padded_k)
    operands = (layout.operand(q, padded_q), layout.operand(k, padded_k),
                layout.operand(v, padded_k), qp, kp, qs, ks)
    return (b, lq, hq, d, lk, hq // hk, block_q, block_k, layout, operands, padded_q,
            padded_k)


def _window_args(window):
    if window is None:
        return [], []
    return [jnp.asarray(window, jnp.int32).reshape(1)], [pl.BlockSpec((1,), lambda *_: (0,))]


def pallas_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal: bool, block_q: int = 128,
                   block_k: int = 128, window=None, interpret: bool = False,
                   heads_major: bool = False, out_dtype=jnp.float32, accumulators=None):
    """(out [b, lq, hq, d] out_dtype, lse [b, lq, hq] float32): `blockwise_forward`'s
    contract (lse -inf and out 0 for rows that see no key here; float32 out for merging
    hops, the activations' dtype for a single call). `accumulators` (out, lse) float32 of
    other key sets: returned merged with this one's (`merge_partial_attention`), in place.
    `heads_major`: q/k/v [b, h, l, d] in, out [b, hq, lq, d] and lse [b, hq, lq] out."""
    (b, lq, hq, d, lk, groups, block_q, block_k, layout, (qh, kh, vh, qp, kp, qs, ks),
     padded_q, padded_k) = _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k,
                                    heads_major)
    window_args, window_specs = _window_args(window)
    running = () if accumulators is None else (
        layout.operand(accumulators[0].astype(jnp.float32), padded_q),
        to_kernel(accumulators[1].astype(jnp.float32), padded_q, heads_major, -jnp.inf))
    first_running = len(window_args) + 7
    kernel = functools.partial(_forward_kernel, causal=causal, block_k=block_k,
                               k_blocks=padded_k // block_k, scale=float(1.0 / np.sqrt(d)),
                               windowed=window is not None, accumulate=bool(running))
    q_block = layout.block(block_q, lambda bi, hi, qi: (bi, hi, qi))
    kv_whole = layout.block(padded_k, lambda bi, hi, qi: (bi, hi // groups, 0))
    q_rows = pl.BlockSpec((None, block_q), lambda bi, hi, qi: (bi, qi))
    k_rows = pl.BlockSpec((None, padded_k), lambda bi, hi, qi: (bi, 0))
    lse_rows = pl.BlockSpec((None, None, block_q), lambda bi, hi, qi: (bi, hi, qi))
    out, lse = pl.pallas_call(
        kernel, grid=(b, hq, padded_q // block_q),
        in_specs=[*window_specs, q_block, kv_whole, kv_whole, q_rows, q_rows, k_rows, k_rows,
                  *[q_block, lse_rows] * bool(running)],
        out_specs=[q_block, lse_rows],
        input_output_aliases={first_running: 0, first_running + 1: 1} if running else {},
        out_shape=[jax.ShapeDtypeStruct(layout.shape(b, hq, padded_q), out_dtype),
                   jax.ShapeDtypeStruct((b, hq, padded_q), jnp.float32)],
        interpret=interpret, name="boundless_attention_forward", compiler_params=_TRITON,
    )(*window_args, qh, kh, vh, qp, qs, kp, ks, *running)
    return layout.result(out, lq), from_kernel(lse, lq, heads_major)


def pallas_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta, *, causal: bool,
                    block_q: int = 128, block_k: int = 128, window=None,
                    interpret: bool = False, heads_major: bool = False, accumulators=None):
    """(dq, dk, dv) in float32: `blockwise_backward`'s contract (lse from the forward pass
    over the whole key set, delta = sum(d_out * out, -1) [b, lq, hq]; `accumulators`
    (dq, dk, dv) float32 that the gradients are added to, in place); `heads_major` as in
    pallas_forward, for every argument and result."""
    (b, lq, hq, d, lk, groups, block_q, block_k, layout, (qh, kh, vh, qp, kp, qs, ks),
     padded_q, padded_k) = _prepare(q, k, v, q_pos, k_pos, q_seg, k_seg, block_q, block_k,
                                    heads_major)
    hk = hq // groups
    do = layout.operand(d_out.astype(q.dtype), padded_q)
    lse = to_kernel(lse, padded_q, heads_major, -jnp.inf)           # [b, hq, Lq]
    delta = to_kernel(delta, padded_q, heads_major)
    sums = () if accumulators is None else tuple(
        layout.operand(a.astype(jnp.float32), n)
        for a, n in zip(accumulators, (padded_q, padded_k, padded_k)))
    window_args, window_specs = _window_args(window)
    options = dict(causal=causal, scale=float(1.0 / np.sqrt(d)), windowed=window is not None,
                   accumulate=bool(sums))
    first_sum = len(window_args) + 10                 # the index of dq's (dk's) running sum

    q_block = layout.block(block_q, lambda bi, hi, qi: (bi, hi, qi))
    kv_whole = layout.block(padded_k, lambda bi, hi, qi: (bi, hi // groups, 0))
    rows = pl.BlockSpec((None, None, block_q), lambda bi, hi, qi: (bi, hi, qi))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, k_blocks=padded_k // block_k,
                          **options),
        grid=(b, hq, padded_q // block_q),
        in_specs=[*window_specs, q_block, kv_whole, kv_whole,
                  pl.BlockSpec((None, block_q), lambda bi, hi, qi: (bi, qi)),
                  pl.BlockSpec((None, block_q), lambda bi, hi, qi: (bi, qi)),
                  pl.BlockSpec((None, padded_k), lambda bi, hi, qi: (bi, 0)),
                  pl.BlockSpec((None, padded_k), lambda bi, hi, qi: (bi, 0)),
                  q_block, rows, rows, *[q_block] * bool(sums)],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(layout.shape(b, hq, padded_q), jnp.float32),
        input_output_aliases={first_sum: 0} if sums else {},
        interpret=interpret, name="boundless_attention_dq", compiler_params=_TRITON,
    )(*window_args, qh, kh, vh, qp, qs, kp, ks, do, lse, delta, *sums[:1])

    group_whole = layout.group(padded_q)
    group_rows = pl.BlockSpec((None, groups, padded_q), lambda bi, hi, ki: (bi, hi, 0))
    k_block = layout.block(block_k, lambda bi, hi, ki: (bi, hi, ki))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=block_q, q_blocks=padded_q // block_q,
                          groups=groups, token_major=layout.token_major, **options),
        grid=(b, hk, padded_k // block_k),
        in_specs=[*window_specs, group_whole, k_block, k_block,
                  pl.BlockSpec((None, padded_q), lambda bi, hi, ki: (bi, 0)),
                  pl.BlockSpec((None, padded_q), lambda bi, hi, ki: (bi, 0)),
                  pl.BlockSpec((None, block_k), lambda bi, hi, ki: (bi, ki)),
                  pl.BlockSpec((None, block_k), lambda bi, hi, ki: (bi, ki)),
                  group_whole, group_rows, group_rows, *[k_block, k_block] * bool(sums)],
        out_specs=[k_block, k_block],
        input_output_aliases={first_sum: 0, first_sum + 1: 1} if sums else {},
        out_shape=[jax.ShapeDtypeStruct(layout.shape(b, hk, padded_k), jnp.float32)] * 2,
        interpret=interpret, name="boundless_attention_dkv", compiler_params=_TRITON,
    )(*window_args, qh, kh, vh, qp, qs, kp, ks, do, lse, delta, *sums[1:])
    return layout.result(dq, lq), layout.result(dk, lk), layout.result(dv, lk)


def pallas_passes(kernel: str):
    """(forward, backward) of a Pallas kernel by name (PALLAS_KERNELS): the Triton kernel of
    this module, or Mosaic TPU's (model/pallas_tpu_attention.py); both keep the blockwise
    contract, so a ring hop takes either."""
    if kernel not in PALLAS_KERNELS:
        raise ValueError(f"no Pallas kernel {kernel!r}; expected one of {tuple(PALLAS_KERNELS)}")
    return (pallas_forward, pallas_backward) if kernel == "pallas" else (tpu_forward,
                                                                          tpu_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal, block_q, block_k,
               interpret, kernel):
    return _attention_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal, block_q,
                          block_k, interpret, kernel)[0]


def _attention_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, window, causal, block_q, block_k,
                   interpret, kernel):
    forward, _ = pallas_passes(kernel)
    out, lse = forward(q, k, v, q_pos, k_pos, q_seg, k_seg, causal=causal, block_q=block_q,
                       block_k=block_k, window=window, interpret=interpret,
                       out_dtype=q.dtype)         # one call: no float32 copy to merge
    out, lse = name_residuals(out, lse)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse)


def _attention_bwd(causal, block_q, block_k, interpret, kernel, residuals, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg, window, out, lse = residuals
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    _, backward = pallas_passes(kernel)
    dq, dk, dv = backward(q, k, v, q_pos, k_pos, q_seg, k_seg, lse, d_out, delta,
                          causal=causal, block_q=block_q, block_k=block_k, window=window,
                          interpret=interpret)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None,
            None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def pallas_attention(q, k, v, *, positions=None, segment_ids=None, causal=True,
                     sliding_window=None, block_q: int = 128, block_k: int = 128,
                     interpret: bool = False, kernel: str = "pallas"):
    """`blockwise_attention`'s contract (q [b, l, hq, d], k/v [b, l, hk, d] -> [b, l, hq, d])
    with a Pallas kernel (`kernel`: PALLAS_KERNELS) forward and backward."""
    check_shapes(q, k, v)
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    window = window_argument(sliding_window)
    return _attention(q, k, v, positions, positions, segment_ids, segment_ids, window,
                      bool(causal), block_q, block_k, interpret, kernel)


def pallas_chunk_attention(q, k, v, q_pos, k_pos, q_seg, k_seg, *, causal=True,
                           sliding_window=None, block_q: int = 128, block_k: int = 128,
                           interpret: bool = False, kernel: str = "pallas"):
    """The queries of one chunk over the keys of another (positions and segment ids for
    each), with a Pallas kernel forward and backward: `blockwise_chunk_attention`'s
    contract, what the all-gather strategy runs on each device."""
    check_shapes(q, k, v)
    return _attention(q, k, v, q_pos, k_pos, q_seg, k_seg, window_argument(sliding_window),
                      bool(causal), block_q, block_k, interpret, kernel)
