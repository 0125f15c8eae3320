"""Model FLOPs of a training step: the count MFU is quoted against.

Per token, forward + backward: 6 x (the parameters a token's matmuls use: every block
matrix and the LM head; the embedding lookup and norms cost no matmul) plus attention's
12 x n_layers x (q_heads x head_dim) x T for T keys, halved for a causal mask (each
query sees on average half of the keys). Rematerialisation's recomputation is not counted
(model FLOPs, not hardware FLOPs).
"""
from __future__ import annotations


def matmul_parameters(cfg) -> int:
    """Weights multiplied per token: the decoder blocks' matrices and the LM head."""
    attention = cfg.d_model * cfg.head_dim * (2 * cfg.q_heads + 2 * cfg.kv_heads)
    mlp = (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.mlp_dim
    return cfg.n_layers * (attention + mlp) + cfg.d_model * cfg.vocab_size


def training_flops_per_token(cfg, length: int, causal: bool = True) -> float:
    """6 N + 12 n_layers (q_heads head_dim) T (x 1/2 when causal) for rows of `length`."""
    attention = 12 * cfg.n_layers * cfg.q_heads * cfg.head_dim * length
    return 6 * matmul_parameters(cfg) + (attention / 2 if causal else attention)


def training_flops_per_step(cfg, length: int, rows: int) -> float:
    return training_flops_per_token(cfg, length) * length * rows
