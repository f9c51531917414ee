"""Multi-token prediction head of Nemotron 3 Super (docs/numerics.md 9; arXiv 2604.12374).

Depth d predicts the token two (d + 2) ahead from the previous depth's hidden state h (the main model's final,
normed hidden for d = 0) and the embedding e of the next input token:

    f = eh_proj(concat[enorm(e), hnorm(h)])          (first sub-layer only; embedding half first)
    f = f + mixer_j(norm_j(f))                       (one pre-norm block per character of the MTP pattern)
    h' = final_layernorm(f)                          (last sub-layer only); logits through the shared lm_head

Sub-layers are named `layers_{d * len(pattern) + j}` as in the checkpoint (`mtp.layers.{k}.`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.nn.blocks import mix
from nemojax.nn.linear import dense, dtypes
from nemojax.nn.norms import RMSNorm
from nemojax.nn.state import Extend, LayerState


class MTPSublayer(nn.Module):
    """One MTP sub-layer: a pre-norm block, with the fusion input on the first and the final norm on the last."""

    config: ModelConfig
    kind: str
    first: bool
    last: bool

    @nn.compact
    def __call__(self, f: jax.Array, embedded: jax.Array | None = None, state: LayerState = None,
                 step: Extend | None = None, segment_ids: jax.Array | None = None):
        cfg = self.config
        dtype, param_dtype = dtypes(cfg)
        if self.first:
            e = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="enorm")(embedded)
            h = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="hnorm")(f)
            f = dense(cfg, cfg.hidden_size, ("mlp", "embed"), name="eh_proj")(jnp.concatenate([e, h], axis=-1))
        x = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="norm")(f)
        y, state = mix(cfg, self.kind, x, state, step, segment_ids)
        f = f + y.astype(f.dtype)
        if self.last:
            f = RMSNorm(cfg.norm_eps, dtype, param_dtype, name="final_layernorm")(f)
        return f, state


class MTP(nn.Module):
    """hidden: [b, L, hidden], next_embedded: [b, L, hidden] -> one hidden state [b, L, hidden] per depth."""

    config: ModelConfig

    def setup(self) -> None:
        pattern = self.config.mtp.pattern
        self.layers = [
            MTPSublayer(self.config, kind, first=j == 0, last=j == len(pattern) - 1)
            for _ in range(self.config.mtp.num_layers) for j, kind in enumerate(pattern)
        ]

    def __call__(self, hidden: jax.Array, next_embedded: list[jax.Array],
                 segment_ids: jax.Array | None = None) -> list[jax.Array]:
        per_depth = len(self.config.mtp.pattern)
        outputs = []
        for d in range(self.config.mtp.num_layers):
            f = hidden
            for j in range(per_depth):
                f, _ = self.layers[d * per_depth + j](f, next_embedded[d] if j == 0 else None, None, None,
                                                      segment_ids)
            outputs.append(f)
            hidden = f
        return outputs

    def extend_depth(self, depth: int, hidden: jax.Array, embedded: jax.Array, states: tuple,
                     step: Extend) -> tuple[jax.Array, tuple]:
        """One depth over T new positions with its own caches (one entry per character of the MTP pattern).

        hidden: [b, T, hidden] (the previous depth's output, or the main model's normed hidden for depth 0),
        embedded: [b, T, hidden] (embeddings of the tokens d + 1 ahead) -> ([b, T, hidden], new states).
        """
        per_depth = len(self.config.mtp.pattern)
        f, new_states = hidden, []
        for j in range(per_depth):
            f, state = self.layers[depth * per_depth + j](f, embedded if j == 0 else None, states[j], step)
            new_states.append(state)
        return f, tuple(new_states)
