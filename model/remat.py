"""Rematerialisation of the decoder layers in the backward pass (`model.remat`).

  none                nothing is recomputed: every intermediate of every layer is kept
  full                only each layer's input is kept; the backward pass reruns the layer
                      (jax.checkpoint_policies.nothing_saveable)
  save_dots           matmul results without batch dimensions are kept (the q/k/v/output
                      projections and the MLP's matrices), the rest recomputed
                      (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  save_attention_out  the attention kernel's output (named "attention_out" in
                      model/attention.py) is kept, the rest recomputed
                      (jax.checkpoint_policies.save_only_these_names)

Old configs wrote model.remat as a bool: True means "full", False "none".
"""
from __future__ import annotations

from typing import Callable

import jax

from model.attention import ATTENTION_OUT

REMAT_POLICIES = ("none", "full", "save_dots", "save_attention_out")


def policy_name(value) -> str:
    """The policy a model.remat value names (bools from older configs accepted)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {value!r}")
    return value


def rematerialise(fn: Callable, name: str, *, in_scan: bool) -> Callable:
    """`fn` (one layer) under the named policy; `in_scan`: the layer is a lax.scan body,
    where rematerialised values cannot be merged across iterations anyway, so CSE
    prevention is not needed (JAX's advice for checkpoint inside scan)."""
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "save_attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT)}
    if name == "none":
        return fn
    return jax.checkpoint(fn, policy=policies[name], prevent_cse=not in_scan)
