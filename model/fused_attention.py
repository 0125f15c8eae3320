"""A fused attention library call for rows that are one document in sequence order.

`fused_attention` is `jax.nn.dot_product_attention` with implementation="cudnn" (cuDNN's
flash attention on NVIDIA GPUs; "xla" runs the same call anywhere, which the CPU tests
use). Its masks are causal and a sliding window over array indices, so it equals
`dot_product_attention` only where positions are 0..T-1 in array order and there is one
segment: padding may follow the real tokens (causally after them, so unseen). Packed
documents and permuted (zigzag) layouts stay with the blockwise kernel
(parallel/sequence_parallel.py decides).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from model.blockwise import ATTENTION_OUT
from model.masking import check_shapes


def fused_attention(q, k, v, *, causal: bool = True, sliding_window=None,
                    implementation: str = "cudnn"):
    """q [b, l, hq, d], k/v [b, l, hk, d] -> [b, l, hq, d] in q's dtype. `sliding_window`
    (None or a Python int w): each query sees itself and the w - 1 tokens before it (and,
    without causal, the w - 1 after)."""
    check_shapes(q, k, v)
    window = None
    if sliding_window is not None:
        if not isinstance(sliding_window, (int, np.integer)):
            raise ValueError("fused attention takes a static sliding window (an int): layers "
                             "with different windows run the blockwise kernel")
        window = (int(sliding_window) - 1, 0 if causal else int(sliding_window) - 1)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window,
                                       implementation=implementation)
    # cuDNN's residuals are its own (unnamed): save_attention_out keeps only the output
    return checkpoint_name(out, ATTENTION_OUT)
