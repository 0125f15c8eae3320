"""Per-device compiled memory of generation: one device vs the prompt and KV cache split over
`seq` devices (ring-attention prefill, decoding over the split cache).

Compiles `evaluation.generate`'s whole generation function (prefill + decoding loop) for
configs/tiny.py's model (float32) at each prompt length, with abstract parameters and
prompt (`jax.ShapeDtypeStruct`; nothing is allocated), and reads XLA's buffer assignment
(`compile().memory_analysis()`, per device). Prints a markdown table: the KV cache per
device, temp and total memory per device.

    python -m benchmarks.generation_memory [--prompts 4096,16384,65536] [--seqs 1,4,8]
                                           [--new_tokens 64]
"""
from __future__ import annotations

import os
from configs.sections import settings as settings_of

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import MIB, int_list, memory
from configs import tiny
from evaluation import generate as generate_lib
from util.tables import format_table
from model.transformer import ModelConfig, Transformer
from train.state import model_config_from
from parallel import mesh as mesh_lib
from parallel.ring_attention import make_ring_attention
from util.errors import error_line


def generation_memory(cfg: ModelConfig, prompt_len: int, new_tokens: int, seq: int) -> dict:
    """memory() of greedy generation of `new_tokens` after one prompt of `prompt_len`
    tokens: on one device (seq = 1, prefill in pieces of 512) or split over `seq`."""
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, seq=seq, tensor=1), jax.devices()[:seq])
    attention_fn = None
    if seq > 1:
        cfg = dataclasses.replace(cfg, attention="ring")
        attention_fn = make_ring_attention(mesh, block_q=cfg.block_q, block_k=cfg.block_k)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(
            lambda: Transformer(cfg, rngs=nnx.Rngs(0), attention_fn=attention_fn)))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         state)
    prompt = jax.ShapeDtypeStruct((1, prompt_len), jnp.int32, sharding=replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=replicated)
    start = time.time()
    compiled = generate_lib._generate.lower(
        graphdef, state, prompt, scalar, scalar, seed, max_new_tokens=new_tokens, greedy=True,
        nucleus=False, eos_ids=(), prefill_chunk=512, mesh=mesh if seq > 1 else None).compile()
    return memory(compiled, time.time() - start)


def cache_mib(cfg: ModelConfig, prompt_len: int, new_tokens: int, seq: int) -> float:
    """The KV cache's bytes per device: every layer's k and v over all slots / seq."""
    total = prompt_len + new_tokens
    slots = total if seq == 1 else generate_lib.cache_slots_on_mesh(total, seq)
    per_slot = 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    return slots * per_slot / seq / MIB


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int_list, default=[4096, 16384, 65536])
    parser.add_argument("--seqs", type=int_list, default=[1, 4, 8])
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    cfg = model_config_from(settings_of(tiny.get_config()), vocab_size=256)
    rows = []
    for prompt_len in args.prompts:
        for seq in args.seqs:
            try:
                m = generation_memory(cfg, prompt_len, args.new_tokens, seq)
                cells = [f"{m['temp']:.1f}", f"{m['total']:.1f}", f"{m['compile_s']:.1f}"]
            except Exception as error:  # noqa: BLE001 - reported in the table
                cells = [error_line(error, 60), "", ""]
            rows.append([prompt_len, seq, f"{cache_mib(cfg, prompt_len, args.new_tokens, seq):.1f}",
                         *cells])
            print(f"  prompt {prompt_len} seq {seq}: done", flush=True)
    print(f"configs/tiny.py model ({cfg.n_layers} layers, {cfg.kv_heads} kv heads x "
          f"{cfg.head_dim}, float32), one prompt + {args.new_tokens} new tokens, greedy; "
          "MiB per device (compile().memory_analysis())")
    print(format_table(["prompt", "seq devices", "KV cache", "temp", "total", "compile s"], rows))


if __name__ == "__main__":
    main()
