"""Token-level losses. All in float32 over `[batch, seq, vocab]` logits with a `[batch, seq]` loss mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross entropy over unmasked positions, plus `z_loss * logsumexp^2` (PaLM's z-loss).

    logits: [B, L, V], targets: [B, L] int, mask: [B, L] (0/1) -> (loss, {"nll", "z_loss", "tokens"}).
    """
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    tokens = jnp.maximum(jnp.sum(mask), 1.0)
    mean_nll = jnp.sum(nll * mask) / tokens
    mean_z = jnp.sum(jnp.square(lse) * mask) / tokens
    return mean_nll + z_loss * mean_z, {"nll": mean_nll, "z_loss": mean_z, "tokens": jnp.sum(mask)}
