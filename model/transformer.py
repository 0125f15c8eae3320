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

import dataclasses
import json
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model import positions as pos_lib
from model.attention import (ATTENTION_KINDS, SEQUENCE_PARALLEL, Attention, AttentionFn,
                             attention_function)
from model import remat as remat_lib
from model.chunks import chunk_count, map_chunks
from model.kv_cache import KVCache, empty_cache
from model.layers import MLP_KINDS, NORM_KINDS, make_mlp, make_norm, param

POSITION_KINDS = ("rope", "learned", "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's shapes and numerics (hashable: it is static)."""
    vocab_size: int
    d_model: int
    n_layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    mlp_dim: int
    l_max: int                     # training length; the learned-position table's rows
                                   # (model.learned_positions_length when set)
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling_json: str = "null"  # normalised HF rope_scaling dict, as JSON (hashable)
    attention: str = "blockwise"
    block_q: int = 256
    block_k: int = 256
    tie_embeddings: bool = True
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"            # model/remat.py: a policy of REMAT_POLICIES
    loss_chunk_tokens: int = 0     # model/loss.py: LM head + loss in chunks of this many
                                   # tokens per row (0: all logits at once)
    mlp_chunk_tokens: int = 0      # the MLP in chunks of this many tokens per row (0: whole)
    remat_group: int = 1           # layers rematerialised as one group (see _over_layers)
    scan_layers: bool = True       # lax.scan over the stacked layers (False: a Python loop)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    norm: str = "rmsnorm"          # rmsnorm (scale) | layernorm (scale and bias)
    mlp: str = "swiglu"            # swiglu | gelu_tanh
    qkv_bias: bool = False         # biases on the q, k, v projections
    attention_out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False         # biases on the MLP's matrices
    sliding_window: int | None = None  # attend to at most this many tokens (itself included)
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" (the window)
                                   # or "full_attention"; None: every layer has the window

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's sliding window (None: full attention)."""
        if self.sliding_window is None:
            return (None,) * self.n_layers
        types = self.layer_types or ("sliding_attention",) * self.n_layers
        return tuple(self.sliding_window if t == "sliding_attention" else None for t in types)

    @property
    def rope_scaling(self) -> dict | None:
        return json.loads(self.rope_scaling_json)

    def validate(self) -> None:
        """Raise ValueError (one clear line) for a configuration that cannot be built."""
        if self.position not in POSITION_KINDS:
            raise ValueError(f"model.position must be one of {POSITION_KINDS}, "
                             f"got {self.position!r}")
        if self.q_heads % self.kv_heads:
            raise ValueError(f"model.q_heads ({self.q_heads}) must be a multiple of "
                             f"model.kv_heads ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even model.head_dim, got {self.head_dim}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_KINDS}, got "
                             f"{self.attention!r}")
        if self.norm not in NORM_KINDS:
            raise ValueError(f"model.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        policy = remat_lib.policy_name(self.remat)
        if policy in remat_lib.OFFLOAD_POLICIES and not self.scan_layers:
            # compiled for 8 H100s, tiny's loop of layers kept its inputs on the device as
            # well (device temp +17%); the scanned layers move them (tests/test_targets.py)
            raise ValueError(f"model.remat={policy} needs model.scan_layers=True: only the "
                             "scanned layers move their inputs to host memory")
        if policy == "offload_attention" and self.remat_group != 1:
            raise ValueError("model.remat=offload_attention keeps every layer's attention "
                             "residuals in host memory: it takes model.remat_group=1, got "
                             f"{self.remat_group}")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"model.mlp must be one of {MLP_KINDS}, got {self.mlp!r}")
        for name in ("qkv_bias", "attention_out_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("loss_chunk_tokens", "mlp_chunk_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.remat_group < 1 or self.n_layers % self.remat_group:
            raise ValueError(f"model.remat_group ({self.remat_group}) must be a positive "
                             f"divisor of model.n_layers ({self.n_layers})")
        for name in ("vocab_size", "d_model", "n_layers", "q_heads", "kv_heads", "head_dim",
                     "mlp_dim", "l_max", "block_q", "block_k"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model {name} must be positive, got {getattr(self, name)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"model.{name} must be float32, bfloat16 or float16")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"model.sliding_window must be None or an integer >= 1 (tokens), "
                             f"got {window!r}")
        if self.layer_types is not None:
            kinds = ("full_attention", "sliding_attention")
            if len(self.layer_types) != self.n_layers or set(self.layer_types) - set(kinds):
                raise ValueError(f"model.layer_types must be None or one of {kinds} per layer "
                                 f"({self.n_layers}), got {self.layer_types!r}")


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
