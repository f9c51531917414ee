"""What a masked (elastic) forward tells the modules it runs: the "elastic" variable collection.

`nemojax.elastic` runs a nested submodel on the full-size params, so every shape stays static and one compiled step
serves every submodel. The params are left as they are; the submodel's dead channels are zeroed on the activations,
where it is cheap (a multiply over tokens x width, fused by XLA, against one over every param per call): the
embedding and every residual branch by the hidden mask, so the residual stream is zero on dead hidden channels and
every layer that reads it sees only live ones; an MLP's hidden units before its down projection; attention heads
before o_proj; Mamba's x after its convolution and its gated output before out_proj; an expert's hidden units. The
few modules that look at a whole width read a live size instead: an RMSNorm averages over its live channels only,
the Mamba gated norm over each group's live channels, and the MoE router never picks a dead expert. A block scales
its residual branch by its depth gate. Without the collection (every plain forward) nothing changes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

COLLECTION = "elastic"


def live(module: nn.Module, name: str) -> Any:
    """The value `name` of the "elastic" collection in `module`'s scope, or None outside a masked forward."""
    return module.get_variable(COLLECTION, name) if module.has_variable(COLLECTION, name) else None


def keep(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """x [..., C] times the mask `name` [C] of `module`'s "elastic" entries (0 on dead channels, the axis's router
    multiplier on live ones), in x's dtype; x itself outside a masked forward."""
    mask = live(module, name)
    return x if mask is None else x * jnp.asarray(mask, x.dtype)
