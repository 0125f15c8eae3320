"""AdamW with a learning rate driven by tokens seen, clipping and a weight-decay mask.

The learning rate is not a function of the step count: it is computed on the host from
the number of tokens trained so far (`learning_rate_at`) and passed into the jitted step,
so schedules stay comparable when the batch shape changes between curriculum levels.
"""
from __future__ import annotations

import math

import jax
import optax


def learning_rate_at(tokens: int, total_tokens: int, peak: float, warmup_fraction: float,
                     min_ratio: float) -> float:
    """Linear warmup over `warmup_fraction` of the budget, then cosine decay to
    `min_ratio * peak` at `total_tokens` (held there beyond)."""
    warmup = max(1.0, warmup_fraction * total_tokens)
    if tokens < warmup:
        return peak * (tokens + 1) / warmup
    progress = min(1.0, (tokens - warmup) / max(1.0, total_tokens - warmup))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak * (min_ratio + (1.0 - min_ratio) * cosine)


def _scale_by_learning_rate_argument() -> optax.GradientTransformationExtraArgs:
    """Multiply updates by -learning_rate, where learning_rate is given to update()."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None, *, learning_rate, **unused):
        del params, unused
        return jax.tree.map(lambda u: -learning_rate * u, updates), state

    return optax.GradientTransformationExtraArgs(init, update)


_NO_DECAY_NAMES = ("norm", "embedding", "position_table")


def weight_decay_mask(params, decay_norms_and_embeddings: bool = False):
    """True for parameters that get weight decay: matrices, not norms or embeddings."""

    def decays(path, _):
        if decay_norms_and_embeddings:
            return True
        names = "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
        return not any(name in names for name in _NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config, params) -> optax.GradientTransformationExtraArgs:
    """AdamW (decoupled decay, scaled by the learning rate) with global-norm clipping.

    `update(grads, state, params, learning_rate=lr)` applies one step.
    """
    parts = []
    if train_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(train_config.grad_clip_norm))
    parts += [
        optax.scale_by_adam(b1=train_config.beta1, b2=train_config.beta2, eps=1e-8),
        optax.add_decayed_weights(
            train_config.weight_decay,
            mask=weight_decay_mask(params, train_config.decay_norms_and_embeddings)),
        _scale_by_learning_rate_argument(),
    ]
    return optax.chain(*parts)
