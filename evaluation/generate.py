"""Autoregressive generation with a KV cache: greedy, or temperature + nucleus (top-p)
sampling.

`generate(model, prompt_ids, max_new_tokens, ...)` runs as one jitted function: a prefill of
the prompt (in pieces of `prefill_chunk` tokens) into a cache of prompt + max_new_tokens
slots (model/kv_cache.py), then a `lax.while_loop` that feeds one token per step and
attends to the cache; the sequence is never re-run. It is compiled once per (model structure, prompt shape, max_new_tokens,
greedy or sampling, top_p < 1 or not, eos_id) and reused; temperature, top_p and seed are
traced values.

Single device, one process: the model's parameters and the cache are wherever the model
puts them (sequence-sharded prefill and caches are not implemented).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "nucleus",
                                             "eos_id", "prefill_chunk"))
def _generate(graphdef, state, prompt, temperature, top_p, seed, *, max_new_tokens: int,
              greedy: bool, nucleus: bool, eos_id: int | None, prefill_chunk: int):
    """(tokens [batch, max_new_tokens], steps): the new tokens (eos_id after a row's EOS)
    and how many were generated before every row had stopped."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    key = jax.random.key(seed)
    sample = functools.partial(sample_next, temperature=temperature, top_p=top_p,
                               greedy=greedy, nucleus=nucleus)
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    prefill_chunk = min(prefill_chunk, prompt_len)

    def prefill_piece(i, cache):               # the prompt in pieces of prefill_chunk tokens
        piece = jax.lax.dynamic_slice_in_dim(prompt, i * prefill_chunk, prefill_chunk, axis=1)
        return model(piece, cache=cache)[1]

    pieces = (prompt_len - 1) // prefill_chunk  # the last 1..prefill_chunk tokens go below
    cache = jax.lax.fori_loop(0, pieces, prefill_piece, cache)
    logits, cache = model(prompt[:, pieces * prefill_chunk:], cache=cache)
    first = sample(logits[:, -1], jax.random.fold_in(key, 0))
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = (first == eos_id) if eos_id is not None else jnp.zeros((batch,), bool)

    def running(carry):
        step, _, _, done = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def decode_one(carry):                     # feed token step-1, choose token `step`
        step, cache, out, done = carry
        previous = jax.lax.dynamic_slice_in_dim(out, step - 1, 1, axis=1)   # [batch, 1]
        logits, cache = model(previous, cache=cache)
        token = sample(logits[:, -1], jax.random.fold_in(key, step))
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, cache, out, done

    steps, _, out, _ = jax.lax.while_loop(running, decode_one,
                                          (jnp.int32(1), cache, out, done))
    return out, steps


def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             prefill_chunk: int = 512) -> np.ndarray:
    """New token ids after `prompt_ids` (int array [length], or [batch, length] of prompts
    of equal length), at most `max_new_tokens` of them, as int32 numpy with the prompt's
    leading shape.

    temperature 0: greedy (argmax; top_p and seed unused). Otherwise tokens are drawn from
    softmax(logits / temperature) cut to the top_p nucleus, with jax.random keyed by `seed`
    (step i uses fold_in(key(seed), i)), so a seed gives the same tokens every time.
    With `eos_id`, a row stops at its first EOS, which is included; generation ends when
    every row has stopped, and rows that stopped earlier are filled with eos_id.

    RoPE runs at each token's global position; the cache holds prompt + max_new_tokens
    slots and that final length is the one the `dynamic` RoPE scaling is computed for, at
    prefill and at every step (a full forward over the final sequence computes the same
    frequencies; Hugging Face's dynamic scaling instead recomputes them as the sequence
    grows). Learned positions need prompt + max_new_tokens <= l_max.

    The prompt is prefilled `prefill_chunk` tokens at a time, each piece attending densely
    to the cache, so prefill memory is O(prefill_chunk x (prompt + max_new_tokens)) per
    layer and head, not quadratic in the prompt.
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
    if eos_id is not None and not 0 <= eos_id < vocab:
        raise ValueError(f"generate: eos_id must lie in [0, {vocab}), got {eos_id}")
    if max_new_tokens == 0:
        out = np.zeros((prompt.shape[0], 0), np.int32)
        return out[0] if single else out
    graphdef, state = nnx.split(model)
    greedy = temperature == 0
    tokens, steps = _generate(
        graphdef, state, jnp.asarray(prompt, jnp.int32), jnp.float32(temperature or 1.0),
        jnp.float32(top_p), jnp.uint32(seed), max_new_tokens=int(max_new_tokens),
        greedy=greedy, nucleus=not greedy and top_p < 1,
        eos_id=None if eos_id is None else int(eos_id), prefill_chunk=int(prefill_chunk))
    out = np.asarray(tokens)[:, :int(steps)]
    return out[0] if single else out
