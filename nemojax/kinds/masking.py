"""Prefix masks for the masked (elastic) forward: the traced-size counterpart of `nemojax.kinds.pruning`.

After `nemojax.elastic.permute` every elastic axis is ordered by importance (per group where groups exist), so the
submodel of size k keeps a prefix of it. A kind's `mask` turns sizes (traced is fine: one compiled step for every
size) into these masks, which its modules multiply into their activations (`nemojax.nn.live`). Masks are float
vectors [n] of 0 / 1, times the axis's router multiplier where they carry it (value 1, see
`nemojax.elastic.masked`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

f32 = jnp.float32


def prefix(n: int, live: Any) -> jax.Array:
    """[n] float32: 1 for the first `live` entries (traced is fine), 0 after."""
    return (jnp.arange(n) < live).astype(f32)


def grouped_prefix(n: int, groups: int, live: Any) -> jax.Array:
    """[n] float32 over `groups` contiguous groups of n/groups: 1 for the first live/groups entries of every
    group (the per-group prefix a group-aware importance order keeps)."""
    return (jnp.arange(n) % (n // groups) < live // groups).astype(f32)


def outer(rows: jax.Array, cols: jax.Array) -> jax.Array:
    """(rows[:, None] * cols[None, :]).ravel(): the channels of the kept heads' kept channels."""
    return (rows[:, None] * cols[None, :]).reshape(-1)
