"""A run's static parts (mesh, model structure, optimizer, shardings) and its train state:
created fresh in its shardings or described abstractly (restoring one from a workdir:
train/checkpoint.py).

The train state is a pytree {"params": nnx.State, "opt_state": optax state} on the mesh;
the model's structure (graphdef) is static and lives in the Run.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import optax
from flax import nnx

from data.tokenizers import make_tokenizer
from model import positions as pos_lib
from model import remat as remat_lib
from model.transformer import ModelConfig, Transformer
from model.attention import SEQUENCE_PARALLEL
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from parallel import sequence_parallel
from train.optimizer import make_optimizer


@dataclasses.dataclass
class Run:
    """What a config resolves to on one mesh: the model's structure and the optimizer."""
    config: Any
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    tokenizer: Any
    graphdef: Any
    optimizer: optax.GradientTransformation
    state_shardings: Any
    layout: str = "zigzag"         # the token order of batches on the seq axis
    layout_parts: int = 1          # the units the zigzag layout balances
    attention_fn: Any = None       # the model's attention function (None: its own)


def attention_override(model_config: ModelConfig, mesh, config,
                       rows_in_order: bool = False) -> Callable | None:
    """The attention function of model.attention on this mesh, when it is not the model's
    own: a sequence-parallel strategy bound to the mesh (parallel/sequence_parallel.py),
    or the blockwise kernel replaced by the fused one (model.attention_kernel). The batch
    layout lets a sliding window shorten the ring when it is contiguous; `rows_in_order`
    (one document per row, in sequence order: evaluation windows, not packed training
    rows) is what the fused kernel needs."""
    attention = model_config.attention
    if attention == "dense":
        return None
    seq = mesh.shape["seq"]
    layout, _ = sequence_parallel.batch_layout(attention, config.mesh.layout, seq,
                                               config.model.ulysses_degree)
    strategy = attention if attention in SEQUENCE_PARALLEL else "none"
    kernel = sequence_parallel.choose_kernel(
        config.model.attention_kernel, strategy="none" if seq == 1 else strategy,
        platform=mesh.devices.flat[0].platform,
        in_order=rows_in_order and (seq == 1 or layout == "contiguous"))
    if strategy == "none":
        if kernel == "blockwise":
            return None
        return sequence_parallel.local_kernel_function(kernel, block_q=model_config.block_q,
                                                       block_k=model_config.block_k)
    return sequence_parallel.make_sequence_attention(
        mesh, strategy, ulysses_degree=config.model.ulysses_degree, layout=layout,
        kernel=kernel, block_q=model_config.block_q, block_k=model_config.block_k)


def model_config_from(config, vocab_size: int) -> ModelConfig:
    """The ModelConfig of the `model` and `curriculum` sections of an ml_collections
    config (model/ never reads the config itself).

    l_max is curriculum.l_max, except for learned positions with
    model.learned_positions_length > 0: then it is that length (the table's rows)."""
    m = config.model
    l_max = config.curriculum.l_max
    if m.position == "learned" and m.get("learned_positions_length", 0) > 0:
        l_max = int(m.learned_positions_length)
    scaling = pos_lib.normalize_rope_scaling(
        m.rope.scaling, original_max_position_embeddings=config.curriculum.l_max)
    model_config = ModelConfig(
        vocab_size=int(m.vocab_size or vocab_size), d_model=m.d_model,
        n_layers=m.n_layers, q_heads=m.q_heads, kv_heads=m.kv_heads,
        head_dim=m.head_dim, mlp_dim=m.mlp_dim, l_max=l_max,
        position=m.position, rope_theta=float(m.rope.theta),
        rope_scaling_json=json.dumps(scaling, sort_keys=True), attention=m.attention,
        block_q=m.block_q, block_k=m.block_k, tie_embeddings=m.tie_embeddings,
        dtype=m.dtype, param_dtype=m.param_dtype, remat=remat_lib.policy_name(m.remat),
        scan_layers=bool(m.get("scan_layers", True)),
        loss_chunk_tokens=int(m.get("loss_chunk_tokens", 0)),
        mlp_chunk_tokens=int(m.get("mlp_chunk_tokens", 0)),
        remat_group=int(m.get("remat_group", 1)), norm_eps=m.norm_eps,
        init_std=m.init_std, norm=m.norm, mlp=m.mlp, qkv_bias=m.qkv_bias,
        attention_out_bias=m.attention_out_bias, mlp_bias=m.mlp_bias,
        sliding_window=m.get("sliding_window"),
        layer_types=None if m.get("layer_types") is None else tuple(m.layer_types))
    model_config.validate()
    return model_config


def build_run(config, devices=None, level=None, tokenizer=None,
              rows_in_order: bool = False) -> Run:
    """The mesh, model structure, optimizer and state shardings of `config` (already
    validated: train/validate.py).

    `level` (a curriculum Level) replaces the config's mesh and RoPE settings with that
    level's; parameters have the same structure at every level, only their shardings and
    the model's static settings (attention bound to the mesh, RoPE) differ.
    """
    tokenizer = tokenizer or make_tokenizer(config.data.tokenizer)
    model_config = model_config_from(config, tokenizer.vocab_size)
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({model_config.vocab_size}) is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    mesh_sizes = config.mesh
    if level is not None:
        mesh_sizes = level.mesh_dict
        model_config = dataclasses.replace(model_config, rope_theta=level.rope_theta,
                                           rope_scaling_json=level.rope_scaling_json)
    mesh = mesh_lib.make_mesh(mesh_sizes, devices)
    if model_config.vocab_size % mesh.shape["tensor"]:
        raise ValueError(f"vocab_size {model_config.vocab_size} must be a multiple of mesh.tensor")
    attention_fn = attention_override(model_config, mesh, config, rows_in_order)
    graphdef, abstract_params, param_shardings = model_on_mesh.abstract_model(
        model_config, mesh, attention_fn)
    with mesh_lib.use_mesh(mesh):
        optimizer = make_optimizer(config.train, abstract_params)
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings}
    layout, parts = sequence_parallel.batch_layout(model_config.attention, config.mesh.layout,
                                                   mesh.shape["seq"], config.model.ulysses_degree)
    return Run(config, mesh, model_config, tokenizer, graphdef, optimizer, state_shardings,
               layout, parts, attention_fn)


def _state_factory(run: Run, seed: int) -> Callable[[], dict]:
    """() -> a fresh train state of `run` (to jit into its shardings, or to eval_shape)."""
    attention_fn = run.attention_fn

    def create():
        model = Transformer(run.model_config, rngs=nnx.Rngs(seed), attention_fn=attention_fn)
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": run.optimizer.init(params)}

    return create


def init_state(run: Run, seed: int):
    """Fresh parameters and optimizer state, created directly in their shardings."""
    with mesh_lib.use_mesh(run.mesh):
        return jax.jit(_state_factory(run, seed), out_shardings=run.state_shardings)()


def abstract_state(run: Run):
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    with mesh_lib.use_mesh(run.mesh):
        shapes = jax.eval_shape(_state_factory(run, 0))
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes, run.state_shardings)
