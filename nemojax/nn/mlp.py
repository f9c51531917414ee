"""The squared-ReLU MLP of NemotronH: down(relu(up(x))^2), no gate (spec/arch.md 2.2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.nn.linear import dense


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


class MLP(nn.Module):
    """x: [..., hidden] -> [..., hidden] through `intermediate_size` relu^2 units."""

    config: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = dense(cfg, self.intermediate_size, ("embed", "mlp"), name="up_proj", use_bias=cfg.mlp_bias)(x)
        h = nn.with_logical_constraint(relu2(h), ("batch", "seq", "act_mlp"))
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="down_proj", use_bias=cfg.mlp_bias)(h)
