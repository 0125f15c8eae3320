"""AdamW with clipping and a weight-decay mask (optax), and a learning rate driven by the
tokens seen rather than the step count, so schedules stay comparable when the batch shape
changes between curriculum levels. The rate is computed on the host and injected
(`optax.inject_hyperparams`) into the optimizer state before each update.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax

# parameter-path substrings that get no weight decay: norms (scale, LayerNorm bias), the
# token and position embeddings, and every bias (q_bias, out_bias, in_bias, ...)
_NO_DECAY_NAMES = ("norm", "embedding", "position_table", "bias")


@functools.lru_cache(maxsize=8)   # built once per run, evaluated every step
def learning_rate_schedule(total_tokens: int, peak: float, warmup_fraction: float,
                           min_ratio: float) -> optax.Schedule:
    """tokens -> learning rate: linear warmup over `warmup_fraction` of the budget (the
    rate after t tokens is peak * (t + 1) / warmup, so the first step already moves), then
    cosine decay to `min_ratio * peak` at `total_tokens`, held there beyond."""
    warmup = max(1.0, warmup_fraction * total_tokens)
    return optax.join_schedules(
        [optax.linear_schedule(peak / warmup, peak * (warmup + 1) / warmup, warmup),
         optax.cosine_decay_schedule(peak, max(1.0, total_tokens - warmup), alpha=min_ratio)],
        boundaries=[warmup])


def learning_rate_at(tokens: int, total_tokens: int, peak: float, warmup_fraction: float,
                     min_ratio: float) -> float:
    """learning_rate_schedule(...)(tokens), evaluated in float64: token counts pass
    float32's exact integers (2^24) and int32's range early in a real run."""
    schedule = learning_rate_schedule(total_tokens, peak, warmup_fraction, min_ratio)
    with jax.enable_x64(True):
        return float(schedule(np.float64(tokens)))


def weight_decay_mask(params, decay_norms_and_embeddings: bool = False):
    """True for parameters that get weight decay: matrices, not norms, embeddings or biases
    (`decay_norms_and_embeddings`: every parameter, biases too)."""

    def decays(path, _):
        if decay_norms_and_embeddings:
            return True
        names = "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
        return not any(name in names for name in _NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config, params) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decoupled decay scaled by the learning rate) whose
    learning rate is set per step with `with_learning_rate`."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps"))(
        learning_rate=0.0, b1=train_config.beta1, b2=train_config.beta2, eps=1e-8,
        weight_decay=train_config.weight_decay,
        mask=weight_decay_mask(params, train_config.decay_norms_and_embeddings))
    if train_config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), adamw)
    return adamw


def with_learning_rate(opt_state, learning_rate):
    """`opt_state` of make_optimizer with its injected learning rate set."""
    return optax.tree_utils.tree_set(opt_state, learning_rate=learning_rate)
