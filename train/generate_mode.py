"""`--mode generate`: restore a workdir's newest checkpoint and continue a prompt.

The run's config comes from the workdir's config.json (read onto configs/base.py, so keys
the run predates keep their defaults) with the command line's --config.KEY overrides on top;
an explicit --config file replaces config.json. Generation runs in one process on one
device (the checkpoint is restored into a one-device mesh, whatever mesh it was trained
on), with the RoPE settings evaluation uses (the last curriculum level's, then
eval.rope_scaling / eval.rope_theta).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from evaluation.generate import generate
from model.transformer import Transformer
from parallel import mesh as mesh_lib
from train import curriculum as curriculum_lib
from train.state import build_run, restore_newest


def check_generate_config(g) -> None:
    """One-line ValueErrors for impossible generate.* values."""
    if not g.prompt:
        raise ValueError("generate.prompt is empty: give --config.generate.prompt='...'")
    if g.max_new_tokens < 1:
        raise ValueError(f"generate.max_new_tokens must be >= 1, got {g.max_new_tokens}")
    if g.temperature < 0:
        raise ValueError(f"generate.temperature must be >= 0, got {g.temperature}")
    if not 0 < g.top_p <= 1:
        raise ValueError(f"generate.top_p must lie in (0, 1], got {g.top_p}")


def generate_workdir(config, workdir: str) -> dict:
    """Continue config.generate.prompt with the newest checkpoint of `workdir`; print the
    new text; with generate.output write {"prompt_ids", "output_ids" (the new tokens only),
    "text" (their decoding)} there. Returns that dict."""
    g = config.generate
    check_generate_config(g)
    if jax.process_count() > 1:
        raise ValueError("--mode generate runs in a single process")
    one_device = config.copy_and_resolve_references()
    for axis in ("data", "fsdp", "seq", "tensor"):
        one_device.mesh[axis] = 1
    level = curriculum_lib.eval_level(one_device, curriculum_lib.make_plan(one_device, 1))
    run = build_run(one_device, devices=jax.local_devices()[:1])
    state, _ = restore_newest(workdir, run, "--mode generate (train first)")
    model_config = dataclasses.replace(
        run.model_config, rope_theta=level.rope_theta, rope_scaling_json=level.rope_scaling_json,
        attention="dense" if run.model_config.attention == "ring" else run.model_config.attention,
        remat=False)     # decoding attends over the KV cache, never through attention_fn
    prompt_ids = np.asarray(run.tokenizer.encode(g.prompt), np.int32)
    if prompt_ids.size == 0:
        raise ValueError("generate.prompt encodes to no tokens")
    with mesh_lib.use_mesh(run.mesh):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config,
                                                                   rngs=nnx.Rngs(0))), nnx.Param)
        model = nnx.merge(graphdef, state["params"])
        output_ids = generate(model, prompt_ids, int(g.max_new_tokens),
                              temperature=float(g.temperature), top_p=float(g.top_p),
                              seed=int(g.seed))
    result = {"prompt_ids": prompt_ids.tolist(), "output_ids": output_ids.tolist(),
              "text": run.tokenizer.decode(output_ids)}
    print(result["text"], flush=True)
    if g.output:
        directory = os.path.dirname(os.path.abspath(g.output))
        os.makedirs(directory, exist_ok=True)
        with open(g.output, "w") as f:
            json.dump(result, f, indent=1)
    return result
