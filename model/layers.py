"""Building blocks of the decoder: parameters with logical axis names, RMSNorm, SwiGLU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, names, init, dtype) -> nnx.Param:
    """A parameter drawn by `init`, tagged with logical axis `names` (parallel/mesh.py maps
    them onto mesh axes)."""
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, (dim,), ("embed",), nnx.initializers.ones, param_dtype)
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class SwiGLU(nnx.Module):
    """The gated MLP of Shazeer (2020): down(silu(x @ gate) * (x @ up))."""

    def __init__(self, d_model: int, mlp_dim: int, init_std: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.w_gate = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), init, param_dtype)
        self.w_up = param(rngs, (d_model, mlp_dim), ("embed", "mlp"), init, param_dtype)
        self.w_down = param(rngs, (mlp_dim, d_model), ("mlp", "embed"), init, param_dtype)
        self.dtype = dtype

    def __call__(self, x):
        x = x.astype(self.dtype)
        gate = x @ self.w_gate[...].astype(self.dtype)                   # [b, l, mlp]
        up = x @ self.w_up[...].astype(self.dtype)
        return (jax.nn.silu(gate) * up) @ self.w_down[...].astype(self.dtype)
