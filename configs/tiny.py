"""A small byte-level model that learns the embedded corpus in minutes on a 2-core CPU.

Any curriculum.l_max runs on any mesh; 256 is a whole number of the kernel's blocks and of
the zigzag chunks of 8 devices, so nothing is padded.
"""
from configs import base


def get_config():
    config = base.get_config()
    config.model.d_model = 256
    config.model.n_layers = 4
    config.model.q_heads = 8
    config.model.kv_heads = 4
    config.model.head_dim = 32
    config.model.mlp_dim = 704
    config.model.dtype = "float32"   # CPUs have no fast bf16 matmul
    config.model.block_q = 128
    config.model.block_k = 128
    # 4 layers: a Python loop over them is 4% faster and takes 20% less temp memory than
    # the scan (benchmarks/layers_and_memory.py), whose compile time only pays off deeper
    config.model.scan_layers = False
    config.curriculum.l_max = 256
    config.train.steps = 600
    config.train.batch_size = 16
    config.train.learning_rate = 2e-3
    config.train.warmup_fraction = 0.03
    config.train.log_every_steps = 20
    config.checkpoint.every_steps = 200
    config.eval.batch_size = 8
    config.eval.max_batches = 16
    # default lengths 128 .. 2048 = 8 l_max: the memory probe would go further on a CPU
    # host (tens of GiB), but each doubling doubles the evaluation time
    config.eval.max_length = 2048
    return config
