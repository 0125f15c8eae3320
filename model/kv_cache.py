"""The key/value cache of autoregressive decoding: plain arrays, every layer stacked.

`KVCache(k, v, length)`: k and v are [n_layers, batch, max_len, kv_heads, head_dim] in the
model's compute dtype (one slice per decoder block, as the blocks' parameters are
stacked); `length` (int32 scalar) is how many slots are filled. Slot j holds the key/value
of the token at position j of one sequence that starts at position 0 (no packing, no
padding): decoding writes the new tokens at slots length .. length + t - 1 and attends
over slots <= its own (model/attention.py, `cached_attention`). The caller sizes the cache:
a write past max_len is not detected inside jit (lax.dynamic_update_slice clamps its
start). A NamedTuple, so the cache is a pytree that jit, lax loops and device_put take as
it is.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    k: jax.Array          # [n_layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array          # [n_layers, batch, max_len, kv_heads, head_dim]
    length: jax.Array     # int32 scalar: the filled slots

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch(self) -> int:
        return self.k.shape[1]


def empty_cache(n_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
                dtype) -> KVCache:
    """A cache of `max_len` zero slots per layer, none filled."""
    shape = (n_layers, batch, max_len, kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))
