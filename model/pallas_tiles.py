"""What the Pallas attention kernels share, Triton's (model/pallas_attention.py) and Mosaic
TPU's (model/pallas_tpu_attention.py): the float32 tile matmuls, the masking rule on a
tile, a query block's finish (normalised out and log-sum-exp, merged in place into a ring's
running pair), the padding of chunks to whole blocks with segment ids no real token has,
and where activations lie (`Layout`: token-major in place, or head-major).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

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


def finish_rows(acc, m, total, running=None):
    """(out [bq, d] float32, lse [bq, 1]) of a query block from its online-softmax state
    (acc [bq, d], running max m and sum total [bq, 1]): out 0 and lse -inf for rows that saw
    no key. With `running` (out, lse) from other key sets, merged with it by
    `merge_partial_attention`'s rule (what a ring hop does in place)."""
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    out = jnp.where(seen, acc / safe, 0.0)
    lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    if running is None:
        return out, lse
    old_out, old_lse = running
    top = jnp.maximum(old_lse, lse)
    finite = top > -jnp.inf                          # rows neither key set reached stay 0
    top = jnp.where(finite, top, 0.0)
    old_weight, new_weight = jnp.exp(old_lse - top), jnp.exp(lse - top)   # one of them 1
    norm = jnp.where(finite, old_weight + new_weight, 1.0)
    merged = (old_out * old_weight + out * new_weight) / norm
    return merged, jnp.where(finite, top + jnp.log(norm), -jnp.inf)


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


class Layout:
    """Where a kernel reads and writes activations. Token-major, [b, L, h * d]: a free
    reshape of the caller's [b, L, h, d], each block one head's d columns (`token_major`:
    the kernel's rule for when its block shapes allow it). Otherwise head-major,
    [b, h, L, d]: the caller's own (`heads_major`) or a transposed copy. Rows of per-query
    values (lse, delta) are head-major, [b, h, L], either way."""

    def __init__(self, d: int, groups: int, heads_major: bool, token_major: bool):
        self.d, self.groups, self.heads_major = d, groups, heads_major
        self.token_major = token_major and not heads_major

    def operand(self, x, length: int):
        """The caller's activation as the kernel reads it, padded to `length` tokens."""
        if self.token_major:
            x = pad(x, length, 1)
            return x.reshape(x.shape[0], length, -1)
        return to_kernel(x, length, self.heads_major)

    def result(self, x, n: int):
        """A kernel's activation output, its first `n` tokens, in the caller's layout."""
        if self.token_major:
            return x.reshape(x.shape[0], x.shape[1], -1, self.d)[:, :n]
        return from_kernel(x, n, self.heads_major)

    def shape(self, b: int, heads: int, length: int) -> tuple:
        return (b, length, heads * self.d) if self.token_major else (b, heads, length, self.d)

    def block(self, rows: int, pick):
        """BlockSpec of one head's `rows` tokens; pick(*grid) -> (row, head, block)."""
        if self.token_major:
            return pl.BlockSpec((None, rows, self.d),
                                lambda *grid: (lambda b, h, i: (b, i, h))(*pick(*grid)))
        return pl.BlockSpec((None, None, rows, self.d),
                            lambda *grid: (lambda b, h, i: (b, h, i, 0))(*pick(*grid)))

    def group(self, length: int):
        """BlockSpec of every token of the query heads of key head `hi`, grid (b, hi, ki)."""
        if self.token_major:
            return pl.BlockSpec((None, length, self.groups * self.d),
                                lambda bi, hi, ki: (bi, 0, hi))
        return pl.BlockSpec((None, self.groups, length, self.d),
                            lambda bi, hi, ki: (bi, hi, 0, 0))
