"""A model on a mesh: the one place that builds the Transformer abstractly on a mesh.

Training (train/state.py: build_run), evaluation (evaluation/suite.py: the generators of
retrieval and RULER) and the command-line modes (generate, lm_eval) all get the model's
structure and parameter shardings here, and the model config decoding runs with.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from model.attention import SEQUENCE_PARALLEL
from model.transformer import ModelConfig, Transformer
from parallel import mesh as mesh_lib


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


def decoding_config(model_config: ModelConfig) -> ModelConfig:
    """`model_config` for token-by-token decoding: a sequence-parallel attention becomes
    dense (decoding attends over the KV cache; evaluation/generate.py binds the ring for a
    prefill over a mesh itself) and nothing is rematerialised (no backward pass)."""
    attention = "dense" if model_config.attention in SEQUENCE_PARALLEL else model_config.attention
    return dataclasses.replace(model_config, attention=attention, remat="none")
