"""A model on a mesh: the one place that places the Transformer on a mesh.

Training (train/state.py: build_run), evaluation (scoring, the retrieval and RULER
generators), generation (the ring prefill) and the command-line modes (import, generate,
lm_eval) all get the model's structure, parameter shardings and attention function here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx

from model.choices import SEQUENCE_PARALLEL
from model.transformer import ModelConfig, Transformer
from parallel import mesh as mesh_lib
from parallel import sequence_parallel


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelOnMesh:
    """A model's structure placed on a mesh: what scoring and generation need besides the
    parameters. The trainer's Run (train/state.py) is one, with the optimizer added."""
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    graphdef: Any                      # the model's static structure (nnx.GraphDef)
    param_shardings: Any               # NamedShardings of the parameters (an nnx.State)
    attention_fn: Callable | None = None   # the model's attention function (None: its own)
    layout: str = "zigzag"             # the token order of batches on the seq axis
    layout_parts: int = 1              # the units the zigzag layout balances
    kernel: str = "blockwise"          # what runs attention on each device: attention_kernel


def abstract_model(model_config: ModelConfig, mesh: jax.sharding.Mesh, attention_fn=None):
    """(graphdef, abstract params, param shardings) of a Transformer of `model_config` on
    `mesh`, without allocating it: the params are an nnx.State of ShapeDtypeStructs, the
    shardings NamedShardings on `mesh` from the model's logical axes (parallel/mesh.py).
    `attention_fn` replaces the model's own attention (e.g. the ring bound to `mesh`)."""
    with mesh_lib.use_mesh(mesh):
        abstract = nnx.eval_shape(
            lambda: Transformer(model_config, rngs=nnx.Rngs(0), attention_fn=attention_fn))
        graphdef, params = nnx.split(abstract, nnx.Param)
        shardings = jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(mesh, spec), nnx.get_partition_spec(params),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return graphdef, params, shardings


def attention_kernel(model_config: ModelConfig, mesh, *, layout_setting: str = "auto",
                     ulysses_degree: int | None = None, kernel_setting: str = "auto",
                     rows_in_order: bool = False) -> str:
    """What computes attention on each device of `mesh`: "dense" (the reference), or the
    kernel `kernel_setting` (model.attention_kernel) resolves to on the platform of the
    mesh's devices (a compile-only GPU or TPU too, not the host's): "blockwise", "cudnn",
    "pallas" or "pallas_tpu". `rows_in_order` (one document per row, in sequence order:
    evaluation windows, not packed training rows) is what cuDNN's kernel needs."""
    if model_config.attention == "dense":
        return "dense"
    seq = mesh.shape["seq"]
    layout, _ = sequence_parallel.batch_layout(model_config.attention, layout_setting, seq,
                                               ulysses_degree)
    strategy = model_config.attention if model_config.attention in SEQUENCE_PARALLEL else "none"
    return sequence_parallel.choose_kernel(
        kernel_setting, strategy="none" if seq == 1 else strategy,
        platform=mesh.devices.flat[0].platform,
        in_order=rows_in_order and (seq == 1 or layout == "contiguous"),
        head_dim=model_config.head_dim, dtype=model_config.dtype)


def attention_function(model_config: ModelConfig, mesh, *, layout_setting: str = "auto",
                       ulysses_degree: int | None = None, kernel_setting: str = "auto",
                       rows_in_order: bool = False) -> Callable | None:
    """The attention function of model_config.attention on this mesh, when it is not the
    model's own: a sequence-parallel strategy bound to the mesh (parallel/sequence_parallel.py),
    or the blockwise kernel replaced by the fused one (attention_kernel, same settings).
    The batch layout (`layout_setting`, mesh.layout) lets a sliding window shorten the ring
    when it is contiguous."""
    kernel = attention_kernel(model_config, mesh, layout_setting=layout_setting,
                              ulysses_degree=ulysses_degree, kernel_setting=kernel_setting,
                              rows_in_order=rows_in_order)
    if kernel == "dense":
        return None
    attention = model_config.attention
    if attention not in SEQUENCE_PARALLEL:
        if kernel == "blockwise":
            return None
        return sequence_parallel.local_kernel_function(
            kernel, mesh, block_q=model_config.block_q, block_k=model_config.block_k)
    layout, _ = sequence_parallel.batch_layout(attention, layout_setting, mesh.shape["seq"],
                                               ulysses_degree)
    return sequence_parallel.make_sequence_attention(
        mesh, attention, ulysses_degree=ulysses_degree, layout=layout, kernel=kernel,
        block_q=model_config.block_q, block_k=model_config.block_k)


def place_model(model_config: ModelConfig, mesh, *, layout_setting: str = "auto",
                ulysses_degree: int | None = None, kernel_setting: str = "auto",
                rows_in_order: bool = False) -> tuple[ModelOnMesh, Any]:
    """(the model placed on `mesh`, its abstract params): the attention function of
    attention_function (same settings) and the batch layout it needs."""
    attention_fn = attention_function(
        model_config, mesh, layout_setting=layout_setting, ulysses_degree=ulysses_degree,
        kernel_setting=kernel_setting, rows_in_order=rows_in_order)
    graphdef, abstract_params, shardings = abstract_model(model_config, mesh, attention_fn)
    layout, parts = sequence_parallel.batch_layout(model_config.attention, layout_setting,
                                                   mesh.shape["seq"], ulysses_degree)
    kernel = attention_kernel(model_config, mesh, layout_setting=layout_setting,
                              ulysses_degree=ulysses_degree, kernel_setting=kernel_setting,
                              rows_in_order=rows_in_order)
    placed = ModelOnMesh(mesh=mesh, model_config=model_config, graphdef=graphdef,
                         param_shardings=shardings, attention_fn=attention_fn, layout=layout,
                         layout_parts=parts, kernel=kernel)
    return placed, abstract_params


def decoding_config(model_config: ModelConfig) -> ModelConfig:
    """`model_config` for token-by-token decoding: a sequence-parallel attention becomes
    dense (decoding attends over the KV cache; evaluation/generate.py binds the ring for a
    prefill over a mesh itself) and nothing is rematerialised (no backward pass)."""
    attention = "dense" if model_config.attention in SEQUENCE_PARALLEL else model_config.attention
    return dataclasses.replace(model_config, attention=attention, remat="none")
