"""Llama-3-8B's architecture (its Hugging Face config.json) for plans and long-context runs.

vocab 128256, d_model 4096, MLP 14336, 32 layers, 32 query / 8 key-value heads of 128,
RoPE theta 500,000, trained at 8192 positions, untied LM head, RMSNorm eps 1e-5 (Llama 3.1
adds the llama3 scaling: --config.model.rope.scaling='{"rope_type": "llama3", "factor": 8,
"original_max_position_embeddings": 8192}'). Run settings as configs/llama2_7b.py:

  python main.py --mode plan --config configs/llama3_8b.py --config.plan.devices=8 \\
      --config.curriculum.l_max=L [--config.plan.memory_budget_gib=80]
"""
from configs import base
from configs.llama2_7b import apply_long_context_defaults


def get_config():
    config = base.get_config()
    m = config.model
    m.vocab_size, m.d_model, m.mlp_dim, m.n_layers = 128256, 4096, 14336, 32
    m.q_heads, m.kv_heads, m.head_dim = 32, 8, 128
    m.rope.theta = 500000.0
    m.tie_embeddings = False
    m.norm_eps = 1e-5
    apply_long_context_defaults(config, l_max=8192)
    return config
