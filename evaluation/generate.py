"""Autoregressive generation with a KV cache: greedy, or temperature + nucleus (top-p)
sampling.

`generate(model, prompt_ids, max_new_tokens, ...)` runs as one jitted function: a prefill of
the prompt into a cache of prompt + max_new_tokens slots (model/kv_cache.py), then a
`lax.while_loop` that feeds one token per step and attends to the cache; the sequence is
never re-run. On one device the prompt is prefilled in pieces; on a mesh with seq > 1 in
one ring-attention pass, and the cache stays split over `seq`. It is compiled once per
(model structure, prompt shape, max_new_tokens, greedy or sampling, top_p < 1 or not, EOS
ids, mesh) and reused; temperature, top_p and seed are traced values.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.kv_cache import KVCache
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from parallel import sharded_cache
from parallel.ring_attention import make_ring_attention


def sample_next(logits, key, temperature, top_p, *, greedy: bool, nucleus: bool):
    """Next token ids [batch] from logits [batch, vocab]: the argmax when `greedy`
    (temperature 0; top_p is then ignored), else a draw from softmax(logits / temperature)
    restricted, when `nucleus`, to the smallest set of most likely tokens whose probability
    reaches top_p (the most likely token is always kept)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if nucleus:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]                    # descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                      # mass above each token
        kept = jnp.sum(before < top_p, axis=-1, keepdims=True)           # >= 1
        threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)      # smallest kept logit
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _prefill_in_pieces(model, prompt, total: int, prefill_chunk: int):
    """One device: the prompt written into a cache of `total` slots, `prefill_chunk` tokens
    at a time, each piece attending densely to the cache. Returns (logits of the last
    prompt token [batch, vocab], cache)."""
    batch, prompt_len = prompt.shape
    cache = model.init_cache(batch, total)
    prefill_chunk = min(prefill_chunk, prompt_len)

    def prefill_piece(i, cache):
        piece = jax.lax.dynamic_slice_in_dim(prompt, i * prefill_chunk, prefill_chunk, axis=1)
        return model.hidden_states(piece, cache=cache)[1]

    pieces = (prompt_len - 1) // prefill_chunk  # the last 1..prefill_chunk tokens go below
    cache = jax.lax.fori_loop(0, pieces, prefill_piece, cache)
    hidden, cache = model.hidden_states(prompt[:, pieces * prefill_chunk:], cache=cache)
    return model.logits(hidden[:, -1]), cache


def cache_slots_on_mesh(total: int, seq: int) -> int:
    """Slots of a cache split over `seq` devices for sequences of `total` tokens: `total`
    rounded up to a whole number of slots per device."""
    return -(-total // seq) * seq


def _prefill_on_mesh(model, prompt, total: int, mesh):
    """Sequence-parallel: the whole cache-sized buffer (prompt, then padding) in one forward
    with ring attention over `seq` (the model was built with it); the keys/values it
    computes are the cache, split over `seq` as the activations are. Padding slots are a
    second segment, invisible to the prompt, and each is overwritten by its decoding step
    before any query reads it. Returns (logits of the last prompt token, cache)."""
    batch, prompt_len = prompt.shape
    slots = cache_slots_on_mesh(total, mesh.shape["seq"])
    index = jnp.arange(slots, dtype=jnp.int32)
    rows = mesh_lib.batch_sharding(mesh)
    constrain = jax.lax.with_sharding_constraint
    buffer = constrain(jnp.zeros((batch, slots), jnp.int32).at[:, :prompt_len].set(prompt), rows)
    # padding at positions <= total - 1, so that learned positions stay inside their table
    positions = constrain(jnp.broadcast_to(jnp.minimum(index, total - 1), (batch, slots)), rows)
    segments = constrain(jnp.broadcast_to((index >= prompt_len).astype(jnp.int32),
                                          (batch, slots)), rows)
    hidden, cache = model.hidden_states(buffer, positions, segments, collect_kv=True,
                                        sequence_length=total)
    layout = sharded_cache.cache_sharding(mesh)
    cache = KVCache(constrain(cache.k, layout), constrain(cache.v, layout), jnp.int32(prompt_len))
    return model.logits(hidden[:, prompt_len - 1]), cache


def _prefill(model, prompt, total: int, mesh, prefill_chunk: int):
    if mesh is None:
        return _prefill_in_pieces(model, prompt, total, prefill_chunk)
    return _prefill_on_mesh(model, prompt, total, mesh)


def _prefill_padded(model, buffer, length, total: int, mesh, prefill_chunk: int,
                    cache_attention):
    """The prompt's first `length` (traced) tokens of `buffer` [batch, padded]: the whole
    buffer is prefilled, the cache is cut back to length - 1 slots and the last prompt
    token is fed as a decoding step, which gives its logits. The padding's slots lie
    beyond every later query's position, so no query sees them before decoding overwrites
    them (the cache's mask is causal by slot)."""
    _, cache = _prefill(model, buffer, total, mesh, prefill_chunk)
    cache = cache._replace(length=length - 1)
    last = jax.lax.dynamic_slice_in_dim(buffer, length - 1, 1, axis=1)          # [batch, 1]
    logits, cache = model(last, cache=cache, sequence_length=total,
                          cache_attention=cache_attention)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "total", "mesh", "prefill_chunk"))
def _prefill_jitted(graphdef, state, prompt, *, total: int, mesh, prefill_chunk: int):
    return _prefill(nnx.merge(graphdef, state), prompt, total, mesh, prefill_chunk)


def prefill(model, prompt, total: int, mesh=None, prefill_chunk: int = 512):
    """The first half of `generate`, jitted: (logits after the last prompt token
    [batch, vocab], the KVCache holding prompt [batch, length]) for sequences of `total`
    tokens. The cache has `total` slots on one device; on a mesh with seq > 1,
    cache_slots_on_mesh(total, ...) slots split over `seq`."""
    mesh = _sequence_mesh(mesh)
    if mesh is not None:
        model = _with_ring_attention(model, mesh)
    graphdef, state = nnx.split(model)
    return _prefill_jitted(graphdef, state, jnp.asarray(prompt, jnp.int32), total=int(total),
                           mesh=mesh, prefill_chunk=int(prefill_chunk))


def _sequence_mesh(mesh):
    """`mesh` when its seq axis splits sequences, else None (one-device generation)."""
    return mesh if mesh is not None and mesh.shape.get("seq", 1) > 1 else None


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "nucleus",
                                             "eos_ids", "prefill_chunk", "mesh", "padded"))
def _generate(graphdef, state, prompt, length, temperature, top_p, seed, *, max_new_tokens: int,
              greedy: bool, nucleus: bool, eos_ids: tuple, prefill_chunk: int, mesh,
              padded: bool):
    """(tokens [batch, max_new_tokens], steps): the new tokens (a row's EOS repeated after
    it stops) and how many were generated before every row had stopped. `padded`: the
    prompt is the first `length` (traced) tokens of `prompt`."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    key = jax.random.key(seed)
    sample = functools.partial(sample_next, temperature=temperature, top_p=top_p,
                               greedy=greedy, nucleus=nucleus)
    cache_attention = None if mesh is None else sharded_cache.sharded_cached_attention(mesh)
    if padded:
        logits, cache = _prefill_padded(model, prompt, length, total, mesh, prefill_chunk,
                                        cache_attention)
    else:
        logits, cache = _prefill(model, prompt, total, mesh, prefill_chunk)
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def is_eos(token):                          # [batch] -> bool [batch]
        return jnp.any(token[:, None] == eos[None], axis=-1) if eos_ids else \
            jnp.zeros(token.shape, bool)

    first = sample(logits, jax.random.fold_in(key, 0))
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def running(carry):
        step, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):                     # feed token step-1, choose token `step`
        step, cache, out, done = carry
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)   # [batch, 1]
        logits, cache = model(previous, cache=cache, sequence_length=total,
                              cache_attention=cache_attention)
        token = sample(logits[:, -1], jax.random.fold_in(key, step))
        token = jnp.where(done, previous[:, 0], token)    # a stopped row repeats its EOS
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, cache, out, done | is_eos(token)

    steps, _, out, _ = jax.lax.while_loop(running, decode_one,
                                          (jnp.int32(1), cache, out, is_eos(first)))
    return out, steps


def _with_ring_attention(model, mesh):
    """`model`'s parameters in a Transformer whose attention is the ring over `mesh`;
    parameters that live elsewhere than on the mesh's devices are replicated over it."""
    cfg = dataclasses.replace(model.cfg, attention="ring", remat="none")
    # the prefill buffer is in sequence order: a sliding window shortens the ring
    ring = make_ring_attention(mesh, layout="contiguous", block_q=cfg.block_q,
                               block_k=cfg.block_k)
    graphdef, _, _ = model_on_mesh.abstract_model(cfg, mesh, ring)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    devices = set(mesh.devices.flat)

    def on_mesh(x):
        placed = isinstance(x, jax.Array) and x.sharding.device_set == devices
        return x if placed else jax.device_put(x, replicated)

    return nnx.merge(graphdef, jax.tree.map(on_mesh, nnx.state(model)))


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id=None, prefill_chunk: int = 512,
             mesh=None, pad_to: int | None = None) -> np.ndarray:
    """New token ids after `prompt_ids` (int array [length], or [batch, length] of prompts
    of equal length), at most `max_new_tokens` of them, as int32 numpy with the prompt's
    leading shape.

    temperature 0: greedy (argmax; top_p and seed unused). Otherwise tokens are drawn from
    softmax(logits / temperature) cut to the top_p nucleus, with jax.random keyed by `seed`
    (step i uses fold_in(key(seed), i)), so a seed gives the same tokens every time.
    `eos_id` (an id or a sequence of ids): a row stops at its first EOS, which is included;
    generation ends when every row has stopped, and a row that stopped earlier repeats its
    EOS.

    RoPE runs at each token's global position; the cache holds prompt + max_new_tokens
    slots and that final length is the one the `dynamic` RoPE scaling is computed for, at
    prefill and at every step (a full forward over the final sequence computes the same
    frequencies; Hugging Face's dynamic scaling instead recomputes them as the sequence
    grows). Learned positions need prompt + max_new_tokens <= l_max.

    pad_to: the prompt is right-padded to `pad_to` tokens and its length passed as a traced
    value, so prompts of different lengths share one compiled function (RULER's samples
    differ in length). The same tokens as without padding, except under the `dynamic` RoPE
    scaling, whose frequencies follow the padded final length (refused there).

    mesh None (or a mesh whose `seq` axis has size 1): the prompt is prefilled
    `prefill_chunk` tokens at a time, each piece attending densely to the cache, so prefill
    memory is O(prefill_chunk x (prompt + max_new_tokens)) per layer and head.
    A mesh with seq > 1: the prompt is prefilled in one pass with ring attention over
    `seq`, the cache stays split over `seq` (rows over data x fsdp, heads over tensor) and
    every decoding step attends to it shard by shard, merged by log-sum-exp
    (parallel/sharded_cache.py); the model's parameters keep their shardings when they live
    on the mesh's devices, else they are replicated over it. The batch must divide by
    data x fsdp and kv_heads by tensor.
    """
    prompt = np.asarray(prompt_ids)
    single = prompt.ndim == 1
    if single:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"generate: the prompt must be [length] or [batch, length] with "
                         f"length >= 1, got shape {np.shape(prompt_ids)}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"generate: prompt ids must be integers, got {prompt.dtype}")
    vocab = model.cfg.vocab_size
    if prompt.min() < 0 or prompt.max() >= vocab:
        raise ValueError(f"generate: prompt ids must lie in [0, {vocab}), got "
                         f"[{prompt.min()}, {prompt.max()}]")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must lie in (0, 1], got {top_p}")
    if prefill_chunk < 1:
        raise ValueError(f"generate: prefill_chunk must be >= 1, got {prefill_chunk}")
    eos_ids = () if eos_id is None else tuple(int(i) for i in np.atleast_1d(eos_id))
    if any(not 0 <= i < vocab for i in eos_ids):
        raise ValueError(f"generate: eos ids must lie in [0, {vocab}), got {list(eos_ids)}")
    if max_new_tokens == 0:
        out = np.zeros((prompt.shape[0], 0), np.int32)
        return out[0] if single else out
    length = prompt.shape[1]
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"generate: pad_to {pad_to} is shorter than the prompt ({length})")
        if (model.cfg.rope_scaling or {}).get("rope_type") == "dynamic":
            raise ValueError("generate: pad_to cannot be used with the dynamic RoPE scaling "
                             "(its frequencies follow the final length)")
        prompt = np.pad(prompt, ((0, 0), (0, pad_to - length)))
    mesh = _sequence_mesh(mesh)
    if mesh is not None:
        _check_mesh(model.cfg, prompt.shape[0], mesh)
        model = _with_ring_attention(model, mesh)
    graphdef, state = nnx.split(model)
    greedy = temperature == 0
    tokens, steps = _generate(
        graphdef, state, jnp.asarray(prompt, jnp.int32), jnp.int32(length),
        jnp.float32(temperature or 1.0), jnp.float32(top_p), jnp.uint32(seed),
        max_new_tokens=int(max_new_tokens), greedy=greedy, nucleus=not greedy and top_p < 1,
        eos_ids=eos_ids, prefill_chunk=int(prefill_chunk), mesh=mesh,
        padded=pad_to is not None)
    out = np.asarray(tokens)[:, :int(steps)]
    return out[0] if single else out


def _check_mesh(cfg, batch: int, mesh) -> None:
    rows = mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1)
    if batch % rows:
        raise ValueError(f"generate: {batch} prompts do not split over data x fsdp = {rows}")
    if cfg.kv_heads % mesh.shape.get("tensor", 1):
        raise ValueError(f"generate: kv_heads {cfg.kv_heads} do not split over tensor = "
                         f"{mesh.shape['tensor']}")
