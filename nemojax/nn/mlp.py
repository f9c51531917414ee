"""The squared-ReLU MLP of NemotronH: down(relu(up(x))^2), no gate (arXiv 2504.03624; mlp_hidden_act "relu2")."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.nn.linear import dense
from nemojax.nn.live import keep


def relu2(x: jax.Array) -> jax.Array:
    return jnp.square(jax.nn.relu(x))


class MLP(nn.Module):
    """x: [b, T, hidden] -> (y [b, T, hidden], state) through `intermediate_size` relu^2 units; stateless, so the
    state passes through (None), as every mixer returns one."""

    config: ModelConfig
    intermediate_size: int

    @nn.compact
    def __call__(self, x: jax.Array, state: None = None, step: Any = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, None]:
        del step, segment_ids  # per token
        cfg = self.config
        h = dense(cfg, self.intermediate_size, ("embed", "mlp"), name="up_proj", use_bias=cfg.mlp_bias)(x)
        h = nn.with_logical_constraint(relu2(h), ("batch", "seq", "act_mlp"))
        self.sow("taps", "down_proj_in", h)  # activation importance (nemojax.compress.importance)
        h = keep(self, "units", h)  # a nested submodel's live hidden units (nemojax.nn.live)
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="down_proj", use_bias=cfg.mlp_bias)(h), state
