"""`--mode generate`: restore a workdir's newest checkpoint and continue a prompt.

The run's config comes from the workdir's config.json (read onto configs/base.py, so keys
the run predates keep their defaults) with the command line's --config.KEY overrides on top;
an explicit --config file replaces config.json. Generation runs in one process, on one
device or, with generate.seq = N > 1, on N devices with the prompt prefilled by ring
attention and the KV cache split over them (the checkpoint is restored into that mesh,
whatever mesh it was trained on; the weights are replicated over it), with the RoPE
settings evaluation uses (the last curriculum level's, then eval.rope_scaling /
eval.rope_theta). It stops at generate.eos_ids (set by --mode import from the checkpoint's
generation_config.json or config.json).
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import nnx

from configs import sections
from evaluation.generate import generate
from parallel import mesh as mesh_lib
from parallel import model_on_mesh
from train import curriculum as curriculum_lib
from train.state import build_run
from train.checkpoint import restore_newest
from train.validate import check_generation_memory


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
    if g.seq < 1:
        raise ValueError(f"generate.seq must be >= 1, got {g.seq}")


def generate_workdir(config, workdir: str) -> dict:
    """Continue generate.prompt with the newest checkpoint of `workdir`; print the new
    text; with generate.output write {"prompt_ids", "output_ids" (the new tokens only),
    "text" (their decoding)} there. Returns that dict."""
    settings = sections.settings(config)
    generate_settings = settings.generate
    check_generate_config(generate_settings)
    if jax.process_count() > 1:
        raise ValueError("--mode generate runs in a single process")
    if generate_settings.seq > len(jax.local_devices()):
        raise ValueError(f"generate.seq = {generate_settings.seq} but this process has "
                         f"{len(jax.local_devices())} devices")
    on_mesh = sections.replace(settings, {f"mesh.{axis}": 1
                                          for axis in ("data", "fsdp", "seq", "tensor")})
    # the RoPE settings of the last level (a plan on one device: the mesh plays no part)
    curriculum = curriculum_lib.make_curriculum(on_mesh, 1)
    level = curriculum_lib.eval_level(on_mesh, curriculum)
    on_mesh = sections.replace(on_mesh, {"mesh.seq": int(generate_settings.seq)})
    run = build_run(on_mesh, devices=jax.local_devices()[:generate_settings.seq])
    state, _ = restore_newest(workdir, run, "--mode generate (train first)")
    # generate() puts ring attention over the mesh itself when seq > 1; on one device the
    # cache's own attention serves every step
    model_config = model_on_mesh.decoding_config(dataclasses.replace(
        run.model_config, rope_theta=level.rope_theta, rope_scaling_json=level.rope_scaling_json))
    # weights whole on every device (split over `tensor` only): no gather per decoding step
    params = jax.device_put(state["params"],
                            mesh_lib.compute_shardings(run.state_shardings["params"]))
    prompt_ids = np.asarray(run.tokenizer.encode(generate_settings.prompt), np.int32)
    if prompt_ids.size == 0:
        raise ValueError("generate.prompt encodes to no tokens")
    check_generation_memory(settings, prompt_ids.size + int(generate_settings.max_new_tokens),
                            jax.devices()[0].platform)
    notice = curriculum_lib.beyond_trained_notice(
        on_mesh, curriculum, level,
        [prompt_ids.size + int(generate_settings.max_new_tokens)], "prompt + new tokens reach")
    if notice:
        print(notice, flush=True)
    graphdef, _, _ = model_on_mesh.abstract_model(model_config, run.mesh)
    with mesh_lib.use_mesh(run.mesh):
        model = nnx.merge(graphdef, params)
        output_ids = generate(model, prompt_ids, int(generate_settings.max_new_tokens),
                              temperature=float(generate_settings.temperature),
                              top_p=float(generate_settings.top_p),
                              seed=int(generate_settings.seed),
                              eos_id=tuple(generate_settings.eos_ids) or None,
                              mesh=run.mesh)
    result = {"prompt_ids": prompt_ids.tolist(), "output_ids": output_ids.tolist(),
              "text": run.tokenizer.decode(output_ids)}
    print(result["text"], flush=True)
    if generate_settings.output:
        directory = os.path.dirname(os.path.abspath(generate_settings.output))
        os.makedirs(directory, exist_ok=True)
        with open(generate_settings.output, "w") as f:
            json.dump(result, f, indent=1)
    return result
