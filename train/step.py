"""The jitted train step, and a host batch put onto the mesh in the configured layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from model.loss import token_loss_sums
from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train.optimizer import with_learning_rate


def make_train_step(run, accum_steps: int, sequence_length: int | None = None):
    """jit((state, batch, learning_rate) -> (state, metrics)) for `run` (train/state.py).

    `sequence_length`: the rows' length before `put_batch` padded them for the layout
    (RoPE scalings that depend on the length read it); None: the batch's length.

    With accum_steps > 1 the batch's rows are split into that many micro-batches whose
    gradient sums are added before one update; the result equals the full-batch step.
    metrics: "loss" (the loss_mask-weighted mean), "grad_norm", "loss_weight", "skipped"
    (the loss or the gradients were not finite, so nothing was updated).
    """
    gather_outer, gather_layer = mesh_lib.weight_gathers(run.state_shardings["params"])
    # train.optimizer_memory=host: the optimizer state comes in from pinned host memory for
    # the update and goes back (out_shardings) after it
    on_device = jax.tree.map(lambda s: s.with_memory_kind("device"),
                             run.state_shardings["opt_state"])

    def loss_sums(params, batch):          # FSDP: weights gathered for compute, layer by layer
        return token_loss_sums(run.graphdef, gather_outer(params), batch,
                               prepare_layer=gather_layer, sequence_length=sequence_length)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(state, batch, learning_rate):
        params = state["params"]
        if accum_steps == 1:
            (nll_sum, count), grads = grad_fn(params, batch)
        else:
            # micro-batch i takes rows i, i + accum, ... so each stays spread over devices
            micro = jax.tree.map(
                lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1), batch)

            def accumulate(totals, micro_batch):
                (nll, n), g = grad_fn(params, micro_batch)
                return jax.tree.map(jnp.add, totals, (nll, n, g)), None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (nll_sum, count, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        loss = nll_sum / count
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            opt_state = with_learning_rate(state["opt_state"], learning_rate)
            updates, opt_state = run.optimizer.update(grads, opt_state, state["params"])
            return {"params": optax.apply_updates(state["params"], updates),
                    "opt_state": opt_state}

        # a non-finite loss or gradient skips the update: parameters and optimizer state
        # stay as they were (lax.cond: the skipped branch passes the donated buffers on)
        state = {"params": params, "opt_state": jax.device_put(state["opt_state"], on_device)}
        state = jax.lax.cond(finite, update, lambda state: state, state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "loss_weight": count,
                   "skipped": ~finite}
        return state, metrics

    return jax.jit(step, donate_argnums=0, out_shardings=(run.state_shardings, None))


def put_batch(batch, mesh, global_rows: int, layout: str, parts: int | None = None):
    """This process's host rows -> global arrays on the mesh, tokens in `layout` order
    along the seq axis (targets were shifted before, so the permutation is safe), padded
    to whole slices of the seq axis when the length does not split (no loss there).
    `parts`: the units a zigzag layout balances (default: the seq devices; Run.layout_parts)."""
    _, _, _, row_offset = mesh_lib.data_shard(mesh, global_rows)
    batch = layout_lib.apply_layout(batch, layout, mesh.shape["seq"], parts)
    return mesh_lib.host_batch_to_global(batch, mesh, global_rows, row_offset=row_offset)
