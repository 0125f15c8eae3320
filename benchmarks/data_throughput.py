"""Tokens per second of the training stream, per source, next to what training consumes.

    python -m benchmarks.data_throughput [--seconds 5] [--length 256] [--rows 16]

For the embedded corpus (stdlib, byte tokenizer) read on the fly and prepared (--mode
prepare into a temporary directory first), on one core (the process is pinned to CPU 0):
the stream's start-up time (reading / memory-mapping the corpus and planning) and the
tokens per second of next_batch at configs/tiny.py's training shape (16 x 256); then
configs/tiny.py's train step on one device (the same process, unpinned), in tokens per
second; and the distinct documents the first 100 steps at length 64 draw from.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def stream_rate(stream, length: int, rows: int, seconds: float) -> float:
    """Tokens per second of stream.next_batch over about `seconds` (after one batch)."""
    stream.next_batch(0, length, rows)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        stream.next_batch(0, length, rows)
        done += rows * length
    return done / (time.perf_counter() - start)


def distinct_documents(stream, length: int, rows: int, steps: int) -> int:
    taken = []
    for _ in range(steps):
        taken += stream.next_rows(0, length, rows)
    return len(stream.documents_of(taken))


def train_step_rate(steps: int = 8) -> float:
    """Tokens per second configs/tiny.py's train step consumes on one device."""
    import jax
    import jax.numpy as jnp

    from benchmarks.layers_and_memory import compiled_step
    from configs import tiny
    config = tiny.get_config()
    config.mesh.data = 1
    rows, length = config.train.batch_size, config.curriculum.l_max
    step, _, (state, batch) = compiled_step(config, length, True, rows)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        state, metrics = step(state, batch, jnp.float32(1e-3))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return rows * length / float(np.median(times[1:]))


def main(argv=None):
    from configs import tiny
    from data.pipeline import make_train_stream
    from data.tokenizers import make_tokenizer
    from util.tables import format_table
    from cli.prepare_mode import prepare_workdir

    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args(argv)
    tokenizer = make_tokenizer("bytes")
    config = tiny.get_config()
    prepared_dir = tempfile.mkdtemp(prefix="boundless_data_throughput_")
    config.data.prepare_dir = prepared_dir
    start = time.perf_counter()
    prepare_workdir(config)
    prepare_seconds = time.perf_counter() - start
    prepared = config.data.copy_and_resolve_references()
    prepared.source, prepared.path = "prepared", prepared_dir

    os.sched_setaffinity(0, {0})                   # one core for the stream
    rows = []
    for name, data_config in (("stdlib on the fly", config.data), ("stdlib prepared", prepared)):
        start = time.perf_counter()
        stream = make_train_stream(data_config, tokenizer, lengths=[args.length], seed=0)
        startup = time.perf_counter() - start
        rate = stream_rate(stream, args.length, args.rows, args.seconds)
        distinct = distinct_documents(make_train_stream(data_config, tokenizer, lengths=[64],
                                                        seed=0), 64, args.rows, 100)
        rows.append([name, f"{startup:.2f}", f"{rate:,.0f}", distinct])
        print(f"  {name}: done", flush=True)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    consumed = train_step_rate()
    for row in rows:
        row.append(f"{float(row[2].replace(',', '')) / consumed:.0f}x")
    print(f"prepare of the stdlib corpus: {prepare_seconds:.1f} s (into {prepared_dir})")
    print(f"stream on one core, batches of {args.rows} x {args.length}; configs/tiny.py's train "
          f"step consumes {consumed:,.0f} tokens/s on one CPU device")
    print(format_table(["source", "start-up s", "tokens/s", "distinct documents in 100 steps "
                        f"of {args.rows} x 64", "x training"], rows))


if __name__ == "__main__":
    main()
