"""The device mesh, the logical-axis rules, and moving host batches onto the mesh.

Mesh axes, outermost first: data, fsdp, seq, tensor.
  data    replicas that each see other rows of the batch
  fsdp    also splits the batch, and shards weights and optimizer state
  seq     splits the length of every sequence (ring attention); also shards weights
  tensor  splits heads and the MLP width
The model names its axes logically; `LOGICAL_RULES` maps those names onto mesh axes.
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "seq", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axes. Weights' "embed" dimension is split over fsdp and seq, so
# devices that share a sequence also share the parameter and optimizer memory.
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", "seq"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", ("fsdp", "seq")),
)


def mesh_shape(mesh_config: Mapping[str, int], device_count: int) -> dict[str, int]:
    """Resolve -1 entries of {data, fsdp, seq, tensor}; raise ValueError if impossible."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{axis} must be positive or -1, got {size}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if device_count % fixed:
            raise ValueError(f"mesh {sizes}: {device_count} devices are not a multiple of "
                             f"the fixed axes' product {fixed}")
        sizes[free[0]] = device_count // fixed
    elif fixed != device_count:
        raise ValueError(f"mesh {sizes} has {fixed} devices but {device_count} are available; "
                         f"set one axis to -1 or make the product {device_count}")
    return sizes


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axis types (sharding propagates)."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a [batch, length] input: rows over (data, fsdp), length over seq."""
    return NamedSharding(mesh, P(BATCH_AXES, "seq"))


def heads_spec(mesh: Mesh, length_axis: str | None = None) -> P:
    """PartitionSpec of a [batch, length, heads, head_dim] activation: rows over the batch
    axes, the length over `length_axis` (None: whole on every device), heads over tensor."""
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape) or None
    heads = "tensor" if "tensor" in mesh.shape else None
    return P(batch, length_axis, heads, None)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int,
                         row_offset: int = 0) -> dict[str, jax.Array]:
    """Place this process's rows of a batch onto the mesh as global arrays.

    `batch` holds rows [row_offset, row_offset + local_rows) of the global batch, each with
    the full length. Every device receives the [rows, columns] block its sharding names
    (any mix of data/fsdp/seq axes across processes works, because each process holds
    full-length rows and cuts the columns itself).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, local in batch.items():
        global_shape = (global_rows,) + local.shape[1:]

        def block(index, local=local):
            rows, cols = index[0], index[1]
            start = (rows.start or 0) - row_offset
            stop = (rows.stop if rows.stop is not None else global_rows) - row_offset
            if start < 0 or stop > local.shape[0]:
                raise ValueError(f"device needs rows {rows} that this process does not hold")
            return local[start:stop, cols]

        out[name] = jax.make_array_from_callback(global_shape, sharding, block)
    return out


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Make `mesh` the current mesh and resolve logical axis names with LOGICAL_RULES.

    Models built inside come out with their parameters already sharded."""
    from flax import nnx
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_RULES):
        yield


def process_row_block(mesh: Mesh, global_rows: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of a [global_rows, length] batch that this
    process's devices hold (all of them on one process), whatever the length."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map(
        (global_rows, mesh.shape["seq"]))
    starts = [index[0].start or 0 for index in index_map.values()]
    stops = [index[0].stop if index[0].stop is not None else global_rows
             for index in index_map.values()]
    return min(starts), max(stops)


def data_shard(mesh: Mesh, global_rows: int) -> tuple[int, int, int, int]:
    """(shard_index, shard_count, local_rows, row_offset) of this process in a row-sharded
    data stream: shard i of n yields the rows that processes in row block i need."""
    start, stop = process_row_block(mesh, global_rows)
    rows = stop - start
    return start // rows, global_rows // rows, rows, start


WEIGHT_STORAGE_AXES = ("fsdp", "seq")


def compute_shardings(param_shardings):
    """Shardings of the weights while they are used: storage axes (fsdp, seq) removed.

    Weights are stored split over fsdp x seq to save memory, and gathered whole (tensor
    splits kept) for the forward and backward pass; their gradients are reduce-scattered
    back to storage by the step's output shardings. Without this, XLA may instead gather
    the full-length activations onto every device to meet the weights' sharding, which
    defeats sequence parallelism (measured: 2x instead of 8x longer sequences at seq=8).
    """
    def strip(sharding: NamedSharding) -> NamedSharding:
        entries = []
        for entry in sharding.spec:
            axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
            kept = tuple(a for a in axes if a not in WEIGHT_STORAGE_AXES)
            entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return NamedSharding(sharding.mesh, P(*entries))

    return jax.tree.map(strip, param_shardings,
                        is_leaf=lambda x: isinstance(x, NamedSharding))


LAYER_STACK = "blocks"   # the subtree of stacked decoder-layer parameters (model/transformer.py)


def weight_gathers(param_shardings):
    """(gather_outer, gather_layer): the FSDP gathers of the weights for compute.

    gather_outer(params) constrains every parameter but the stacked layers' to its
    compute sharding (compute_shardings); gather_layer(layer_params) does the same for one
    layer's slice of the stacked parameters, inside the layer loop (the model's
    `prepare_layer` hook). So one layer's weights are whole at a time, not the model's;
    in the backward pass the transposed constraint reduce-scatters each layer's gradients.
    """
    compute = compute_shardings(param_shardings)

    def is_sharding(x):
        return isinstance(x, NamedSharding)

    def gather_outer(params):
        def constrain(path, leaf, sharding):
            if getattr(path[0], "key", None) == LAYER_STACK:
                return leaf
            return jax.lax.with_sharding_constraint(leaf, sharding)
        return jax.tree_util.tree_map_with_path(constrain, params, compute)

    layer = jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:])), compute[LAYER_STACK],
                         is_leaf=is_sharding)

    def gather_layer(layer_params):
        return jax.lax.with_sharding_constraint(layer_params, layer)

    return gather_outer, gather_layer
