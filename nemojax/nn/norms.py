"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 mixer. Both normalise in float32; in a masked (elastic)
forward both average over their live channels only (`nemojax.nn.live`), which equals the norm of the sliced model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.nn.linear import logical_param
from nemojax.nn.live import live

f32 = jnp.float32


def _mean_square(x: jax.Array, live_width: jax.Array | None) -> jax.Array:
    """mean(x^2) over the last axis [..., 1]; over its first `live_width` entries when given (the rest are zero)."""
    if live_width is None:
        return jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return jnp.sum(jnp.square(x), axis=-1, keepdims=True) / jnp.asarray(live_width, f32)


class RMSNorm(nn.Module):
    """x: [..., D] -> x * rsqrt(mean(x^2) + eps) * scale, in float32, cast back to `dtype`.

    The scale multiplies in float32 before the cast, as NVIDIA's reference does (docs/numerics.md 7). In a masked
    forward the mean runs over the `live` leading channels (the others are zero), as Nemotron Elastic's masked-norm
    correction does (arXiv 2511.16664 sec. 3).
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
        normed = x32 * jax.lax.rsqrt(_mean_square(x32, live(self, "live")) + self.eps)
        return (normed * scale.astype(f32)).astype(self.dtype)


class GatedRMSNorm(nn.Module):
    """y, z: [..., I] -> groupwise RMSNorm of y * silu(z), times scale.

    The gate is applied first, then each of `n_groups` contiguous groups of I / n_groups channels is normalised
    on its own (mamba_ssm RMSNormGated(norm_before_gate=False, group_size=I/G); docs/numerics.md 5). In a masked
    forward each group averages over its `live` channels (the heads and head channels kept in every group).
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
        v = v * jax.lax.rsqrt(_mean_square(v, live(self, "live")) + self.eps)
        return (v.reshape(*v.shape[:-2], width) * scale.astype(f32)).astype(self.dtype)
