"""The training loop: build everything from a config, run jitted steps, log, checkpoint.

The train state is a plain pytree {"params": nnx.State, "opt_state": optax state} living
on the mesh; the model's structure (graphdef) is static. One jitted step is compiled per
(length, batch, mesh layout) and reused. The learning rate is computed on the host from
the tokens seen and passed in, so it does not depend on how many steps a length takes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from model.positions import normalize_rope_scaling
from model.transformer import ModelConfig, Transformer, count_parameters
from parallel import layout as layout_lib
from parallel import mesh as mesh_lib
from train import checkpoint as checkpoint_lib
from train import curriculum as curriculum_lib
from train import data as data_lib
from train import evaluate as evaluate_lib
from train.loss import token_loss_sums
from train.metrics import MetricsWriter, ProgressLine, format_duration
from train.optimizer import learning_rate_at, make_optimizer

log = logging.getLogger("boundless")


# ------------------------------------------------------------------ config checks
def validate_config(config, device_count: int | None = None):
    """Raise ValueError with one clear line for any setting that cannot work; return the
    curriculum plan. Runs before anything is compiled or any data is read."""
    device_count = jax.device_count() if device_count is None else device_count
    m, t, c = config.model, config.train, config.curriculum
    if c.l_max <= 0:
        raise ValueError(f"curriculum.l_max must be positive, got {c.l_max}")
    if t.steps <= 0 or t.batch_size <= 0:
        raise ValueError("train.steps and train.batch_size must be positive")
    if config.mesh.layout not in layout_lib.LAYOUTS:
        raise ValueError(f"mesh.layout must be one of {layout_lib.LAYOUTS}, got {config.mesh.layout!r}")
    if config.data.tokenizer != "bytes" and not os.path.exists(config.data.tokenizer):
        raise ValueError(f"data.tokenizer: no file {config.data.tokenizer!r}")
    mesh_lib.mesh_shape(config.mesh, device_count)            # the config's own mesh is valid
    plan = curriculum_lib.make_plan(config, device_count)
    for level in plan.levels:
        check_mesh(config, level.mesh_dict, level.batch_size, f"curriculum level {level.index}")
        check_length(level.seq_len, config, level.mesh_dict)
    eval_mesh = plan.levels[-1].mesh_dict                       # evaluation runs on the last layout
    check_mesh(config, eval_mesh, config.eval.batch_size, "eval.batch_size")
    for length in evaluate_lib.evaluation_lengths(config) + tuple(config.eval.retrieval_lengths or ()):
        check_length(length, config, eval_mesh)
    return plan


def check_mesh(config, sizes, batch_size: int, what: str) -> None:
    """The model and a batch of `batch_size` rows must split over mesh `sizes`."""
    m = config.model
    row_groups = sizes["data"] * sizes["fsdp"]
    if batch_size % row_groups:
        raise ValueError(f"{what}: batch of {batch_size} rows is not a multiple of "
                         f"mesh data x fsdp = {row_groups}")
    accum = config.train.grad_accum_steps
    if accum < 1 or (batch_size // row_groups) % accum:
        raise ValueError(f"{what}: train.grad_accum_steps ({accum}) must divide the rows "
                         f"per data shard ({batch_size // row_groups})")
    if sizes["seq"] > 1 and m.attention != "ring":
        raise ValueError(f"{what}: mesh seq={sizes['seq']} splits the sequence: set "
                         f"model.attention='ring'")
    if m.q_heads % sizes["tensor"] or m.kv_heads % sizes["tensor"]:
        raise ValueError(f"model.q_heads ({m.q_heads}) and model.kv_heads ({m.kv_heads}) "
                         f"must be multiples of mesh.tensor ({sizes['tensor']})")
    if m.mlp_dim % sizes["tensor"]:
        raise ValueError(f"model.mlp_dim ({m.mlp_dim}) must be a multiple of mesh.tensor")
    weight_split = sizes["fsdp"] * sizes["seq"]
    if m.d_model % weight_split:
        raise ValueError(f"{what}: model.d_model ({m.d_model}) must be a multiple of mesh "
                         f"fsdp x seq ({weight_split}), which shard the weights")


def check_length(length: int, config, sizes: dict) -> None:
    """A sequence length must split into 2 x seq chunks (zigzag) and into blocks."""
    seq = sizes["seq"]
    if seq > 1 and length % (2 * seq):
        raise ValueError(f"length {length} is not divisible by 2 x seq = {2 * seq} (mesh seq "
                         f"axis, zigzag chunks)")
    local = length // seq
    for name in ("block_q", "block_k"):
        block = min(getattr(config.model, name), local)
        if local % block:
            raise ValueError(f"length {length} (per device {local}) is not a multiple of "
                             f"model.{name} = {block}")


def eval_level(config, plan):
    """The level evaluation runs on: the last (most sequence-parallel) one, with the RoPE
    overrides of eval.rope_scaling / eval.rope_theta applied."""
    level = plan.levels[-1]
    e = config.eval
    if e.rope_scaling is not None:
        scaling = normalize_rope_scaling(e.rope_scaling,
                                         original_max_position_embeddings=config.curriculum.l_max)
        level = dataclasses.replace(level, rope_scaling_json=json.dumps(scaling, sort_keys=True))
    if e.rope_theta:
        level = dataclasses.replace(level, rope_theta=float(e.rope_theta))
    return level


# ------------------------------------------------------------------ building a run
@dataclasses.dataclass
class Run:
    """What a config resolves to: the mesh, the model's structure, the optimizer."""
    config: Any
    mesh: jax.sharding.Mesh
    model_config: ModelConfig
    tokenizer: Any
    graphdef: Any
    optimizer: optax.GradientTransformationExtraArgs
    state_shardings: Any


def attention_override(model_config: ModelConfig, mesh) -> Callable | None:
    """Ring attention bound to the mesh when the config asks for it (else the model's own)."""
    if model_config.attention != "ring":
        return None
    from parallel.ring_attention import make_ring_attention
    return make_ring_attention(mesh, block_q=model_config.block_q, block_k=model_config.block_k)


def build_run(config, devices=None, level=None) -> Run:
    """Validate the config, make the mesh, the tokenizer and the abstract train state.

    `level` (a curriculum Level) replaces the config's mesh and RoPE settings with that
    level's; parameters have the same structure at every level, only their shardings and
    the model's static settings (attention bound to the mesh, RoPE) differ.
    """
    validate_config(config, len(devices) if devices is not None else None)
    tokenizer = data_lib.make_tokenizer(config.data.tokenizer)
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
    attention_fn = attention_override(model_config, mesh)
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
    return Run(config, mesh, model_config, tokenizer, graphdef, optimizer, state_shardings)


def init_state(run: Run, seed: int):
    """Fresh parameters and optimizer state, created directly in their shardings."""
    attention_fn = attention_override(run.model_config, run.mesh)

    def create():
        model = Transformer(run.model_config, rngs=nnx.Rngs(seed), attention_fn=attention_fn)
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": run.optimizer.init(params)}

    with mesh_lib.use_mesh(run.mesh):
        return jax.jit(create, out_shardings=run.state_shardings)()


# ------------------------------------------------------------------ the step
def make_train_step(run: Run, accum_steps: int):
    """The jitted step: (state, batch, learning_rate) -> (state, metrics).

    With accum_steps > 1 the batch's rows are split into that many micro-batches whose
    gradient sums are added before one update; the result equals the full-batch step.
    """
    gathered = mesh_lib.compute_shardings(run.state_shardings["params"])

    def loss_sums(params, batch):
        params = jax.lax.with_sharding_constraint(params, gathered)   # FSDP: gather weights
        return token_loss_sums(run.graphdef, params, batch)

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
        updates, opt_state = run.optimizer.update(grads, state["opt_state"], params,
                                                  learning_rate=learning_rate)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": nll_sum / count, "grad_norm": optax.tree.norm(grads),
                   "loss_weight": count}
        return {"params": params, "opt_state": opt_state}, metrics

    return jax.jit(step, donate_argnums=0,
                   out_shardings=(run.state_shardings, None))


# ------------------------------------------------------------------ data on the mesh
def put_batch(batch, mesh, global_rows: int, layout: str):
    """This process's host rows -> global arrays on the mesh, tokens in `layout` order
    along the seq axis (targets were shifted before, so the permutation is safe)."""
    _, _, _, row_offset = mesh_lib.data_shard(mesh, global_rows, batch["tokens"].shape[1])
    batch = layout_lib.apply_layout(batch, layout, mesh.shape["seq"])
    return mesh_lib.host_batch_to_global(batch, mesh, global_rows, row_offset=row_offset)


# ------------------------------------------------------------------ the loop
def _config_json(config) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True)


def _check_same_model(meta: dict, run: Run, workdir: str) -> None:
    saved = meta.get("model_config")
    current = dataclasses.asdict(run.model_config)
    # may change between levels, evaluations and fine-tuning runs
    ignored = {"rope_theta", "rope_scaling_json", "attention", "block_q", "block_k", "remat",
               "dtype"}
    if run.model_config.position != "learned":
        ignored.add("l_max")              # no parameter depends on it
    differing = sorted(k for k in current if k not in ignored and saved and saved.get(k) != current[k])
    if differing:
        raise ValueError(f"{workdir} holds checkpoints of a different model (differs in "
                         f"{', '.join(differing)}); use another --workdir")


def layout_name(mesh) -> str:
    return " x ".join(f"{axis} {size}" for axis, size in mesh.shape.items() if size > 1) or "1 device"


class Levels:
    """Per curriculum level: its Run (mesh + model variant) and its data iterator."""

    def __init__(self, config, plan):
        self.plan = plan
        self.runs = [build_run(config, level=level) for level in plan.levels]
        self.iterators = {}
        for level, run in zip(plan.levels, self.runs):
            shard_index, shard_count, local_rows, _ = mesh_lib.data_shard(
                run.mesh, level.batch_size, level.seq_len)
            self.iterators[f"data_{level.index}"] = data_lib.make_train_iterator(
                config.data, run.tokenizer, seq_len=level.seq_len, batch_size=local_rows,
                seed=config.data.shuffle_seed + level.index, shard_index=shard_index,
                shard_count=shard_count, l_max=config.curriculum.l_max)

    def next_batch(self, level):
        return next(self.iterators[f"data_{level.index}"])


def train(config, workdir: str) -> dict:
    """Train (resuming from the newest checkpoint in workdir/checkpoints if any), evaluate
    at the end, and return a summary {"step", "tokens", "final_loss", "eval"}."""
    plan = validate_config(config)
    is_writer = jax.process_index() == 0
    if is_writer:
        print(plan.format(), flush=True)
    levels = Levels(config, plan)
    eval_run = build_run(config, level=eval_level(config, plan))
    final_eval = eval_batches(config, eval_run)
    quick_eval = dataclasses.replace(final_eval, sliding={}, retrieval={})   # same lengths

    if is_writer:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(_config_json(config))
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save, data_names=tuple(levels.iterators))

    step, tokens = 0, 0
    latest = checkpointer.latest_step()
    if latest is not None:
        start_run = levels.runs[plan.level_at(min(latest, plan.total_steps - 1)).index]
        _check_same_model(checkpointer.restore_meta(latest), start_run, workdir)
        state, meta = checkpointer.restore(latest, abstract_state(start_run), levels.iterators)
        step, tokens = int(meta["step"]), int(meta["tokens"])
        if is_writer:
            print(f"resumed from {checkpointer.directory} at step {step} ({tokens} tokens)",
                  flush=True)
    else:
        start_run = levels.runs[plan.level_at(0).index]
        state = init_state(start_run, config.seed)
        if config.train.init_from:
            state["params"] = load_params(config.train.init_from, start_run)
            if is_writer:
                print(f"initialised the parameters from {config.train.init_from}", flush=True)
    if is_writer:
        print(f"model: {count_parameters_in(state['params']) / 1e6:.2f}M parameters; "
              f"{plan.total_steps} steps, {plan.total_tokens} tokens; workdir {workdir}",
              flush=True)

    total_steps, total_tokens = plan.total_steps, plan.total_tokens
    writer = MetricsWriter(workdir)
    progress = ProgressLine(total_steps)
    compiled: dict[int, Callable] = {}
    current_run = start_run

    def meta_now():
        return {"step": step, "tokens": tokens,
                "model_config": dataclasses.asdict(current_run.model_config),
                "config": json.loads(_config_json(config))}

    last_log_time, last_log_step = time.time(), step
    pending, final_loss = None, None
    while step < total_steps:
        level = plan.level_at(step)
        run = levels.runs[level.index]
        if run is not current_run:
            # relayout: the same parameters, resharded device-to-device for this level's mesh
            state = jax.device_put(state, run.state_shardings)
            current_run = run
        host_batch = levels.next_batch(level)
        batch = put_batch(host_batch, run.mesh, level.batch_size, config.mesh.layout)
        learning_rate = level.lr_multiplier * learning_rate_at(
            tokens, total_tokens, config.train.learning_rate, config.train.warmup_fraction,
            config.train.min_learning_rate_ratio)
        with mesh_lib.use_mesh(run.mesh):
            if level.index not in compiled:
                compile_start = time.time()
                compiled[level.index] = make_train_step(run, config.train.grad_accum_steps)
                state, metrics = compiled[level.index](state, batch, jnp.float32(learning_rate))
                jax.block_until_ready(metrics)
                if is_writer:
                    print(f"compiled the step for level {level.index} (length {level.seq_len}, "
                          f"batch {level.batch_size}, {layout_name(run.mesh)}) in "
                          f"{time.time() - compile_start:.1f}s (incl. its first step)", flush=True)
                last_log_time = time.time()
            else:
                state, metrics = compiled[level.index](state, batch, jnp.float32(learning_rate))
        step += 1
        tokens += level.seq_len * level.batch_size
        pending = metrics
        if step % config.train.log_every_steps == 0 or step == total_steps:
            values = jax.device_get(pending)
            now = time.time()
            step_time = (now - last_log_time) / max(1, step - last_log_step)
            last_log_time, last_log_step = now, step
            record = {"tokens": tokens, "loss": float(values["loss"]), "lr": learning_rate,
                      "grad_norm": float(values["grad_norm"]), "seq_len": level.seq_len,
                      "batch_size": level.batch_size, "level": level.index,
                      "layout": layout_name(run.mesh),
                      "tokens_per_sec": level.seq_len * level.batch_size / step_time,
                      "step_time_s": step_time}
            final_loss = record["loss"]
            writer.write(step, record)
            progress.show(step, record["loss"], learning_rate, record["tokens_per_sec"],
                          step_time, extra=f"L={level.seq_len}" if len(plan.levels) > 1 else "")
        if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total_steps:
            eval_params = jax.device_put(state["params"], eval_run.state_shardings["params"])
            outcome = evaluate_lib.evaluate(eval_run, eval_params, quick_eval, step=step)
            writer.write(step, evaluate_lib.scalars(outcome), prefix="eval/")
            _print_eval(outcome, is_writer)
        preempted = checkpointer.reached_preemption(step)
        stopping = preempted or step == config.train.stop_at_step
        if step % config.checkpoint.every_steps == 0 or step == total_steps or stopping:
            checkpointer.save(step, state, levels.iterators, meta_now())
        if stopping and step < total_steps:
            log.warning("%s: saved step %d and stopping", "preemption signal" if preempted
                        else "train.stop_at_step", step)
            checkpointer.close()
            writer.close()
            return {"step": step, "tokens": tokens, "stopped": True}

    eval_params = jax.device_put(state["params"], eval_run.state_shardings["params"])
    outcome = evaluate_lib.evaluate(eval_run, eval_params, final_eval, step=step,
                                    name=config.eval.name)
    writer.write(step, evaluate_lib.scalars(outcome), prefix="eval/")
    evaluate_lib.write_results(outcome, evaluate_lib.eval_directory(workdir, config.eval.name),
                               is_writer)
    _print_eval(outcome, is_writer)
    checkpointer.close()
    writer.close()
    return {"step": step, "tokens": tokens, "final_loss": final_loss,
            "eval": outcome["perplexity_by_length"], "retrieval": outcome["retrieval"]}


def abstract_state(run: Run):
    """Shapes, dtypes and shardings of the train state, without allocating it."""
    attention_fn = attention_override(run.model_config, run.mesh)

    def create():
        model = Transformer(run.model_config, rngs=nnx.Rngs(0), attention_fn=attention_fn)
        params = nnx.state(model, nnx.Param)
        return {"params": params, "opt_state": run.optimizer.init(params)}

    with mesh_lib.use_mesh(run.mesh):
        shapes = jax.eval_shape(create)
    return jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes, run.state_shardings)


def restore_newest(workdir: str, run: Run, what: str):
    """(state, meta) of the newest checkpoint in `workdir`, in `run`'s shardings."""
    checkpointer = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=1, async_save=False, data_names=())
    latest = checkpointer.latest_step()
    if latest is None:
        raise ValueError(f"{what}: no checkpoint in {checkpointer.directory}")
    _check_same_model(checkpointer.restore_meta(latest), run, workdir)
    state, meta = checkpointer.restore(latest, abstract_state(run))
    checkpointer.close()
    return state, meta


def load_params(workdir: str, run: Run):
    """The parameters of the newest checkpoint in `workdir`, in `run`'s shardings."""
    return restore_newest(workdir, run, "train.init_from")[0]["params"]


def count_parameters_in(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _print_eval(outcome: dict, is_writer: bool) -> None:
    if not is_writer:
        return
    print(evaluate_lib.format_table(outcome["perplexity_by_length"]), flush=True)
    for task, grid in ((outcome.get("retrieval") or {}).get("tasks") or {}).items():
        accuracy = ", ".join(f"{L}: {a:.2f}" for L, a in zip(grid["lengths"], grid["length_accuracy"]))
        print(f"retrieval {task}: accuracy by length {accuracy}; k_max {grid['k_max']}", flush=True)


def eval_batches(config, run: Run):
    """evaluate.build_eval_data for `run` (the eval level's). With eval.lengths unset, the
    longest default length is probed against the memory of run's mesh (compiling the scoring
    step at doubling lengths; evaluate.default_top_length) and printed with why it stopped."""
    documents = evaluate_lib.validation_documents(config, run.tokenizer)
    top = None
    if not config.eval.lengths:
        e = config.eval
        budget, source = evaluate_lib.memory_budget_bytes(list(run.mesh.devices.flat),
                                                          e.memory_budget_mib)
        fits = evaluate_lib.memory_fits(run, abstract_state(run)["params"], e.batch_size, budget)
        found = evaluate_lib.default_top_length(
            config.curriculum.l_max, [len(d) for d in documents], rows=e.batch_size,
            max_length=e.max_length, fits=fits)
        top = found.length
        if jax.process_count() > 1:   # host memory may differ: every process takes process 0's
            from jax.experimental import multihost_utils
            top = int(multihost_utils.broadcast_one_to_all(np.int64(top)))
        if jax.process_index() == 0:
            print(f"eval lengths up to {top} ({found.reason}; memory budget "
                  f"{budget / 2**20:.0f} MiB per device from {source})", flush=True)
    return evaluate_lib.build_eval_data(config, run.model_config, run.tokenizer,
                                        top_length=top, documents=documents)


def evaluate_workdir(config, workdir: str) -> dict:
    """--mode eval: score the newest checkpoint of workdir; write workdir/eval[/<name>]/."""
    plan = validate_config(config)
    run = build_run(config, level=eval_level(config, plan))
    data = eval_batches(config, run)
    state, meta = restore_newest(workdir, run, "--mode eval (train first)")
    step = int(meta["step"])
    outcome = evaluate_lib.evaluate(run, state["params"], data, step=step, name=config.eval.name)
    is_writer = jax.process_index() == 0
    evaluate_lib.write_results(outcome, evaluate_lib.eval_directory(workdir, config.eval.name),
                               is_writer)
    writer = MetricsWriter(workdir)
    prefix = f"eval/{config.eval.name}/" if config.eval.name else "eval/"
    writer.write(step, evaluate_lib.scalars(outcome), prefix=prefix)
    writer.close()
    _print_eval(outcome, is_writer)
    return dict(outcome["perplexity_by_length"], retrieval=outcome["retrieval"])


__all__ = ["train", "evaluate_workdir", "validate_config", "build_run", "init_state",
           "make_train_step", "format_duration", "count_parameters"]
