"""Dense projections with logical sharding names, and the dtype helpers every block shares."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig


def dtypes(config: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, param dtype) of a config."""
    return jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)


def dense(config: ModelConfig, features: int, names: Sequence[str | None], *, name: str,
          use_bias: bool = False) -> nn.Dense:
    """A `[in, out]` linear layer named like its checkpoint tensor, with logical axis `names` on its kernel."""
    dtype, param_dtype = dtypes(config)
    init = nn.initializers.normal(config.initializer_range)
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(init, tuple(names)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[-1],)),
        name=name,
    )


def logical_param(module: nn.Module, name: str, init: Callable, axes: Sequence[str | None],
                  shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
    """`module.param` with logical axis names (one per dimension of `shape`) attached for the sharding rules."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)
