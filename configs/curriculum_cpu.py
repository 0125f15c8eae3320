r"""The length curriculum on 8 simulated CPU devices, in minutes on 2 cores.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python main.py --config configs/curriculum_cpu.py

4 levels: 64 tokens x 32 rows (data 8) -> 128 x 16 (data 4 x seq 2) -> 256 x 8 (data 2 x
seq 4) -> 512 x 4 (seq 8): 50% / 25% / 12.5% / 12.5% of the steps, the same 2048 tokens
per step and the same 256 tokens per device at every level. Then perplexity by length.
"""
from configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.attention = "ring"
    config.model.block_q = 64
    config.model.block_k = 64
    config.mesh.data = -1
    config.curriculum.l_max = 64
    config.curriculum.levels = 4
    config.train.batch_size = 32
    config.train.steps = 400
    config.train.log_every_steps = 20
    config.checkpoint.every_steps = 100
    config.eval.batch_size = 8
    config.eval.max_batches = 4
    config.eval.lengths = (64, 128, 256, 512)
    return config
