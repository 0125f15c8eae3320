"""A KV cache split over the `seq` axis of a mesh, and decoding attention over it.

The cache (model/kv_cache.py) is [n_layers, batch, max_len, kv_heads, head_dim] with its
slots split into contiguous parts over `seq` (device i holds slots
[i * max_len / n, (i + 1) * max_len / n)), rows over data/fsdp and heads over `tensor`, as a
prefill with ring attention leaves them. A decoding step's new tokens are small and
replicated over `seq`: every device writes those that fall into its part, attends to its own
slots (the blockwise kernel's partial attention, float32) and the parts merge by log-sum-exp
across the axis, so no device ever holds the whole cache.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model.blockwise import blockwise_forward
from model.kv_cache import KVCache
from parallel.mesh import heads_spec


def cache_sharding(mesh: Mesh, axis_name: str = "seq") -> NamedSharding:
    """Sharding of the cache's k or v [n_layers, batch, max_len, kv_heads, head_dim]."""
    return NamedSharding(mesh, P(None, *heads_spec(mesh, axis_name)))


def merge_over_axis(out, lse, axis_name: str):
    """Attention over the union of every device's keys from each device's partial result.

    out [b, t, h, d] float32 normalised over this device's keys, lse [b, t, h] their
    log-sum-exp (-inf where none is visible). Returns the merged out (zeros for a row no
    device sees a key for).
    """
    top = jax.lax.pmax(jnp.where(jnp.isfinite(lse), lse, -jnp.inf), axis_name)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weight = jnp.where(jnp.isfinite(lse), jnp.exp(lse - top), 0.0)          # [b, t, h]
    total = jax.lax.psum(weight, axis_name)
    summed = jax.lax.psum(out * weight[..., None], axis_name)
    return jnp.where(total[..., None] > 0, summed / jnp.where(total > 0, total, 1.0)[..., None],
                     0.0)


@functools.lru_cache(maxsize=None)
def sharded_cached_attention(mesh: Mesh, axis_name: str = "seq"):
    """The `cache_attention` function (model/attention.py, `cached_attention`'s contract)
    for a cache laid out by `cache_sharding(mesh)`: (q, k, v, cache, layer) ->
    (out [b, t, hq, d], the cache with the new keys/values in layer `layer`). Slot j holds
    position j; the new tokens take slots cache.length .. + t - 1 and each attends to the
    slots up to its own (with `window=w`, the last w of them). One function object per mesh
    (cached), so jitted callers that take it as a static argument reuse their compilation."""
    cache_spec, new_spec = cache_sharding(mesh, axis_name).spec, heads_spec(mesh)

    def local(q, k, v, cache_k, cache_v, layer, start, window):
        # q [b, t, hq, d], k/v [b, t, hk, d]: the new tokens (every device has them);
        # cache_k/v [n_layers, b, part, hk, d]: this device's slots of every layer
        batch, t = q.shape[0], q.shape[1]
        part = cache_k.shape[2]
        first = jax.lax.axis_index(axis_name) * part                       # its first slot
        slots = start + jnp.arange(t, dtype=jnp.int32)                       # [t]
        local_slots = slots - first
        mine = (local_slots >= 0) & (local_slots < part)
        index = jnp.where(mine, local_slots, part)                           # part: dropped
        cache_k = cache_k.at[layer, :, index].set(jnp.moveaxis(k, 1, 0).astype(cache_k.dtype),
                                                  mode="drop")
        cache_v = cache_v.at[layer, :, index].set(jnp.moveaxis(v, 1, 0).astype(cache_v.dtype),
                                                  mode="drop")
        q_pos = jnp.broadcast_to(slots, (batch, t))
        k_pos = jnp.broadcast_to(first + jnp.arange(part, dtype=jnp.int32), (batch, part))
        out, lse, _ = blockwise_forward(
            q, cache_k[layer].astype(q.dtype), cache_v[layer].astype(q.dtype), q_pos, k_pos,
            jnp.zeros_like(q_pos), jnp.zeros_like(k_pos), causal=True, block_q=t,
            block_k=part, window=window)
        out = merge_over_axis(out, lse, axis_name)
        return out.astype(q.dtype), cache_k, cache_v

    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(new_spec, new_spec, new_spec, cache_spec, cache_spec, P(), P(), P()),
        out_specs=(new_spec, cache_spec, cache_spec), check_vma=False)

    def attend(q, k, v, cache: KVCache, layer, window=None):
        # no window: one that reaches every slot (the cache holds fewer than 2^31)
        window = jnp.asarray(np.iinfo(np.int32).max if window is None else window, jnp.int32)
        out, cache_k, cache_v = sharded(q, k, v, cache.k, cache.v, jnp.asarray(layer, jnp.int32),
                                        jnp.asarray(cache.length, jnp.int32), window)
        return out, cache._replace(k=cache_k, v=cache_v)

    return attend
