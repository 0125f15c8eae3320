"""The language-modelling loss, shared by the train step and evaluation."""
from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx


def token_loss_sums(graphdef, params, batch):
    """Weighted sum of next-token negative log-likelihoods, and the sum of the weights.

    batch: "tokens", "targets", "positions", "segment_ids" [b, l] int32 and "loss_mask"
    [b, l] float, each target's loss weight (0 on padding, 1 on an ordinary target; see
    data/packing.py). Their ratio is the mean loss. Returns two float32 scalars.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [b, l, vocab]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def token_scores(graphdef, params, batch):
    """Per-token next-token negative log-likelihood and whether the target was the argmax.

    Returns (nll float32 [b, l], is_argmax bool [b, l]); padding positions are included
    (callers mask them). Evaluation reduces these on the host.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [b, l, vocab]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    is_argmax = jnp.argmax(logits, axis=-1) == batch["targets"]
    return nll, is_argmax
