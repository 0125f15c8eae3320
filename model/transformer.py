"""A Llama-style decoder-only transformer in Flax NNX.

token embedding (+ learned positions) -> n_layers x [norm -> attention -> residual,
norm -> MLP -> residual] -> norm -> LM head (tied to the embedding or not).

The defaults are Llama's (RMSNorm, SwiGLU, no biases); the options that other families need
(model.norm, model.mlp and the bias switches: GPT-2's LayerNorm, GELU MLP and biases,
Qwen2's q/k/v biases) are fields of ModelConfig, not a second model.

The model knows nothing about devices: every activation is [batch, length, ...] and every
parameter carries logical axis names ("vocab", "embed", "heads", "kv_heads", "mlp") that
parallel/mesh.py maps onto mesh axes. Positions and segment ids arrive as data with the
tokens, so packed rows, permuted (zigzag) layouts and any evaluation length need no
special code here.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import positions as pos_lib
from model.attention import Attention, AttentionFn, attention_function
from model import remat as remat_lib
from model.choices import (SEQUENCE_PARALLEL)
from model.chunks import chunk_count, map_chunks
from model.kv_cache import KVCache, empty_cache
from model.model_config import ModelConfig
from model.layers import make_mlp, make_norm, param


class Block(nnx.Module):
    """One pre-norm decoder block (norm and MLP kinds and biases as `cfg` says)."""

    def __init__(self, cfg: ModelConfig, attention_fn: AttentionFn, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.attention_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, param_dtype, rngs)
        self.attention = Attention(cfg.d_model, cfg.q_heads, cfg.kv_heads, cfg.head_dim,
                                   attention_fn=attention_fn, init_std=cfg.init_std,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                   qkv_bias=cfg.qkv_bias, out_bias=cfg.attention_out_bias)
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, param_dtype, rngs)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.mlp_dim, cfg.init_std, dtype, param_dtype,
                            rngs, bias=cfg.mlp_bias)
        self.mlp_chunk_tokens = cfg.mlp_chunk_tokens

    def __call__(self, x, positions, segment_ids, rotate, cache=None, layer=None, *,
                 collect_kv: bool = False, cache_attention=None, window=None):
        """x -> x; with a cache, (x, updated cache); with `collect_kv`, (x, (k, v)) of this
        layer (model/attention.py). `window`: this layer's sliding window or None."""
        attended = self.attention(self.attention_norm(x), positions, segment_ids, rotate,
                                  cache, layer, collect_kv=collect_kv,
                                  cache_attention=cache_attention, window=window)
        extra = None
        if cache is not None or collect_kv:
            attended, extra = attended
        x = x + attended
        # per token, so it may run in chunks of tokens (the [tokens, mlp_dim] intermediates
        # of one chunk at a time)
        chunks = chunk_count(x.shape[1], self.mlp_chunk_tokens)
        x = x + map_chunks(lambda h: self.mlp(self.mlp_norm(h)), x, chunks)
        return x if extra is None else (x, extra)


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block holding the parameters of `blocks` stacked on a new leading axis
    [n_layers, ...] (logical axis None: never sharded). Built from blocks made one after
    the other, so the random draws are those of a list of separate blocks."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(block)[1] for block in blocks[1:]]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *states)
    for _, variable in nnx.to_flat_state(stacked):
        names = variable.get_metadata().get("out_sharding")
        if names is not None:
            variable.set_metadata(out_sharding=(None, *names))
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """The decoder. `attention_fn` overrides the function named by cfg.attention (the
    trainer passes ring attention bound to its mesh; the model itself has no mesh code)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 attention_fn: AttentionFn | None = None):
        cfg.validate()
        if attention_fn is None:
            if cfg.attention in SEQUENCE_PARALLEL:
                raise ValueError(f"model.attention={cfg.attention!r} needs its function from "
                                 "parallel.sequence_parallel (the trainer passes it)")
            attention_fn = attention_function(cfg.attention, block_q=cfg.block_q,
                                              block_k=cfg.block_k)
        self.cfg = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                               nnx.initializers.normal(cfg.init_std), param_dtype)
        if cfg.position == "learned":
            self.position_table = param(rngs, (cfg.l_max, cfg.d_model), (None, "embed"),
                                        nnx.initializers.normal(cfg.init_std), param_dtype)
        # every block's parameters stacked [n_layers, ...]: one scanned layer (MaxText's
        # scan_layers), so the compiled program does not grow with depth
        self.blocks = stack_blocks([Block(cfg, attention_fn, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, param_dtype, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                 nnx.initializers.normal(cfg.init_std), param_dtype)

    def rotation(self, length: int) -> Callable | None:
        """The RoPE function for sequences of `length` tokens (None without RoPE)."""
        cfg = self.cfg
        if cfg.position != "rope":
            return None
        inv_freq, attention_factor = pos_lib.rope_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq_len=length,
            original_max_position_embeddings=cfg.l_max)
        return lambda t, positions: pos_lib.apply_rope(t, positions, inv_freq, attention_factor)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for sequences of up to `max_len` tokens (prompt + new tokens),
        in the compute dtype. With RoPE scaling "dynamic", max_len is the length the
        frequencies are computed for at every decoding step (see `__call__`)."""
        cfg = self.cfg
        if cfg.position == "learned" and max_len > cfg.l_max:
            raise ValueError(
                f"learned absolute positions cover l_max={cfg.l_max} tokens; generating up "
                f"to {max_len} needs model.position='rope'")
        return empty_cache(cfg.n_layers, batch, max_len, cfg.kv_heads, cfg.head_dim,
                           jnp.dtype(cfg.dtype))

    def __call__(self, tokens, positions=None, segment_ids=None, cache: KVCache | None = None,
                 **options):
        """tokens [batch, length] int32 -> logits [batch, length, vocab] float32.

        With `cache` (model/kv_cache.py) the tokens are the next ones of the cached
        sequence (the prompt at prefill, one token per decoding step): they are written to
        slots cache.length.. and attend to everything cached before them; positions
        default to those slots, segment ids must be None. Returns (logits, updated cache).
        `options` are those of `hidden_states`.
        """
        out = self.hidden_states(tokens, positions, segment_ids, cache, **options)
        if cache is not None or options.get("collect_kv"):
            return self.logits(out[0]), out[1]
        return self.logits(out)

    def logits(self, x):
        """Hidden states [..., d_model] (after the final norm) -> logits [..., vocab] float32."""
        head = self.embedding[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        dtype = jnp.dtype(self.cfg.dtype)
        return jnp.einsum("...d,dv->...v", x.astype(dtype), head.astype(dtype),
                          preferred_element_type=jnp.float32)

    def hidden_states(self, tokens, positions=None, segment_ids=None,
                      cache: KVCache | None = None, *, collect_kv: bool = False,
                      sequence_length: int | None = None, cache_attention=None,
                      prepare_layer=None):
        """The decoder without its head: tokens [batch, length] -> [batch, length, d_model]
        after the final norm (the compute dtype).

        cache: decode as in `__call__`; returns (hidden, updated cache). cache_attention
          replaces the dense attention over the cache (model/attention.py).
        collect_kv: a prefill in one pass: attention runs as in training (the model's
          attention function, ring included) and the result is (hidden, KVCache of these
          `length` slots, filled). The caller lays out the tokens; slots it pads are
          overwritten before decoding reads them.
        sequence_length: the length of the sequence the tokens belong to (default: the
          tokens', or with a cache its max_len). RoPE is built for it (the `dynamic`
          scaling's frequencies depend on it: at prefill and at every decoding step those a
          full forward over the final sequence uses), and learned positions need it <= l_max.
        prepare_layer: applied to each layer's parameters inside the layer loop, before
          they are used (the train step gathers FSDP-sharded weights there, a layer at a
          time; parallel/mesh.py, weight_gathers).
        """
        cfg = self.cfg
        batch, length = tokens.shape
        if cache is not None:
            if segment_ids is not None or collect_kv:
                raise ValueError("decoding with a KV cache takes no segment_ids and no "
                                 "collect_kv (one sequence per row)")
            if length > cache.max_len:
                raise ValueError(f"{length} tokens do not fit a KV cache of {cache.max_len} slots")
            start = cache.length
            sequence_length = sequence_length or cache.max_len
        else:
            start = 0
            sequence_length = sequence_length or length
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32),
                                         (batch, length))
        if segment_ids is None and cache is None:
            segment_ids = jnp.zeros((batch, length), jnp.int32)
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)    # [b, l, d_model]
        if cfg.position == "learned":
            if sequence_length > cfg.l_max:
                raise ValueError(
                    f"learned absolute positions cover l_max={cfg.l_max} tokens; this "
                    f"sequence has {sequence_length}. Use model.position='rope' to go "
                    "beyond l_max.")
            x = x + jnp.take(self.position_table[...], positions, axis=0).astype(dtype)
        rotate = self.rotation(sequence_length)
        # a window shared by every layer stays a Python value (the ring can shorten itself
        # for it); windows that differ by layer ride the layer loop as int32 (full: 2^31-1)
        windows = cfg.layer_windows()
        shared = len(set(windows)) == 1
        per_layer = () if shared else (jnp.asarray(
            [np.iinfo(np.int32).max if w is None else w for w in windows], jnp.int32),)

        def window_of(per_layer_window):
            return windows[0] if shared else per_layer_window[0]

        if cache is None and not collect_kv:                 # training / scoring
            def layer(x, block, *window):
                return block(x, positions, segment_ids, rotate, window=window_of(window)), None

            x, _ = self._over_layers(layer, x, *per_layer, remat=cfg.remat,
                                     prepare=prepare_layer)
            return self.final_norm(x)
        if collect_kv:                                       # prefill in one pass
            def layer(x, block, *window):
                return block(x, positions, segment_ids, rotate, collect_kv=True,
                             window=window_of(window))

            x, (k, v) = self._over_layers(layer, x, *per_layer)   # k, v [layers, b, l, hk, hd]
            return self.final_norm(x), KVCache(k, v, jnp.asarray(length, jnp.int32))

        def layer(carry, block, index, *window):             # decoding over the cache
            x, cache = carry
            return block(x, positions, None, rotate, cache, index,
                         cache_attention=cache_attention, window=window_of(window)), None

        (x, cache), _ = self._over_layers(layer, (x, cache),
                                          jnp.arange(cfg.n_layers, dtype=jnp.int32), *per_layer)
        return self.final_norm(x), cache._replace(length=jnp.asarray(start + length, jnp.int32))

    def _over_layers(self, layer, carry, *per_layer, remat: str = "none", prepare=None):
        """Run the decoder blocks: layer(carry, block, *per_layer[i]) -> (carry, out) for
        i = 0 .. n_layers - 1, with `block` the Block of layer i's parameters. A lax.scan
        over the stacked parameters (cfg.scan_layers: one compiled layer whatever the
        depth) or a Python loop over their slices; the layer is rematerialised by the
        named policy (model/remat.py), and with cfg.remat_group = g > 1 (scanned, remat
        on) g layers at a time too: n_layers / g layer inputs are kept instead of n_layers,
        for one more forward pass of each group. `prepare` maps a layer's parameters
        first. Returns (carry, the outs stacked over layers)."""
        graphdef, stacked = nnx.split(self.blocks)

        def step(carry, xs):
            params, *rest = xs
            if prepare is not None:
                params = prepare(params)
            return layer(carry, nnx.merge(graphdef, params), *rest)

        group = self.cfg.remat_group
        grouped_remat = self.cfg.scan_layers and remat != "none" and group > 1
        # with groups, only the group's input is offloaded: its layers' inputs live on the
        # device while the backward pass reruns that group
        step = remat_lib.rematerialise(step, "full" if grouped_remat and remat == "offload"
                                       else remat, in_scan=self.cfg.scan_layers)
        if grouped_remat:
            # only each group's input is kept through the forward pass; the backward pass
            # reruns a group (keeping its layers' inputs), then goes back layer by layer
            grouped = jax.tree.map(lambda a: a.reshape(a.shape[0] // group, group, *a.shape[1:]),
                                   (stacked, *per_layer))
            run_group = remat_lib.rematerialise(
                lambda carry, xs: jax.lax.scan(step, carry, xs),
                "offload" if remat == "offload" else "full", in_scan=True)
            carry, outs = jax.lax.scan(run_group, carry, grouped)
            return carry, jax.tree.map(lambda a: a.reshape(a.shape[0] * group, *a.shape[2:]), outs)
        if self.cfg.scan_layers:
            return jax.lax.scan(step, carry, (stacked, *per_layer))
        outs = []
        for i in range(self.cfg.n_layers):
            carry, out = step(carry, jax.tree.map(lambda a: a[i], (stacked, *per_layer)))
            outs.append(out)
        return carry, jax.tree.map(lambda *layers: jnp.stack(layers), *outs)


def count_parameters(tree) -> int:
    """Number of parameters of a module, or of a pytree of parameter arrays."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
