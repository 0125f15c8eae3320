"""Training throughput and model FLOPs utilisation of a config on the devices present.

    python -m benchmarks.throughput --config configs/tiny.py [--steps 10] [--warmup 2]
        [--set model.remat=full --set curriculum.l_max=4096 ...] [--peak auto|measure|TFLOPS]

Builds the config's first curriculum level on every device (its mesh, batch, length),
runs --warmup + --steps train steps on random tokens and reports the median step time,
tokens/s and MFU = model FLOPs per step (model/flops.py: 6 N + causal attention) / step
time / (devices x peak FLOP/s). The peak per device is, with --peak auto, the dense bf16
peak of a known accelerator (table below; the device kind names it), else measured: the
median FLOP/s of a large matmul in the model's compute dtype on one device (--peak
measure forces that; a number sets it in TFLOP/s). On a CPU that makes "MFU" the ratio to
the measured matmul rate. Runs unchanged on a GPU or TPU host.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from configs.sections import settings as settings_of

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
KNOWN_PEAKS = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def known_peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, peak in KNOWN_PEAKS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def measured_peak(dtype, size: int = 4096, repeats: int = 5) -> float:
    """Median FLOP/s of a [size, size] x [size, size] matmul on the first device."""
    a = jax.device_put(jnp.ones((size, size), dtype), jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times)


def load_config(path: str, settings: list[str]):
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for setting in settings:
        key, value = setting.split("=", 1)
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        current = node[name]
        node[name] = (value.lower() == "true") if isinstance(current, bool) else \
            type(current)(value) if current is not None else value
    return config


def main(argv=None):
    from util.tables import format_table
    from model.flops import training_flops_per_step
    from parallel import mesh as mesh_lib
    from train.state import build_run, init_state
    from train.step import make_train_step, put_batch
    from train.validate import validate_config

    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak", default="auto")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.set)
    level = validate_config(settings_of(config)).levels[0]
    run = build_run(settings_of(config), level=level)
    state = init_state(run, 0)
    rows, length = level.batch_size, level.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, run.model_config.vocab_size, (rows, length + 1)).astype(np.int32)
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)),
            "segment_ids": np.zeros((rows, length), np.int32),
            "loss_mask": np.ones((rows, length), np.float32)}
    _, _, local_rows, offset = mesh_lib.data_shard(run.mesh, rows)   # this process's
    batch = put_batch({k: v[offset:offset + local_rows] for k, v in host.items()}, run.mesh,
                      rows, run.layout, run.layout_parts)
    step = make_train_step(run, int(config.train.grad_accum_steps), length)
    times = []
    with mesh_lib.use_mesh(run.mesh):
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, jnp.float32(1e-4))
            jax.block_until_ready(metrics["loss"])
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    devices = jax.devices()
    if args.peak not in ("auto", "measure"):
        peak, source = float(args.peak) * 1e12, "given"
    else:
        peak = known_peak(devices[0]) if args.peak == "auto" else None
        source = f"{devices[0].device_kind} data sheet (bf16 dense)"
        if peak is None:
            peak = measured_peak(jnp.dtype(run.model_config.dtype))
            source = f"measured {run.model_config.dtype} matmul on {devices[0].device_kind}"
    flops = training_flops_per_step(run.model_config, length, rows)
    mfu = flops / step_time / (len(devices) * peak)
    print(f"{args.config} {' '.join(args.set)}: {len(devices)} x {devices[0].device_kind}, "
          f"mesh {level.mesh_dict}, batch {rows} x {length}, {args.steps} steps (median)")
    print(format_table(
        ["step s", "tokens/s", "model TFLOP/step", "achieved TFLOP/s", "peak TFLOP/s per device",
         "MFU"],
        [[f"{step_time:.3f}", f"{rows * length / step_time:,.0f}", f"{flops / 1e12:.3g}",
          f"{flops / step_time / 1e12:.3g}", f"{peak / 1e12:.3g}", f"{mfu:.1%}"]]))
    print(f"peak: {source}; final loss {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
