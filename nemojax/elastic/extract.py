"""Slicing a nested submodel out of an importance-ordered (permuted) model: every axis keeps its prefix (per group
where groups exist), which is what the masked forward (`nemojax.elastic.masked`) computes under its masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nemojax.compress.prune import prune
from nemojax.elastic.choices import layer_sizes
from nemojax.elastic.count import check_sizes, keep_weights
from nemojax.model import Model

__all__ = ["slice_sizes"]


class _Prefix:
    """Scores under which prune keeps the leading entries of every axis (per group): a strictly descending ramp
    for each key. None for "mamba_x" (the optional per-channel map that would rank heads otherwise)."""

    def __getitem__(self, key: str) -> Any:
        raise KeyError(key)

    def default(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if key.endswith("/mamba_x"):
            return None
        ramp = -np.arange(shape[-1], dtype=np.float64)
        return np.broadcast_to(ramp, shape).copy()


def slice_sizes(model: Model, sizes: Mapping[str, Any], *, removal_order: Sequence[int] = ()) -> Model:
    """The submodel `sizes` of an importance-ordered model as a plain Model (new config, sliced params).

    sizes: {axis: size} as `nemojax.elastic.count` takes them ("depth": the number of leading layers of
    `removal_order` dropped). A width axis given one size per layer of its kind makes a heterogeneous model, each
    layer's widths in its `config.layer_configs` (hidden is always one size: the residual stream). Raises
    ValueError naming a bad axis or size."""
    config = model.config
    check_sizes(config, sizes)
    if np.ndim(sizes.get("hidden", 0)) or np.ndim(sizes.get("depth", 0)):
        raise ValueError("sizes['hidden'] and sizes['depth'] are one number each: the residual stream has one "
                         "width, and depth counts layers")
    widths = {axis: np.asarray(value).astype(int).tolist() for axis, value in sizes.items()
              if axis not in ("hidden", "depth")}
    drop = None
    if int(sizes.get("depth", 0)):
        keep = keep_weights(np, config, int(sizes["depth"]), removal_order)
        drop = [int(i) for i in np.flatnonzero(keep == 0)]
    hidden = None if sizes.get("hidden") is None else int(sizes["hidden"])
    if any(isinstance(value, list) for value in widths.values()):
        return prune(model, _Prefix(), hidden=hidden, drop_layers=drop, per_layer=layer_sizes(config, widths))
    return prune(model, _Prefix(), hidden=hidden, drop_layers=drop, **widths)
