"""The NemotronH block: one pre-norm, one mixer, one residual (spec/arch.md 2.3)."""

from __future__ import annotations

import flax.linen as nn
import jax

from nemojax.config import ModelConfig
from nemojax.nn.attention import Attention
from nemojax.nn.linear import dtypes
from nemojax.nn.mamba2 import Mamba2Mixer
from nemojax.nn.mlp import MLP
from nemojax.nn.moe import MoE
from nemojax.nn.norms import RMSNorm


def make_mixer(config: ModelConfig, kind: str) -> nn.Module:
    """The mixer of a pattern character: M Mamba-2, * attention, - relu2 MLP, E MoE."""
    if kind == "M":
        return Mamba2Mixer(config, name="mixer")
    if kind == "*":
        return Attention(config, name="mixer")
    if kind == "-":
        return MLP(config, config.intermediate_size, name="mixer")
    if kind == "E":
        return MoE(config, name="mixer")
    raise ValueError(f"layer kind {kind!r} is invalid: must be one of 'M', '*', '-', 'E'")


class Block(nn.Module):
    """h: [b, L, hidden] -> h + mixer(norm(h)); the residual stream stays in the compute dtype."""

    config: ModelConfig
    kind: str

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        dtype, param_dtype = dtypes(self.config)
        x = RMSNorm(self.config.norm_eps, dtype, param_dtype, name="norm")(h)
        out = h + make_mixer(self.config, self.kind)(x).astype(h.dtype)
        return nn.with_logical_constraint(out, ("batch", "seq", "act_embed"))
