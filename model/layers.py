"""Building blocks of the decoder: parameters with logical axis names, the norms (RMSNorm,
LayerNorm) and the MLPs (SwiGLU, GeluMLP), and `make_norm`/`make_mlp`, which pick them by
their config names."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.choices import MLP_KINDS, NORM_KINDS



def param(rngs: nnx.Rngs, shape, names, init, dtype) -> nnx.Param:
    """A parameter drawn by `init`, tagged with logical axis `names` (parallel/mesh.py maps
    them onto mesh axes)."""
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


def zeros(shape, names, dtype) -> nnx.Param:
    """A zero-initialised parameter (a bias) tagged with logical axis `names`. It draws no
    key, so switching a bias on leaves every random draw of the model as it was."""
    return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, names)(None, shape, dtype))


def add_bias(x, bias: nnx.Param | None, dtype):
    """x + bias in the compute `dtype`; x unchanged when there is no bias."""
    return x if bias is None else x + bias[...].astype(dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), nnx.initializers.ones, param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer norm (Ba et al. 2016) with scale and bias, computed in float32: GPT-2's norm.

    The scale is drawn like RMSNorm's (same key use), the bias is zeros and draws none, so
    a layernorm model starts with the same random weights as its rmsnorm twin.
    """

    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), nnx.initializers.ones, param_dtype)
        self.bias = zeros((dim,), ("embed",), param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        centred = x32 - mean
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(variance + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class SwiGLU(nnx.Module):
    """The gated MLP of Shazeer (2020): down(silu(x @ gate) * (x @ up)), with optional
    biases on the three matrices (zeros, drawn after the weights: none by default)."""

    def __init__(self, d_model: int, mlp_dim: int, init_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs, *, bias: bool = False):
        init = nnx.initializers.normal(init_std)
        self.w_gate = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), init, param_dtype)
        self.w_up = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), init, param_dtype)
        self.w_down = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), init, param_dtype)
        if bias:
            self.gate_bias = zeros((mlp_dim,), ("mlp",), param_dtype)
            self.up_bias = zeros((mlp_dim,), ("mlp",), param_dtype)
            self.down_bias = zeros((d_model,), ("embed",), param_dtype)
        else:
            self.gate_bias = self.up_bias = self.down_bias = None
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        gate = add_bias(x @ self.w_gate[...].astype(self.dtype), self.gate_bias, self.dtype)
        up = add_bias(x @ self.w_up[...].astype(self.dtype), self.up_bias, self.dtype)
        out = (jax.nn.silu(gate) * up) @ self.w_down[...].astype(self.dtype)
        return add_bias(out, self.down_bias, self.dtype)


class GeluMLP(nnx.Module):
    """GPT-2's MLP: out(gelu_tanh(x @ w_in + in_bias)) + out_bias, GELU in its tanh
    approximation (Hugging Face's "gelu_new"); biases when `bias`."""

    def __init__(self, d_model: int, mlp_dim: int, init_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs, *, bias: bool = False):
        init = nnx.initializers.normal(init_std)
        self.w_in = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), init, param_dtype)
        self.w_out = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), init, param_dtype)
        if bias:
            self.in_bias = zeros((mlp_dim,), ("mlp",), param_dtype)
            self.out_bias = zeros((d_model,), ("embed",), param_dtype)
        else:
            self.in_bias = self.out_bias = None
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        hidden = add_bias(x @ self.w_in[...].astype(self.dtype), self.in_bias, self.dtype)
        out = jax.nn.gelu(hidden, approximate=True) @ self.w_out[...].astype(self.dtype)
        return add_bias(out, self.out_bias, self.dtype)


def make_norm(kind: str, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
    """The norm that model.norm names: RMSNorm (scale only) or LayerNorm (scale and bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, param_dtype, rngs)
    if kind == "layernorm":
        return LayerNorm(dim, eps, param_dtype, rngs)
    raise ValueError(f"model.norm must be one of {NORM_KINDS}, got {kind!r}")


def make_mlp(kind: str, d_model: int, mlp_dim: int, init_std: float, dtype, param_dtype,
             rngs: nnx.Rngs, *, bias: bool = False):
    """The MLP that model.mlp names: SwiGLU or GeluMLP, with biases when `bias`."""
    if kind == "swiglu":
        return SwiGLU(d_model, mlp_dim, init_std, dtype, param_dtype, rngs, bias=bias)
    if kind == "gelu_tanh":
        return GeluMLP(d_model, mlp_dim, init_std, dtype, param_dtype, rngs, bias=bias)
    raise ValueError(f"model.mlp must be one of {MLP_KINDS}, got {kind!r}")
