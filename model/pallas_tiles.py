"""What the Pallas attention kernels share, Triton's (model/pallas_attention.py) and Mosaic
TPU's (model/pallas_tpu_attention.py): the float32 tile matmuls, the masking rule on a
tile, and the padding of chunks to whole blocks with segment ids no real token has.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.masking import PAD_SEGMENT, visible_pairs

PADDED_KEY = PAD_SEGMENT + 1       # segment ids of padding added here: equal to no real one
PADDED_QUERY = PAD_SEGMENT + 2


def _precision(a):
    """Full precision for float32 tiles, the MXU's native one for 16-bit tiles, whatever
    jax_default_matmul_precision says (Mosaic rejects an fp32 contract on bf16 operands)."""
    return jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def dot(a, b):
    """a [m, k] @ b [k, n] in float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a),
                               preferred_element_type=jnp.float32)


def dot_t(a, b):
    """a [m, k] @ b[n, k].T in float32."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a),
                               preferred_element_type=jnp.float32)


def any_set(mask):
    """Whether any entry of a bool tile is set (Triton lowers no reduce_or)."""
    return jnp.max(jnp.where(mask, 1, 0)) > 0


def visible(q_pos, q_seg, k_pos, k_seg, window, causal: bool):
    """bool [bq, bk]: the masking rule of every kernel on a tile (query ids [bq, 1] or
    [bq], key ids [1, bk] or [bk])."""
    if q_pos.ndim == 1:
        q_pos, q_seg, k_pos, k_seg = q_pos[:, None], q_seg[:, None], k_pos[None], k_seg[None]
    return visible_pairs(q_pos, k_pos, q_seg, k_seg, causal, window)


def pad(x, length: int, axis: int, value=0):
    """x padded with `value` along `axis` to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def padded_ids(q_pos, k_pos, q_seg, k_seg, lq: int, lk: int):
    """Positions and segment ids [b, L] as int32, padded to lq / lk tokens; padded queries
    and keys get segment ids that match no real token (nor each other)."""
    return (pad(q_pos.astype(jnp.int32), lq, 1), pad(k_pos.astype(jnp.int32), lk, 1),
            pad(q_seg.astype(jnp.int32), lq, 1, PADDED_QUERY),
            pad(k_seg.astype(jnp.int32), lk, 1, PADDED_KEY))


# Head-major layout ([b, h, L, d], rows [b, h, L]): what the Mosaic kernel reads, and the
# Triton kernel's fallback. Callers hand [b, l, h, d] (and rows [b, l, h]), transposed here
# on each call, or, `heads_major`, arrays already head-major (a ring transposes once for
# all its hops).

def dims(q, k, heads_major: bool):
    """(batch, q length, q heads, head dim, k length, k heads)."""
    if heads_major:
        (b, hq, lq, d), (hk, lk) = q.shape, k.shape[1:3]
    else:
        (b, lq, hq, d), (lk, hk) = q.shape, k.shape[1:3]
    return b, lq, hq, d, lk, hk


def to_kernel(x, length: int, heads_major: bool, value=0):
    """An activation [b, l, h, d] or rows [b, l, h] (or, `heads_major`, [b, h, l, ...])
    as the kernels take it: head-major, padded to `length` tokens with `value`."""
    if heads_major:
        return pad(x, length, 2, value)
    return jnp.swapaxes(pad(x, length, 1, value), 1, 2)


def from_kernel(x, n: int, heads_major: bool):
    """A kernel's head-major output, its first `n` tokens, in the caller's layout."""
    return x[:, :, :n] if heads_major else jnp.swapaxes(x, 1, 2)[:, :n]


def kernel_accumulators(accumulators, operands, heads_major: bool):
    """(dq, dk, dv) float32 for a backward pass to add into (in place: they alias its
    outputs), head-major and padded like its operands (q, k, v); () when None."""
    if accumulators is None:
        return ()
    return tuple(to_kernel(a.astype(jnp.float32), x.shape[2], heads_major)
                 for a, x in zip(accumulators, operands))
