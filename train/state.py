"""A run's static parts (mesh, model structure, optimizer, shardings) and its train state:
created fresh in its shardings, described abstractly, or restored from a workdir.

The train state is a pytree {"params": nnx.State, "opt_state": optax state} on the mesh;
the model's structure (graphdef) is static and lives in the Run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Callable

import jax
import optax
from flax import nnx

from data.tokenizers import make_tokenizer
from model import positions as pos_lib
from model.transformer import ModelConfig, Transformer
from model.attention import SEQUENCE_PARALLEL
from parallel import mesh as mesh_lib
from parallel import sequence_parallel
from train import checkpoint as checkpoint_lib
from train import workdir_config
from train.optimizer import make_optimizer
from util.errors import error_line

log = logging.getLogger("boundless")


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


def build_run(config, devices=None, level=None, tokenizer=None,
              rows_in_order: bool = False) -> Run:
    """The mesh, model structure, optimizer and state shardings of `config` (already
    validated: train/validate.py).

    `level` (a curriculum Level) replaces the config's mesh and RoPE settings with that
    level's; parameters have the same structure at every level, only their shardings and
    the model's static settings (attention bound to the mesh, RoPE) differ.
    """
    tokenizer = tokenizer or make_tokenizer(config.data.tokenizer)
    model_config = ModelConfig.from_config(config, tokenizer.vocab_size)
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
    with mesh_lib.use_mesh(mesh):
        abstract_model = nnx.eval_shape(
            lambda: Transformer(model_config, rngs=nnx.Rngs(0), attention_fn=attention_fn))
        graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        optimizer = make_optimizer(config.train, abstract_params)
        param_shardings = jax.tree.map(
            lambda spec: jax.sharding.NamedSharding(mesh, spec),
            nnx.get_partition_spec(abstract_params),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
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


# How the parameters are laid out in a checkpoint; recorded in its metadata. Before the
# decoder layers were stacked (model/transformer.py) every block had its own parameters.
PARAMETER_LAYOUT = "stacked_layers"


def checkpoint_meta(run: Run, config, step: int, tokens: int, **extra) -> dict:
    """The metadata saved with a checkpoint of `run`."""
    return {"step": step, "tokens": tokens, "parameter_layout": PARAMETER_LAYOUT,
            "model_config": dataclasses.asdict(run.model_config),
            "config": json.loads(workdir_config.to_json(config)), **extra}


def check_same_model(meta: dict, run: Run, workdir: str, *,
                     resize_positions: bool = False) -> None:
    """Raise unless the checkpoint metadata `meta` describes `run`'s parameters.

    `resize_positions`: the learned-position table may have another number of rows (l_max)
    than the checkpoint's, because the caller interpolates it (restore_params_from)."""
    if meta.get("parameter_layout") != PARAMETER_LAYOUT:
        raise ValueError(f"{workdir} holds checkpoints written before the decoder layers' "
                         "parameters were stacked into one [n_layers, ...] array each; this "
                         "version cannot restore them (train anew, or export them with the "
                         "version that wrote them and --mode import the export)")
    saved = meta.get("model_config")
    current = dataclasses.asdict(run.model_config)
    # may change between levels, evaluations and fine-tuning runs
    ignored = {"rope_theta", "rope_scaling_json", "attention", "block_q", "block_k", "remat",
               "scan_layers", "loss_chunk_tokens", "mlp_chunk_tokens", "remat_group", "dtype"}
    if run.model_config.position != "learned" or resize_positions:
        ignored.add("l_max")              # no parameter depends on it, or it is resized
    # a key the checkpoint predates (e.g. model.norm) had its default then
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.default is not dataclasses.MISSING}
    differing = sorted(k for k in current if k not in ignored and saved
                       and saved.get(k, defaults.get(k)) != current[k])
    if differing == ["l_max"] and run.model_config.position == "learned":
        raise ValueError(
            f"{workdir} holds a learned-position table of {saved.get('l_max')} rows, this run's "
            f"has {current['l_max']}: set model.learned_positions_length={current['l_max']} to "
            f"start from its weights with the table interpolated (train.init_from)")
    if differing:
        raise ValueError(f"{workdir} holds checkpoints of a different model (differs in "
                         f"{', '.join(differing)}); use another --workdir")


def restore_newest(workdir: str, run: Run, what: str):
    """(state, meta) of the newest intact checkpoint in `workdir`, in `run`'s shardings;
    broken newer ones are moved aside (restore_intact). `what` names the caller in the
    error when there is none."""
    with _checkpointer(workdir, what) as checkpointer:
        restored = restore_intact(checkpointer, lambda step: run, workdir)
        if restored is None:
            raise ValueError(f"{what}: no checkpoint in {checkpointer.directory}")
        return restored[1], restored[2]


class BrokenCheckpoints(ValueError):
    """Every checkpoint of a workdir failed to restore."""


def restore_intact(checkpointer, run_at, workdir: str, with_data: bool = False,
                   move_broken: bool = True):
    """(step, state, meta[, data state]) of the newest checkpoint that restores, with
    run_at(step) giving the Run to restore into; None when there is no checkpoint.

    A checkpoint whose metadata or arrays fail to read (a truncated or missing file, an
    emptied _METADATA, a deleted state/) is named in a warning and, with `move_broken`,
    moved aside to <workdir>/broken_checkpoints/ (never deleted); the next older one is
    tried. A checkpoint of another model is not broken: that ValueError is raised as it
    is. BrokenCheckpoints (one line) when checkpoints exist but none restores."""
    broken = []
    for step in checkpointer.steps():
        run = run_at(step)
        try:
            meta = checkpointer.restore_meta(step)
        except Exception as error:          # noqa: BLE001 - any read failure means damage
            broken.append(_set_aside(checkpointer, step, error, move_broken))
            continue
        check_same_model(meta, run, workdir)
        try:
            restored = checkpointer.restore(step, abstract_state(run), with_data=with_data)
        except Exception as error:          # noqa: BLE001 - any restore failure means damage
            broken.append(_set_aside(checkpointer, step, error, move_broken))
            continue
        return (step, *restored)
    if broken:
        raise BrokenCheckpoints(f"no intact checkpoint in {checkpointer.directory}: "
                                + "; ".join(broken))
    return None


def _set_aside(checkpointer, step: int, error: Exception, move: bool) -> str:
    reason = error_line(error)
    where = checkpointer.move_aside(step) if move else "left in place"
    log.warning("checkpoint step %d of %s is broken (%s); %s%s", step, checkpointer.directory,
                reason, "moved to " if move else "", where)
    return f"step {step} ({reason})"


@contextlib.contextmanager
def _checkpointer(workdir: str, what: str):
    """A Checkpointer of workdir/checkpoints, closed on exit; one ValueError line naming
    `what` when the directory does not exist (and none is created)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints):
        raise ValueError(f"{what}: no checkpoint in {os.path.abspath(checkpoints)}")
    checkpointer = checkpoint_lib.Checkpointer(checkpoints, max_to_keep=1, async_save=False)
    try:
        yield checkpointer
    finally:
        checkpointer.close()


@contextlib.contextmanager
def _newest_checkpoint(workdir: str, what: str):
    """(checkpointer, newest step) of `workdir`, closed on exit; one ValueError line naming
    `what` when there is no checkpoint (and no directory is created)."""
    with _checkpointer(workdir, what) as checkpointer:
        latest = checkpointer.latest_step()
        if latest is None:
            raise ValueError(f"{what}: no checkpoint in {checkpointer.directory}")
        yield checkpointer, latest


def restore_params_from(workdir: str, run: Run, what: str):
    """(params, resized) from the newest checkpoint of `workdir`, in `run`'s shardings
    (train.init_from). With learned positions and model.learned_positions_length > 0, a
    checkpoint whose table has another number of rows is accepted and its table is
    interpolated to `run`'s rows (positions.interpolate_position_table); `resized` is then
    (old rows, new rows), else None."""
    resize = (run.model_config.position == "learned"
              and run.config.model.learned_positions_length > 0)
    with _newest_checkpoint(workdir, what) as (checkpointer, latest):
        meta = checkpointer.restore_meta(latest)
        check_same_model(meta, run, workdir, resize_positions=resize)
        rows = run.model_config.l_max
        saved_rows = int((meta.get("model_config") or {}).get("l_max", rows))
        if not resize or saved_rows == rows:
            return checkpointer.restore(latest, abstract_state(run))[0]["params"], None
        # restore the table (and its optimizer moments) with the saved rows, then resize
        abstract = jax.tree_util.tree_map_with_path(
            lambda path, leaf: _with_rows(leaf, saved_rows) if _is_position_table(path, leaf, rows)
            else leaf, abstract_state(run))
        params = checkpointer.restore(latest, abstract)[0]["params"]
    sharding = run.state_shardings["params"]["position_table"]
    if isinstance(sharding, nnx.Variable):
        sharding = sharding.get_value()
    table = params["position_table"]
    with mesh_lib.use_mesh(run.mesh):
        resized = jax.jit(lambda t: pos_lib.interpolate_position_table(t, rows),
                          out_shardings=sharding)(table[...])
    params["position_table"] = table.replace(resized)
    return params, (saved_rows, rows)


def _is_position_table(path, leaf, rows: int) -> bool:
    names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
    return "position_table" in names and len(leaf.shape) == 2 and leaf.shape[0] == rows


def _with_rows(leaf, rows: int):
    return jax.ShapeDtypeStruct((rows,) + tuple(leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)
