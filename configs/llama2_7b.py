"""Llama-2-7B's architecture (its Hugging Face config.json) for plans and long-context runs.

vocab 32000, d_model 4096, MLP 11008, 32 layers, 32 query = 32 key-value heads of 128, RoPE
theta 10,000, trained at 4096 positions, untied LM head, RMSNorm eps 1e-5. The run settings
are those of the memory table in docs/parallelism.md: bf16 compute over float32 parameters, full
rematerialisation of every layer and of groups of 4 layers (8 of the 32 layer inputs kept
through the forward pass), the MLP in chunks of 16384 tokens and the LM head + loss in
chunks of 4096, ring attention over every device (mesh.seq = -1), one row per step. A plan
at length L:

  python main.py --mode plan --config configs/llama2_7b.py --config.plan.devices=8 \\
      --config.curriculum.l_max=L [--config.plan.memory_budget_gib=80]

Weights come from a Hugging Face checkpoint (`--mode import`, then train.init_from).
"""
from configs import base


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size, m.d_model, m.mlp_dim, m.n_layers = 32000, 4096, 11008, 32
    m.q_heads, m.kv_heads, m.head_dim = 32, 32, 128
    m.rope.theta = 10000.0
    m.tie_embeddings = False
    m.norm_eps = 1e-5
    apply_long_context_defaults(config, l_max=4096)
    return config


def apply_long_context_defaults(config, l_max: int) -> None:
    """The run settings the 7B/8B presets share (see the module docstring)."""
    m = config.model
    m.dtype, m.param_dtype = "bfloat16", "float32"
    m.remat = "full"
    m.remat_group = 4
    m.mlp_chunk_tokens = 16384
    m.loss_chunk_tokens = 4096
    m.attention = "ring"
    m.block_q = m.block_k = 512
    config.mesh.data, config.mesh.fsdp, config.mesh.seq, config.mesh.tensor = 1, 1, -1, 1
    config.curriculum.l_max = l_max
    config.train.batch_size = 1
    config.eval.batch_size = 1
