"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 mixer. Both normalise in float32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.nn.linear import logical_param

f32 = jnp.float32


class RMSNorm(nn.Module):
    """x: [..., D] -> x * rsqrt(mean(x^2) + eps) * scale, in float32, cast back to `dtype`.

    The scale multiplies in float32 before the cast, as NVIDIA's reference does (docs/numerics.md 7).
    """

    eps: float
    dtype: jnp.dtype = f32
    param_dtype: jnp.dtype = f32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = logical_param(self, "scale", nn.initializers.ones_init(), (self.axis_name,), (x.shape[-1],),
                              self.param_dtype)
        x32 = x.astype(f32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(f32)).astype(self.dtype)


class GatedRMSNorm(nn.Module):
    """y, z: [..., I] -> groupwise RMSNorm of y * silu(z), times scale.

    The gate is applied first, then each of `n_groups` contiguous groups of I / n_groups channels is normalised
    on its own (mamba_ssm RMSNormGated(norm_before_gate=False, group_size=I/G); docs/numerics.md 5).
    """

    n_groups: int
    eps: float
    dtype: jnp.dtype = f32
    param_dtype: jnp.dtype = f32

    @nn.compact
    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        width = y.shape[-1]
        scale = logical_param(self, "scale", nn.initializers.ones_init(), ("ssm_heads",), (width,),
                              self.param_dtype)
        v = y.astype(f32) * jax.nn.silu(z.astype(f32))
        v = v.reshape(*v.shape[:-1], self.n_groups, width // self.n_groups)
        v = v * jax.lax.rsqrt(jnp.mean(jnp.square(v), axis=-1, keepdims=True) + self.eps)
        return (v.reshape(*v.shape[:-2], width) * scale.astype(f32)).astype(self.dtype)
