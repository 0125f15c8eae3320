"""Per-device attention kernels on one GPU or TPU chip: the blockwise kernel against the
platform's fused kernels. On a GPU: cuDNN's flash attention
(`jax.nn.dot_product_attention(implementation="cudnn")`) and our Pallas kernel
(model/pallas_attention.py, Triton); on a TPU: our Pallas kernel for Mosaic
(model/pallas_tpu_attention.py).

Table 1: causal attention fwd+bwd at each length, bf16, batch 1, Llama-3-8B's heads (32
query / 8 KV heads of 128): median seconds and TFLOP/s, counting FlashAttention-2's
convention (Dao 2023): forward 4 T^2 H d / 2 for a causal mask, backward 2.5 x forward.
Table 2: a ~1B Llama-shaped train step (d_model 2048, 16 layers, 32 / 8 heads of 64, MLP
5632, vocab 32000, full remat) at 32k tokens with each kernel: tokens/s and MFU against
the device's dense bf16 peak (benchmarks/throughput.py's table). Its rows are one document
each (what the fused kernel needs; packed rows run the blockwise kernel).

    python -m benchmarks.gpu_attention [--lengths 8192,32768,131072] [--repeats 5]
    python -m benchmarks.gpu_attention --smoke        # tiny shapes, any platform (tests)

bash benchmarks/gpu_attention.sh and bash benchmarks/tpu_attention.sh install and run it on
a GPU and a TPU host. Only a GPU or TPU gives figures worth quoting; `--smoke` runs the
same code on small shapes with XLA's implementation of the fused call, to check the
script itself.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.throughput import known_peak
from util.tables import format_table
from parallel.ring_attention import interpret_kernels
from parallel.sequence_parallel import local_attention
from util.errors import first_line
from configs.sections import settings as settings_of

HEADS = (32, 8, 128)                  # Llama-3-8B: query heads, KV heads, head_dim
BLOCK = 512
# the per-device kernels timed on each platform (the CPU: --smoke, to check the script)
KERNELS = {"gpu": ("blockwise", "cudnn", "pallas"), "tpu": ("blockwise", "pallas_tpu"),
           "cpu": ("blockwise", "cudnn", "pallas")}
# the config value that resolves to each (model.attention_kernel)
SETTING = {"blockwise": "blockwise", "cudnn": "cudnn", "pallas": "pallas",
           "pallas_tpu": "pallas"}


def attention_flops(length: int, q_heads: int, head_dim: int) -> float:
    """FlashAttention-2's count for causal fwd+bwd: 3.5 x 4 T^2 H d / 2."""
    return 3.5 * 4 * length ** 2 * q_heads * head_dim / 2


def median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))                       # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def kernel_rows(lengths, heads, repeats, implementation):
    hq, hkv, d = heads
    rows = []
    for length in lengths:
        rng = np.random.default_rng(length)
        q, k, v = (jnp.asarray(rng.standard_normal((1, length, h, d)), jnp.bfloat16)
                   for h in (hq, hkv, hkv))
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        segments = jnp.zeros((1, length), jnp.int32)
        for kernel in KERNELS[jax.devices()[0].platform]:
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("seq",))
            attend = local_attention(kernel, causal=True, static_window=None,
                                     block_q=128 if kernel == "pallas" else BLOCK,
                                     block_k=128 if kernel == "pallas" else BLOCK,
                                     implementation=implementation,
                                     interpret=interpret_kernels(mesh, kernel))
            grad = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, positions, segments, None)
                                    .astype(jnp.float32).sum(), argnums=(0, 1, 2)))
            try:
                seconds = median_seconds(grad, (q, k, v), repeats)
                rows.append([length, kernel, f"{seconds * 1e3:.1f}",
                             f"{attention_flops(length, hq, d) / seconds / 1e12:.1f}"])
            except Exception as error:  # noqa: BLE001 - e.g. a shape cuDNN refuses
                rows.append([length, kernel, "-", f"failed: {first_line(str(error), 80)}"])
    return rows


def train_step_rows(length, repeats, kernels, smoke):
    from configs import base
    from model.flops import training_flops_per_step
    from parallel import mesh as mesh_lib
    from train.state import build_run, init_state
    from train.step import make_train_step, put_batch

    rows = []
    for kernel in kernels:
        config = base.get_config()
        m = config.model
        m.vocab_size, m.d_model, m.n_layers, m.mlp_dim = 32000, 2048, 16, 5632
        m.q_heads, m.kv_heads, m.head_dim = 32, 8, 64
        m.remat, m.attention, m.attention_kernel = "full", "blockwise", SETTING[kernel]
        m.block_q = m.block_k = 128 if kernel == "pallas" else BLOCK
        m.loss_chunk_tokens = 4096
        if smoke:
            m.vocab_size, m.d_model, m.n_layers, m.mlp_dim = 256, 64, 2, 128
            m.q_heads, m.kv_heads, m.head_dim = 4, 2, 16
            m.block_q = m.block_k = 64
        config.curriculum.l_max = length
        config.train.batch_size = 1
        config.mesh.data = 1
        run = build_run(settings_of(config), devices=jax.devices()[:1], rows_in_order=True)
        state = init_state(run, seed=0)
        tokens = np.random.default_rng(0).integers(0, m.vocab_size, (1, length + 1))
        host = {"tokens": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32),
                "positions": np.arange(length, dtype=np.int32)[None],
                "segment_ids": np.zeros((1, length), np.int32),
                "loss_mask": np.ones((1, length), np.float32)}
        batch = put_batch(host, run.mesh, 1, run.layout, run.layout_parts)
        step = make_train_step(run, 1, length)
        with mesh_lib.use_mesh(run.mesh):
            state, metrics = step(state, batch, jnp.float32(1e-4))    # compile
            jax.block_until_ready(metrics)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                state, metrics = step(state, batch, jnp.float32(1e-4))
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        flops = training_flops_per_step(run.model_config, length, 1)
        peak = known_peak(jax.devices()[0])
        rows.append([kernel, f"{seconds:.3f}", f"{length / seconds:,.0f}",
                     f"{flops / seconds / 1e12:.1f}",
                     f"{flops / seconds / peak:.1%}" if peak else "no known peak"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_attention",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")],
                        default=[8192, 32768, 131072])
    parser.add_argument("--train_length", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes and XLA's fused implementation: checks the script")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    heads = (4, 2, 16) if args.smoke else HEADS
    lengths = [256, 512] if args.smoke else args.lengths
    implementation = "xla" if args.smoke else "cudnn"
    print(f"device: {device.device_kind} ({device.platform}); fused implementation: "
          f"{implementation}")
    print(f"causal attention fwd+bwd, bf16, batch 1, {heads[0]} query / {heads[1]} KV heads "
          f"x {heads[2]}, block {BLOCK}, median of {args.repeats}:")
    print(format_table(["length", "kernel", "ms", "TFLOP/s"],
                       kernel_rows(lengths, heads, args.repeats, implementation)))
    kernels = ("blockwise",) if args.smoke else KERNELS[device.platform]
    length = 512 if args.smoke else args.train_length
    print(f"train step of a ~1B Llama-shaped model at {length} tokens (one document), "
          f"median of {args.repeats}:")
    print(format_table(["kernel", "step s", "tokens/s", "model TFLOP/s", "MFU"],
                       train_step_rows(length, args.repeats, kernels, args.smoke)))


if __name__ == "__main__":
    main()
