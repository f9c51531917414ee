"""The Mamba-2 mixer of NemotronH (spec/arch.md 1.2).

    in_proj -> split(z, xBC, dt) -> causal depthwise conv (with bias) -> silu -> split(x, B, C)
    -> SSD with dt = clip(softplus(dt + dt_bias), time_step_limit), A = -exp(A_log) -> + D * x
    -> grouped gated RMSNorm(y, z) -> out_proj
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.nn.linear import dense, dtypes, logical_param
from nemojax.nn.norms import GatedRMSNorm
from nemojax.nn.ssd import ssd

f32 = jnp.float32


def causal_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """Depthwise causal conv over time. x: [b, L, C], kernel: [K, C], bias: [C] -> [b, L, C] float32.

    out[t] = bias + sum_k kernel[k] * x[t - (K-1) + k] with zeros before the sequence, so tap K-1 multiplies the
    current token (torch Conv1d(groups=C, padding=K-1), first L outputs).
    """
    K, L = kernel.shape[0], x.shape[1]
    xp = jnp.pad(x.astype(f32), [(0, 0), (K - 1, 0), (0, 0)])
    out = sum(xp[:, k:k + L] * kernel[k].astype(f32) for k in range(K))
    return out if bias is None else out + bias.astype(f32)


def _dt_bias_init(config: ModelConfig):
    """dt_bias = softplus^-1(dt), dt log-uniform in [time_step_min, time_step_max], floored (spec 1.5)."""
    m = config.mamba

    def init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        u = jax.random.uniform(key, shape, f32)
        dt = jnp.exp(u * (math.log(m.time_step_max) - math.log(m.time_step_min)) + math.log(m.time_step_min))
        dt = jnp.maximum(dt, m.time_step_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    del key
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=f32)).astype(dtype)


class CausalConv1d(nn.Module):
    """Depthwise causal conv with params `kernel` [K, conv_dim] and `bias` [conv_dim] (torch: [conv_dim, 1, K])."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        m = self.config.mamba
        _, param_dtype = dtypes(self.config)
        kernel = logical_param(self, "kernel", nn.initializers.normal(self.config.initializer_range),
                               ("conv", "ssm_heads"), (m.conv_kernel, m.conv_dim), param_dtype)
        bias = None
        if m.use_conv_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros_init(), ("ssm_heads",), (m.conv_dim,),
                                 param_dtype)
        return causal_conv1d(x, kernel, bias)


class Mamba2Mixer(nn.Module):
    """u: [b, L, hidden] (the block's normed input) -> [b, L, hidden]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        cfg, m = self.config, self.config.mamba
        dtype, param_dtype = dtypes(cfg)
        H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.state_size
        I = m.inner_size
        b, L, _ = u.shape

        zxbcdt = dense(cfg, m.in_proj_size, ("embed", "ssm_heads"), name="in_proj", use_bias=m.proj_bias)(u)
        z, xBC, dt = jnp.split(zxbcdt, [I, I + m.conv_dim], axis=-1)

        # The conv runs in float32 and its output is rounded to the compute dtype, as torch's conv would be.
        xBC = CausalConv1d(cfg, name="conv1d")(xBC)
        xBC = jax.nn.silu(xBC.astype(dtype))
        x, B, C = jnp.split(xBC, [I, I + G * N], axis=-1)

        dt_bias = logical_param(self, "dt_bias", _dt_bias_init(cfg), ("ssm_heads",), (H,), param_dtype)
        A_log = logical_param(self, "A_log", _a_log_init, ("ssm_heads",), (H,), param_dtype)
        D = logical_param(self, "D", nn.initializers.ones_init(), ("ssm_heads",), (H,), param_dtype)

        # dt, A and the scan in float32 (spec 6.2, 6.3); the clamp is time_step_limit, not time_step_min (6.1).
        dt = jax.nn.softplus(dt.astype(f32) + dt_bias.astype(f32))
        dt = jnp.clip(dt, *m.time_step_limit)
        A = -jnp.exp(A_log.astype(f32))
        x_bLhp = x.reshape(b, L, H, P).astype(f32)
        y_bLhp, _ = ssd(x_bLhp, dt, A, B.reshape(b, L, G, N), C.reshape(b, L, G, N),
                        chunk_size=m.chunk_size, impl=m.ssd_impl)
        y_bLhp = y_bLhp + D.astype(f32)[:, None] * x_bLhp

        y = GatedRMSNorm(n_groups=G, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="norm")(
            y_bLhp.reshape(b, L, I), z)
        return dense(cfg, cfg.hidden_size, ("ssm_heads", "embed"), name="out_proj", use_bias=m.proj_bias)(y)
