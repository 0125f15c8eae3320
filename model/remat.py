"""Rematerialisation of the decoder layers in the backward pass (`model.remat`).

  none                nothing is recomputed: every intermediate of every layer is kept
  full                only each layer's input is kept; the backward pass reruns the layer
                      (jax.checkpoint_policies.nothing_saveable)
  save_dots           matmul results without batch dimensions are kept (the q/k/v/output
                      projections and the MLP's matrices), the rest recomputed
                      (jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  save_attention_out  the attention kernel's backward residuals, its output and per-row
                      log-sum-exp (named "attention_out" / "attention_lse" inside the
                      kernels' custom VJPs, model/blockwise.py), are kept, the rest
                      recomputed: the backward pass does not rerun the attention's forward
                      pass, nor a ring's forward transfers
                      (jax.checkpoint_policies.save_only_these_names). cuDNN's and the dense
                      kernel's residuals are their own: for them only the output is kept.
  offload             as full, but each layer's input (named "decoder_layer_input" inside
                      the layer, where the policy sees it: naming the scan's output does
                      nothing, jax#23869) is moved to pinned host memory in the forward pass
                      and back in the backward pass
                      (jax.checkpoint_policies.save_and_offload_only_these_names). XLA:CPU
                      ignores the placement (the host is the device); XLA:GPU and the TPU
                      compiler place it in host memory.
  offload_attention   offload, and the attention residuals of save_attention_out go to
                      pinned host memory too: one forward pass of the attention per step
                      (and of a ring's transfers), for host memory of about twice offload's.

Old configs wrote model.remat as a bool: True means "full", False "none".
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from model.blockwise import ATTENTION_LSE, ATTENTION_OUT
from model.choices import OFFLOAD_POLICIES

LAYER_INPUT = "decoder_layer_input"     # checkpoint name of a layer's input (offload)


def _offloading(*names: str):
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(), names_which_can_be_offloaded=names,
        offload_src="device", offload_dst="pinned_host")


def layer_forward_passes(name: str, group: int = 1) -> int:
    """How often a step runs each layer's forward pass under policy `name` with scanned
    groups of `group` layers: once without remat, twice when the backward pass reruns the
    layer, three times when it reruns the layer's group first (g > 1)."""
    return 1 if name == "none" else 2 + (group > 1)


def attention_forward_passes(name: str, group: int = 1) -> int:
    """How often the attention kernel's forward pass runs (and a ring's forward transfers,
    which are inside it): as the layer's, less the layer's own rerun when the policy keeps
    the kernel's residuals."""
    keeps_attention = name in ("save_attention_out", "offload_attention")
    return layer_forward_passes(name, group) - keeps_attention


def rematerialise(fn: Callable, name: str, *, in_scan: bool) -> Callable:
    """`fn` (one layer) under the named policy; `in_scan`: the layer is a lax.scan body,
    where rematerialised values cannot be merged across iterations anyway, so CSE
    prevention is not needed (JAX's advice for checkpoint inside scan)."""
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "save_attention_out": jax.checkpoint_policies.save_only_these_names(
                    ATTENTION_OUT, ATTENTION_LSE),
                "offload": _offloading(LAYER_INPUT),
                "offload_attention": _offloading(LAYER_INPUT, ATTENTION_OUT, ATTENTION_LSE)}
    if name == "none":
        return fn
    if name in OFFLOAD_POLICIES:
        inner = fn

        def fn(carry, xs):
            return inner(jax.tree.map(lambda x: checkpoint_name(x, LAYER_INPUT), carry), xs)
    return jax.checkpoint(fn, policy=policies[name], prevent_cse=not in_scan)
