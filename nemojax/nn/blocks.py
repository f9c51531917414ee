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
from nemojax.nn.state import Extend, LayerState


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


def mix(mixer: nn.Module, kind: str, x: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """The uncached mixer call, with the packed-document segment ids for the mixers that mix across tokens."""
    if segment_ids is None or kind not in "M*":
        return mixer(x)
    return mixer(x, segment_ids=segment_ids)


class Block(nn.Module):
    """h: [b, T, hidden] -> h + mixer(norm(h)); the residual stream stays in the compute dtype.

    With `state` (and `step`, see `nemojax.nn.state`) a Mamba or attention mixer continues from its cache and
    `(h, new_state)` comes back; MLP and MoE layers have no state (`state` is None and stays None).
    segment_ids: [b, T] (packed documents, uncached forward only) keep Mamba and attention mixers within each
    document; MLP and MoE layers are per token anyway.
    """

    config: ModelConfig
    kind: str

    @nn.compact
    def __call__(self, h: jax.Array, state: LayerState = None, step: Extend | None = None,
                 segment_ids: jax.Array | None = None):
        dtype, param_dtype = dtypes(self.config)
        x = RMSNorm(self.config.norm_eps, dtype, param_dtype, name="norm")(h)
        mixer = make_mixer(self.config, self.kind)
        if state is None:
            y = mix(mixer, self.kind, x, segment_ids)
        else:
            y, state = mixer(x, state, step)
        out = nn.with_logical_constraint(h + y.astype(h.dtype), ("batch", "seq", "act_embed"))
        return out if step is None else (out, state)
