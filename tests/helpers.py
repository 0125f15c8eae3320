"""Shared test helpers: a small config that compiles and trains in seconds."""
import json
import os

from configs import tiny


def small_config(**overrides):
    """configs/tiny.py shrunk for tests; overrides are 'section.key' -> value."""
    config = tiny.get_config()
    config.model.d_model = 64
    config.model.n_layers = 2
    config.model.q_heads = 4
    config.model.kv_heads = 2
    config.model.head_dim = 16
    config.model.mlp_dim = 128
    config.model.block_q = 16
    config.model.block_k = 16
    config.curriculum.l_max = 64
    config.train.steps = 8
    config.train.batch_size = 8
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    config.eval.batch_size = 8
    config.eval.max_batches = 2
    config.eval.lengths = (64,)
    config.eval.sliding_max_windows = 8
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    """{step: loss} of the training records in metrics.jsonl (eval records excluded)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
