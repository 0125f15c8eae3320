"""Specification of model/flops.py, the denominator of MFU: a training step's model FLOPs
counted here by hand, matmul by matmul, for one small shape.

A matmul [m, k] x [k, n] costs 2 m k n FLOPs (a multiply and an add per term). The backward
pass costs twice the forward (the gradients with respect to a matmul's input and to its
weight are a matmul each), so a training step is 3 x the forward. A causal mask lets each
query see on average half of the keys: the attention scores and their use cost half of the
full T x T. The embedding lookup, norms, softmax and rematerialisation are not counted.
"""
from model.flops import training_flops_per_step, training_flops_per_token
from model.transformer import ModelConfig

D, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 2, 4, 2, 16, 96, 256
T, ROWS = 32, 3


def config(mlp="swiglu"):
    return ModelConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, q_heads=Q_HEADS,
                       kv_heads=KV_HEADS, head_dim=HEAD_DIM, mlp_dim=MLP, l_max=T, mlp=mlp)


def matmul(m, k, n):
    """FLOPs of [m, k] x [k, n]."""
    return 2 * m * k * n


def forward_flops_of_one_row(mlp_matrices: int, causal: bool) -> float:
    """One row of T tokens through the model, forward only."""
    q = matmul(T, D, Q_HEADS * HEAD_DIM)
    k = matmul(T, D, KV_HEADS * HEAD_DIM)
    v = matmul(T, D, KV_HEADS * HEAD_DIM)
    out = matmul(T, Q_HEADS * HEAD_DIM, D)
    share = 0.5 if causal else 1.0                  # of the T x T query-key pairs
    scores = Q_HEADS * matmul(T, HEAD_DIM, T) * share       # Q K^T per query head
    mixed = Q_HEADS * matmul(T, T, HEAD_DIM) * share        # softmax(.) V per query head
    if mlp_matrices == 3:                                   # SwiGLU: gate, up, down
        mlp = matmul(T, D, MLP) + matmul(T, D, MLP) + matmul(T, MLP, D)
    else:                                                   # up, down
        mlp = matmul(T, D, MLP) + matmul(T, MLP, D)
    layer = q + k + v + out + scores + mixed + mlp
    logits = matmul(T, D, VOCAB)                            # the LM head
    return LAYERS * layer + logits


def test_a_causal_swiglu_step_is_three_forwards_of_every_matmul_and_half_the_attention():
    hand = 3 * ROWS * forward_flops_of_one_row(mlp_matrices=3, causal=True)
    # the same count as one number: per token 6 x 77_824 weights (2 layers x (64 x 16 x 12
    # + 3 x 64 x 96) + 64 x 256) + 12 x 2 layers x 64 x 32 keys / 2
    assert hand == ROWS * T * (6 * 77_824 + 12 * 2 * 64 * 32 / 2) == 47_185_920
    assert training_flops_per_step(config(), T, ROWS) == hand


def test_without_a_causal_mask_attention_counts_every_query_key_pair():
    hand = 3 * forward_flops_of_one_row(mlp_matrices=3, causal=False) / T
    assert training_flops_per_token(config(), T, causal=False) == hand


def test_a_two_matrix_mlp_counts_two_matmuls():
    hand = 3 * forward_flops_of_one_row(mlp_matrices=2, causal=True) / T
    assert training_flops_per_token(config(mlp="gelu_tanh"), T) == hand
