"""Per-token scores of host batches on a mesh: the one jitted scoring function, the
Scorer that moves batches on and scores off the mesh, and its compiled memory.

`placed` is a model placed on a mesh (parallel/model_on_mesh.py: ModelOnMesh; the
trainer's Run is one): its mesh, structure, parameter shardings and batch layout.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from model.loss import token_scores
from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from parallel.model_on_mesh import ModelOnMesh


def score_function(placed: ModelOnMesh):
    """jit((params, batch, sequence_length) -> (nll, is_argmax)) on placed's mesh, weights
    gathered for compute like the train step (parallel.mesh.compute_shardings);
    sequence_length (static) is the rows' length before the layout padded them."""
    gather_outer, gather_layer = mesh_lib.weight_gathers(placed.param_shardings)
    return jax.jit(lambda p, b, sequence_length: token_scores(
        placed.graphdef, gather_outer(p), b, prepare_layer=gather_layer,
        sequence_length=sequence_length), static_argnums=2)


class Scorer:
    """Per-token scores of global host batches on `placed`'s mesh, back on the host in the
    original token order. One compiled function per shape."""

    def __init__(self, placed: ModelOnMesh, params):
        self.placed, self.params = placed, params
        self._score = score_function(placed)

    def __call__(self, batch: dict):
        placed = self.placed
        rows, length = batch["tokens"].shape
        seq = placed.mesh.shape["seq"]
        layout, parts = placed.layout, placed.layout_parts
        _, _, local_rows, offset = mesh_lib.data_shard(placed.mesh, rows)
        local = {k: v[offset:offset + local_rows] for k, v in batch.items()}
        local = layout_lib.apply_layout(local, layout, seq, parts)
        device_batch = mesh_lib.host_batch_to_global(local, placed.mesh, rows, row_offset=offset)
        with mesh_lib.use_mesh(placed.mesh):
            nll, is_argmax = self._score(self.params, device_batch, length)
        nll, is_argmax = multihost_utils.process_allgather((nll, is_argmax), tiled=True)
        restored = layout_lib.restore_layout({"nll": np.asarray(nll), "hit": np.asarray(is_argmax)},
                                             layout, seq, length, parts)
        return np.asarray(restored["nll"], np.float64), np.asarray(restored["hit"])


def scoring_bytes(placed, abstract_params, rows: int, length: int) -> int:
    """Bytes one device holds while scoring a [rows, length] batch on placed's mesh (arguments
    + outputs + temporaries - aliased, from compile().memory_analysis())."""
    sharding = mesh_lib.batch_sharding(placed.mesh)
    laid_out = layout_lib.layout_length(length, placed.layout, placed.mesh.shape["seq"],
                                        placed.layout_parts)
    batch = {key: jax.ShapeDtypeStruct((rows, laid_out), dtype, sharding=sharding)
             for key, dtype in (("tokens", np.int32), ("targets", np.int32),
                                ("positions", np.int32), ("segment_ids", np.int32),
                                ("loss_mask", np.float32))}
    with mesh_lib.use_mesh(placed.mesh):
        analysis = score_function(placed).lower(abstract_params, batch, length).compile() \
            .memory_analysis()
    return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
               + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def memory_fits(placed, abstract_params, rows: int, budget: int):
    """fits(length) for default_top_length: True, or why the scoring does not fit."""
    def fits(length: int):
        needed = scoring_bytes(placed, abstract_params, rows, length)
        if needed <= budget:
            return True
        return (f"scoring [{rows}, {length}] needs {needed / 2**20:.0f} MiB per device, "
                f"over the budget of {budget / 2**20:.0f} MiB")
    return fits
