"""Prefix masks for the masked (elastic) forward: the traced-size counterpart of `nemojax.kinds.pruning`.

After `nemojax.elastic.permute` every elastic axis is ordered by importance (per group where groups exist), so the
submodel of size k keeps a prefix of it. A kind's `mask` multiplies its params by these prefix masks, with the
sizes traced (one compiled step for every size), so that a masked param is its pruned slice padded with zeros.
Masks are float vectors [n] of 0 / 1, times the axis's router multiplier on the output side (value 1, see
`nemojax.elastic.masked`).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def scale(tree: dict, path: str, mask: jax.Array, axis: int) -> None:
    """tree[path] *= mask along `axis`, if that leaf exists (biases are optional). The mask is cast to the leaf's
    dtype; 0 and 1 are exact in every float format."""
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
        if key not in node:
            return
        node = node[key]
    if leaf in node:
        value = node[leaf]
        shape = [1] * value.ndim
        shape[axis] = value.shape[axis]
        node[leaf] = value * mask.reshape(shape).astype(value.dtype)


def mask_linear_hidden(layer: dict, hidden: jax.Array, residual_in: Sequence[str],
                       residual_out: Sequence[str]) -> None:
    """The hidden mask on a mixer's linears: the input axis of `residual_in` kernels, the output axis (and bias)
    of `residual_out` kernels, all under `mixer/` (as `pruning.slice_linear_hidden` slices them)."""
    for name in residual_in:
        scale(layer, f"mixer/{name}/kernel", hidden, 0)
    for name in residual_out:
        scale(layer, f"mixer/{name}/kernel", hidden, 1)
        scale(layer, f"mixer/{name}/bias", hidden, 0)


def mask_mlp(layer: dict, units: jax.Array, out: Any = 1.0, prefix_path: str = "mixer") -> None:
    """The hidden units `units` [F] of an up_proj / down_proj pair under `prefix_path`; `out` (the axis's router
    multiplier) scales down_proj's rows."""
    scale(layer, f"{prefix_path}/up_proj/kernel", units, 1)
    scale(layer, f"{prefix_path}/up_proj/bias", units, 0)
    scale(layer, f"{prefix_path}/down_proj/kernel", units * out, 0)
