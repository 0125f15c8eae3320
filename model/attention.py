"""The attention layer and the dense reference attention.

`dot_product_attention` materialises the [q_len, k_len] scores: the slow reference every
fast path (model/blockwise.py, parallel/ring_attention.py) is tested against; its math
(`masked_attention`) also serves decoding over a KV cache (`cached_attention`). A query row
that sees no key returns zeros. Grouped-query attention reshapes queries to
[batch, len, kv_heads, groups, head_dim] instead of repeating K/V per query head.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model.blockwise import ATTENTION_OUT, blockwise_attention
from model.choices import ATTENTION_KINDS
from model.kv_cache import KVCache
from model.layers import add_bias, param, zeros
from model.masking import (MASKED, attention_mask, check_shapes, check_window,
                           default_positions_and_segments, group_queries)


def dot_product_attention(q, k, v, *, positions=None, segment_ids=None, causal=True,
                          sliding_window=None):
    """Reference attention: materialises the [q_len, k_len] score matrix.

    Scores and softmax run in float32 whatever the input dtype; the output has q's dtype.
    `sliding_window`: None, or w (tokens): a query sees keys at most w - 1 positions back.
    """
    check_shapes(q, k, v)
    check_window(sliding_window)
    positions, segment_ids = default_positions_and_segments(q, positions, segment_ids)
    if k.shape[1] != q.shape[1]:
        raise ValueError("self-attention: q and k must have the same length")
    mask = attention_mask(positions, positions, segment_ids, segment_ids, causal,
                          sliding_window)
    return masked_attention(q, k, v, mask)


def masked_attention(q, k, v, mask):
    """The dense math: q [b, lq, hq, d] attends to k, v [b, lk, hk, d] where `mask`
    [b, lq, lk] is True (float32 scores and softmax; a row with no key gives zeros)."""
    kv_heads, head_dim = k.shape[2], k.shape[3]
    qg = group_queries(q, kv_heads)                                  # [b, lq, hk, g, d]
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k,
                        preferred_element_type=jnp.float32) / np.sqrt(head_dim)
    mask = mask[:, None, None]                                        # [b, 1, 1, lq, lk]
    scores = jnp.where(mask, scores, MASKED)
    probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)     # empty rows -> 0
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    # named like a kernel's output (model/blockwise.py): the dense math has no residual of
    # its own to name, so save_attention_out keeps only this
    return checkpoint_name(out.reshape(q.shape).astype(q.dtype), ATTENTION_OUT)


def cached_attention(q, k, v, cache: KVCache, layer, window=None):
    """Decoding: write k, v [b, t, hk, d] (the new tokens) into layer `layer` of the cache
    at slots cache.length .. cache.length + t - 1, then let each new query attend to every
    slot of that layer up to its own (and, with a sliding `window`, not more than
    window - 1 slots back; the cache keeps every slot).

    Slot j holds position j (model/kv_cache.py), so the mask is the causal mask of
    `attention_mask` on slot indices; unfilled slots lie after every query and are masked.
    Returns (out [b, t, hq, d], the cache with the new keys/values; its length unchanged).
    """
    batch, t = q.shape[0], q.shape[1]
    start = cache.length
    zero = jnp.zeros((), jnp.int32)
    at = (layer, zero, start, zero, zero)
    k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype)[None], at)
    v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype)[None], at)
    max_len = cache.max_len
    q_slots = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (batch, t))
    k_slots = jnp.broadcast_to(jnp.arange(max_len, dtype=jnp.int32), (batch, max_len))
    mask = attention_mask(q_slots, k_slots, jnp.zeros_like(q_slots), jnp.zeros_like(k_slots),
                          causal=True, window=window)                 # [b, t, max_len]
    out = masked_attention(q, k_all[layer].astype(q.dtype), v_all[layer].astype(q.dtype), mask)
    return out, cache._replace(k=k_all, v=v_all)


AttentionFn = Callable[..., jax.Array]


def attention_function(name: str, *, block_q: int = 256, block_k: int = 256) -> AttentionFn:
    """The attention function a config name stands for (ring is added by parallel/):
    fn(q, k, v, *, positions, segment_ids, causal, sliding_window)."""
    if name == "dense":
        return dot_product_attention
    if name == "blockwise":
        return functools.partial(blockwise_attention, block_q=block_q, block_k=block_k)
    raise ValueError(f"unknown model.attention {name!r}: expected one of {ATTENTION_KINDS}")


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions applied by the caller's hook.

    Weights: wq [d_model, q_heads, head_dim], wk/wv [d_model, kv_heads, head_dim],
    wo [q_heads, head_dim, d_model], each tagged with logical axis names. Optional zero-
    initialised biases: q_bias [q_heads, head_dim], k_bias/v_bias [kv_heads, head_dim]
    (`qkv_bias`, Qwen2 and GPT-2) and out_bias [d_model] (`out_bias`, GPT-2); they draw no
    key, so the weights are the same with or without them.
    """

    def __init__(self, d_model: int, q_heads: int, kv_heads: int, head_dim: int, *,
                 attention_fn: AttentionFn, init_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs, qkv_bias: bool = False, out_bias: bool = False):
        init = nnx.initializers.normal(init_std)
        self.wq = param(rngs, (d_model, q_heads, head_dim), ("embed", "heads", None), init,
                        param_dtype)
        self.wk = param(rngs, (d_model, kv_heads, head_dim), ("embed", "kv_heads", None), init,
                        param_dtype)
        self.wv = param(rngs, (d_model, kv_heads, head_dim), ("embed", "kv_heads", None), init,
                        param_dtype)
        self.wo = param(rngs, (q_heads, head_dim, d_model), ("heads", None, "embed"), init,
                        param_dtype)
        if qkv_bias:
            self.q_bias = zeros((q_heads, head_dim), ("heads", None), param_dtype)
            self.k_bias = zeros((kv_heads, head_dim), ("kv_heads", None), param_dtype)
            self.v_bias = zeros((kv_heads, head_dim), ("kv_heads", None), param_dtype)
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.out_bias = zeros((d_model,), ("embed",), param_dtype) if out_bias else None
        self.attention_fn = attention_fn
        self.dtype = dtype

    def __call__(self, x, positions, segment_ids, rotate: Callable | None = None,
                 cache: KVCache | None = None, layer=None, *,
                 collect_kv: bool = False, cache_attention: Callable | None = None,
                 window=None):
        """x [batch, length, d_model] -> [batch, length, d_model].

        `window`: this layer's sliding window (None: full attention; an int, or a traced
        int32 when the scanned layers differ).

        `rotate(t, positions)` applies the position encoding to q and k (RoPE), or None;
        the q/k biases are added before it, as in Hugging Face's Qwen2.

        With `cache` (decoding), x holds the new tokens, which occupy slots cache.length..
        of layer `layer`; `cache_attention(q, k, v, cache, layer)` (default
        `cached_attention`: dense, segment ids unused; parallel/sharded_cache.py has one
        for a cache split over devices; both take `window=`) attends over the cache, and
        the result is (out, updated cache). With `collect_kv` (a prefill over the whole sequence),
        attention runs as without a cache and the result is (out, (k, v)) of these
        tokens, in the compute dtype.
        """
        x = x.astype(self.dtype)
        q = jnp.einsum("bld,dhk->blhk", x, self.wq[...].astype(self.dtype))
        k = jnp.einsum("bld,dhk->blhk", x, self.wk[...].astype(self.dtype))
        v = jnp.einsum("bld,dhk->blhk", x, self.wv[...].astype(self.dtype))
        q = add_bias(q, self.q_bias, self.dtype)
        k = add_bias(k, self.k_bias, self.dtype)
        v = add_bias(v, self.v_bias, self.dtype)
        if rotate is not None:
            q, k = rotate(q, positions), rotate(k, positions)
        extra = None
        if cache is not None:
            out, extra = (cache_attention or cached_attention)(q, k, v, cache, layer,
                                                               window=window)
        else:
            out = self.attention_fn(q, k, v, positions=positions, segment_ids=segment_ids,
                                    causal=True, sliding_window=window)  # [b, l, hq, head_dim]
            if collect_kv:
                extra = (k, v)
        out = jnp.einsum("blhk,hkd->bld", out.astype(self.dtype), self.wo[...].astype(self.dtype))
        out = add_bias(out, self.out_bias, self.dtype)
        return out if extra is None else (out, extra)
