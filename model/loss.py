"""The language-modelling loss, shared by the train step and evaluation.

With `loss_chunk_tokens = C > 0` (ModelConfig, model.loss_chunk_tokens) the LM head and the
loss never hold [tokens, vocab] logits: the length is cut into chunks of C tokens per row
(model/chunks.py: strided, so a sequence split over `seq` stays where it is) and one
chunk's float32 logits exist at a time, in the forward pass and (recomputed under
jax.checkpoint) in the backward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model.chunks import chunk_count, from_chunks, to_chunks


def _nll_and_argmax(logits, targets):
    """logits [..., vocab] float32, targets [...] -> (nll [...], target is the argmax [...]);
    optax's cross-entropy takes the log-sum-exp in the logits' float32."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, jnp.argmax(logits, axis=-1) == targets


def head_scores(model, hidden, targets):
    """(nll float32 [b, l], is_argmax bool [b, l]) of the next-token targets from the
    decoder's hidden states [b, l, d_model], chunked as model.cfg.loss_chunk_tokens says."""
    chunks = chunk_count(hidden.shape[1], model.cfg.loss_chunk_tokens)
    if chunks == 1:
        return _nll_and_argmax(model.logits(hidden), targets)
    graphdef, state = nnx.split(model)

    @jax.checkpoint          # backward: recompute this chunk's logits, keep only its input
    def one_chunk(state, x, t):
        return _nll_and_argmax(nnx.merge(graphdef, state).logits(x), t)

    def step(_, chunk):
        return None, one_chunk(state, *chunk)

    _, scores = jax.lax.scan(step, None, (to_chunks(hidden, chunks), to_chunks(targets, chunks)))
    return jax.tree.map(lambda y: from_chunks(y, hidden.shape[1]), scores)   # [b, l] each


def token_loss_sums(graphdef, params, batch, prepare_layer=None, sequence_length=None):
    """Weighted sum of next-token negative log-likelihoods, and the sum of the weights.

    batch: "tokens", "targets", "positions", "segment_ids" [b, l] int32 and "loss_mask"
    [b, l] float, each target's loss weight (0 on padding, 1 on an ordinary target; see
    data/pipeline.py). Their ratio is the mean loss. Returns two float32 scalars.
    `prepare_layer`, `sequence_length` (the real length of rows that the input layout
    padded): see Transformer.hidden_states.
    """
    nll, _ = token_scores(graphdef, params, batch, prepare_layer, sequence_length)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def token_scores(graphdef, params, batch, prepare_layer=None, sequence_length=None):
    """Per-token next-token negative log-likelihood and whether the target was the argmax.

    Returns (nll float32 [b, l], is_argmax bool [b, l]); padding positions are included
    (callers mask them). Evaluation reduces these on the host.
    """
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                 prepare_layer=prepare_layer, sequence_length=sequence_length)
    return head_scores(model, hidden, batch["targets"])
