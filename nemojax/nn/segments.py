"""Packed documents: rows holding several documents, told apart by `segment_ids` [b, L] (contiguous runs of one
id, as `nemojax.data.packing` makes them). The mixers that mix across tokens use these to stay within a document."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """segment_ids: [b, L] -> [b, L] bool, True where a token begins a new document after another one (position 0
    is False: nothing comes before it)."""
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], [(0, 0), (1, 0)])


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """segment_ids: [b, L] -> [b, L] int32, each token's position within its own document."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    return index - jax.lax.cummax(jnp.where(document_starts(segment_ids), index, 0), axis=1)
