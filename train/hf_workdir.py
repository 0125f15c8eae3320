"""Hugging Face checkpoints <-> workdirs: `--mode import` and `--mode export`.

import: HF directory -> W/config.json (configs/base.py with the model section and
curriculum.l_max of the checkpoint, its tokenizer.json copied to W) + an Orbax checkpoint at
step 0 (the weights in the run's shardings, a fresh optimizer state), so W evaluates with
`--mode eval --workdir W` and starts other runs with `--config.train.init_from=W`.
export: W's newest checkpoint -> a directory transformers loads (model/hf.save_model).
"""
from __future__ import annotations

import os
import shutil
import tempfile

import jax
from flax import nnx

from configs import base
from data.tokenizers import write_byte_tokenizer_json
from model import hf
from parallel import mesh as mesh_lib
from train import checkpoint as checkpoint_lib
from train import workdir_config
from train.state import build_run, checkpoint_meta, restore_newest
from train.validate import validate_config

HF_ARCHITECTURE = "hf_architecture"   # checkpoint metadata: the architecture imported from


def config_for(model_config, tokenizer: str):
    """configs/base.py's config with the model section of `model_config` (a ModelConfig)."""
    config = base.get_config()
    m = config.model
    for key in ("vocab_size", "d_model", "n_layers", "q_heads", "kv_heads", "head_dim",
                "mlp_dim", "position", "tie_embeddings", "norm_eps", "norm", "mlp", "qkv_bias",
                "attention_out_bias", "mlp_bias", "sliding_window"):
        m[key] = getattr(model_config, key)
    m.layer_types = model_config.layer_types
    m.rope.theta = float(model_config.rope_theta)
    m.rope.scaling = model_config.rope_scaling
    config.curriculum.l_max = model_config.l_max
    config.data.tokenizer = tokenizer
    return config


def import_workdir(hf_dir: str, workdir: str) -> str:
    """Write `workdir` from the Hugging Face checkpoint in `hf_dir`; returns the summary
    line. Refuses a workdir that already holds checkpoints."""
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} already holds checkpoints; import into a new --workdir")
    model_config, architecture = hf.load_config(hf_dir)
    tokenizer = "bytes"
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        tokenizer = os.path.abspath(os.path.join(workdir, "tokenizer.json"))
    config = config_for(model_config, tokenizer)
    config.generate.eos_ids = hf.eos_token_ids(hf_dir)
    if tokenizer != "bytes" and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        # the files beside tokenizer.json travel with it (export copies them back out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(workdir, name))
    validate_config(config)
    run = build_run(config)
    model = hf.load_model(hf_dir, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                          mesh=run.mesh, axis_rules=mesh_lib.LOGICAL_RULES)
    params = nnx.state(model, nnx.Param)
    with mesh_lib.use_mesh(run.mesh):
        opt_state = jax.jit(run.optimizer.init,
                            out_shardings=run.state_shardings["opt_state"])(params)
    meta = checkpoint_meta(run, config, 0, 0, **{HF_ARCHITECTURE: architecture})
    checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                               max_to_keep=1, async_save=False)
    try:
        checkpointer.save(0, {"params": params, "opt_state": opt_state}, None, meta)
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        workdir_config.write(config, workdir)
    count = sum(x.size for x in jax.tree.leaves(params))
    return (f"imported {architecture} ({count / 1e6:.2f}M parameters, l_max "
            f"{model_config.l_max}, tokenizer {tokenizer}) into {workdir}")


def export_workdir(workdir: str, out_dir: str) -> str:
    """Write the newest checkpoint of `workdir` as a Hugging Face directory `out_dir`;
    returns the summary line."""
    config = workdir_config.load(workdir)
    validate_config(config)
    run = build_run(config)
    state, meta = restore_newest(workdir, run, "--mode export")
    model = nnx.merge(run.graphdef, state["params"])
    tokenizer = config.data.tokenizer
    with tempfile.TemporaryDirectory() as scratch:
        if tokenizer == "bytes":
            tokenizer = write_byte_tokenizer_json(os.path.join(scratch, "tokenizer.json"))
        elif not tokenizer.endswith(".json"):
            raise ValueError(f"--mode export: data.tokenizer {tokenizer!r} is not a Hugging "
                             f"Face tokenizer.json or 'bytes'; only those are exported")
        hf.save_model(model, out_dir, tokenizer_path=tokenizer,
                      architecture=meta.get(HF_ARCHITECTURE),
                      eos_token_ids=config.generate.eos_ids)
    return f"exported step {meta['step']} of {workdir} to {out_dir}"
