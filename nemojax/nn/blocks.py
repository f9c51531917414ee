"""The pre-norm residual block of the hybrid stack: one RMSNorm, one mixer of a registered layer kind, one
residual. The mixer comes from the kind registry (`nemojax.families`), so a new kind needs no edit here."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax import families
from nemojax.config import ModelConfig
from nemojax.nn.linear import dtypes
from nemojax.nn.live import keep, live
from nemojax.nn.norms import RMSNorm
from nemojax.nn.state import Extend, LayerState


def mix(config: ModelConfig, kind: str, x: jax.Array, state: LayerState, step: Extend | None,
        segment_ids: jax.Array | None) -> tuple[jax.Array, LayerState]:
    """Builds the mixer of pattern character `kind` (named "mixer") and runs it: x: [b, T, hidden] ->
    (y [b, T, hidden], state). Packed-document segment ids reach only the kinds that mix across tokens."""
    entry = families.kind(kind)
    mixer = entry.mixer(config, name="mixer")
    return mixer(x, state, step, segment_ids if entry.mixes_tokens else None)


class Block(nn.Module):
    """h: [b, T, hidden] -> (h + mixer(norm(h)), state); the residual stream stays in the compute dtype.

    With `state` (and `step`, see `nemojax.nn.state`) a stateful mixer continues from its cache and returns its
    new state; without, the state stays None. segment_ids: [b, T] (packed documents, uncached forward only) keep
    token-mixing kinds within each document. The normed input is sown as the "taps" `normed` (activation
    importance of the hidden channels). In a masked (elastic) forward the residual branch is multiplied by the hidden
    mask and by the block's depth gate `gamma` (0: the block is dropped; `nemojax.nn.live`).
    """

    config: ModelConfig
    kind: str

    @nn.compact
    def __call__(self, h: jax.Array, state: LayerState = None, step: Extend | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, LayerState]:
        dtype, param_dtype = dtypes(self.config)
        x = RMSNorm(self.config.norm_eps, dtype, param_dtype, name="norm")(h)
        self.sow("taps", "normed", x)
        y, state = mix(self.config, self.kind, x, state, step, segment_ids)
        y = keep(self, "hidden", y)  # a nested submodel's dead hidden channels stay zero in the residual stream
        gamma = live(self, "gamma")
        if gamma is not None:
            y = y * jnp.asarray(gamma, y.dtype)
        out = nn.with_logical_constraint(h + y.astype(h.dtype), ("batch", "seq", "act_embed"))
        self.sow("blocks", "in", h)
        self.sow("blocks", "out", out)
        return out, state
