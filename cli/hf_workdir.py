"""Hugging Face checkpoints <-> workdirs: `--mode import` and `--mode export`.

import: HF directory -> W/config.json (configs/base.py with the model section and
curriculum.l_max of the checkpoint, its tokenizer.json copied to W) + an Orbax checkpoint at
step 0 (the weights in the run's shardings, a fresh optimizer state), so W evaluates with
`--mode eval --workdir W` and starts other runs with `--config.train.init_from=W`.
export: W's newest checkpoint -> a directory transformers loads (model/hf.save_model);
a non-empty directory only with overwrite=True, replaced whole (export_workdir).
Import keeps what the weights alone do not say: the compute dtype (model.dtype) and the
bos/eos/pad ids (generate.bos_id / eos_ids / pad_id), which export writes back.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import jax
from flax import nnx

from configs import base, workdir_config
from data.tokenizers import write_byte_tokenizer_json
from model import hf
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from train import checkpoint as checkpoint_lib
from train.checkpoint import checkpoint_meta, restore_newest
from train.state import build_run
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
    # what the checkpoint computes in, not configs/base.py's bfloat16: generation and
    # evaluation of a float32 checkpoint give transformers' tokens
    dtype, dtype_origin = hf.compute_dtype(hf_dir)
    config.model.dtype = dtype
    ids = hf.special_token_ids(hf_dir)
    config.generate.eos_ids = ids["eos"]
    config.generate.bos_id, config.generate.pad_id = ids["bos"], ids["pad"]
    if tokenizer != "bytes" and jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        # the files beside tokenizer.json travel with it (export copies them back out)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copy(os.path.join(hf_dir, name), os.path.join(workdir, name))
    validate_config(config)
    run = build_run(config)
    # the run's model placed on its mesh: each process reads the slices its devices hold
    _, abstract_params, shardings = model_on_mesh.abstract_model(run.model_config, run.mesh,
                                                                 run.attention_fn)
    params = hf.load_params(hf_dir, abstract_params, shardings)
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
            f"{model_config.l_max}, tokenizer {tokenizer}) into {workdir}; compute dtype "
            f"{dtype} ({dtype_origin})")


def export_workdir(workdir: str, out_dir: str, overwrite: bool = False) -> str:
    """Write the newest checkpoint of `workdir` as a Hugging Face directory `out_dir`;
    returns the summary line.

    A missing or empty `out_dir` is written in place. A non-empty one is refused unless
    `overwrite`; then the export is written into a fresh sibling `<out_dir>.tmp-<pid>` and
    swapped in (the old directory renamed to `<out_dir>.old-<pid>`, the new one renamed
    to `out_dir`, the old one deleted): no file of the old directory survives, and a crash
    leaves the old or the new directory whole."""
    replace = _check_export_target(workdir, out_dir, overwrite)
    config = workdir_config.load(workdir)
    validate_config(config)
    run = build_run(config)
    state, meta = restore_newest(workdir, run, "--mode export")
    model = nnx.merge(run.graphdef, state["params"])
    tokenizer = config.data.tokenizer
    target = os.path.realpath(out_dir)     # a symlink's directory is the one replaced
    writer = jax.process_index() == 0
    staging = f"{target}.tmp-{os.getpid()}" if replace else target
    if replace and writer and os.path.lexists(staging):
        shutil.rmtree(staging)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            if tokenizer == "bytes":
                tokenizer = write_byte_tokenizer_json(os.path.join(scratch, "tokenizer.json"))
            elif not tokenizer.endswith(".json"):
                raise ValueError(f"--mode export: data.tokenizer {tokenizer!r} is not a Hugging "
                                 f"Face tokenizer.json or 'bytes'; only those are exported")
            hf.save_model(model, staging, tokenizer_path=tokenizer,
                          architecture=meta.get(HF_ARCHITECTURE),
                          eos_token_ids=config.generate.eos_ids,
                          bos_token_id=config.generate.bos_id,
                          pad_token_id=config.generate.pad_id)
    except BaseException:
        if replace and writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if replace and writer:
        old = f"{target}.old-{os.getpid()}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old)
    return (f"exported step {meta['step']} of {workdir} to {out_dir}"
            + (" (its previous contents replaced)" if replace else ""))


def _check_export_target(workdir: str, out_dir: str, overwrite: bool) -> bool:
    """Whether `out_dir` holds files that the export replaces (only with `overwrite`);
    one ValueError line when it may not be written."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--hf_dir {out_dir} exists and is not a directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if not entries:
        return False
    if not overwrite:
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise ValueError(f"--hf_dir {out_dir} is not empty ({count}, e.g. {entries[0]!r}); "
                         "give --overwrite to replace its contents, or another --hf_dir")
    target, source = os.path.realpath(out_dir), os.path.realpath(workdir)
    if os.path.commonpath([target, source]) == target:
        raise ValueError(f"--hf_dir {out_dir} holds the workdir {workdir}: --overwrite would "
                         "delete it; export to another --hf_dir")
    return True
