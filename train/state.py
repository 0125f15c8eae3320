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
from evaluation import suite
from model import positions as pos_lib
from model.choices import policy_name
from model.transformer import ModelConfig, Transformer
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from train.optimizer import make_optimizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run(model_on_mesh.ModelOnMesh):
    """What a config resolves to on one mesh: the model placed on it (mesh, structure,
    parameter shardings, attention function, batch layout) and the optimizer."""
    tokenizer: Any
    optimizer: optax.GradientTransformation
    state_shardings: Any           # {"params": ..., "opt_state": ...} NamedShardings


def model_config_from(settings, vocab_size: int) -> ModelConfig:
    """The ModelConfig of the `model` and `curriculum` sections of the settings
    (configs/sections.py's Settings).

    l_max is curriculum.l_max, except for learned positions with
    model.learned_positions_length > 0: then it is that length (the table's rows)."""
    section = settings.model                       # every key present: base.py's defaults
    l_max = settings.curriculum.l_max
    if section.position == "learned" and section.learned_positions_length > 0:
        l_max = int(section.learned_positions_length)
    scaling = pos_lib.normalize_rope_scaling(
        section.rope.scaling, original_max_position_embeddings=settings.curriculum.l_max)
    derived = dict(vocab_size=int(section.vocab_size or vocab_size), l_max=l_max,
                   rope_theta=float(section.rope.theta),
                   rope_scaling_json=json.dumps(scaling, sort_keys=True),
                   remat=policy_name(section.remat))
    # every other ModelConfig field is the model key of the same name (ModelConfig's fields
    # are the list: a field without its key fails here, and in tests/test_model_fields.py)
    model_config = ModelConfig(**derived, **{
        field.name: getattr(section, field.name) for field in dataclasses.fields(ModelConfig)
        if field.name not in derived})
    model_config.validate()
    return model_config


def eval_setup_from(settings) -> suite.EvalSetup:
    """What evaluation reads of the settings: their eval and data sections, and the rest
    it needs as plain values."""
    return suite.eval_setup(settings.eval, settings.data,
                            l_max=settings.curriculum.l_max, seed=settings.seed,
                            eos_ids=settings.generate.eos_ids)


def build_run(settings, devices=None, level=None, tokenizer=None,
              rows_in_order: bool = False) -> Run:
    """The mesh, model structure, optimizer and state shardings of `settings`
    (configs/sections.py's Settings, validated: train/validate.py).

    `level` (a curriculum Level) replaces the settings' mesh and RoPE settings with that
    level's; parameters have the same structure at every level, only their shardings and
    the model's static settings (attention bound to the mesh, RoPE) differ.
    """
    tokenizer = tokenizer or make_tokenizer(settings.data.tokenizer)
    model_config = model_config_from(settings, tokenizer.vocab_size)
    if model_config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size ({model_config.vocab_size}) is smaller than the "
                         f"tokenizer's vocabulary ({tokenizer.vocab_size})")
    mesh_sizes = dataclasses.asdict(settings.mesh)
    if level is not None:
        mesh_sizes = level.mesh_dict
        model_config = dataclasses.replace(model_config, rope_theta=level.rope_theta,
                                           rope_scaling_json=level.rope_scaling_json)
    mesh = mesh_lib.make_mesh(mesh_sizes, devices)
    if model_config.vocab_size % mesh.shape["tensor"]:
        raise ValueError(f"vocab_size {model_config.vocab_size} must be a multiple of mesh.tensor")
    placed, abstract_params = model_on_mesh.place_model(
        model_config, mesh, layout_setting=settings.mesh.layout,
        ulysses_degree=settings.model.ulysses_degree,
        kernel_setting=settings.model.attention_kernel, rows_in_order=rows_in_order)
    with mesh_lib.use_mesh(mesh):
        optimizer = make_optimizer(settings.train, abstract_params)
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = optax.tree_map_params(
        optimizer, lambda _, sharding: sharding, abstract_opt_state, placed.param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    if settings.train.optimizer_memory == "host":
        opt_shardings = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), opt_shardings)
    state_shardings = {"params": placed.param_shardings, "opt_state": opt_shardings}
    return Run(**{f.name: getattr(placed, f.name) for f in dataclasses.fields(placed)},
               tokenizer=tokenizer, optimizer=optimizer,
               state_shardings=state_shardings)


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
