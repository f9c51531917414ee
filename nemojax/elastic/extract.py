"""Slicing a nested submodel out of an importance-ordered (permuted) model: every axis keeps its prefix (per group
where groups exist), which is what the masked forward (`nemojax.elastic.masked`) computes under its masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nemojax.compress.prune import prune
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

    sizes: {axis: int} as `nemojax.elastic.count` takes them, one size per axis ("depth": the number of leading
    layers of `removal_order` dropped). Per-layer (heterogeneous) widths are refused: a ModelConfig has one size
    per axis. Raises ValueError naming a bad axis or size."""
    config = model.config
    check_sizes(config, sizes)
    for axis, value in sizes.items():
        if np.ndim(value) != 0:
            raise ValueError(f"sizes[{axis!r}] has one size per layer: a ModelConfig has one size per axis, so "
                             "a heterogeneous submodel runs masked only (nemojax.elastic.masked)")
    widths = {axis: int(value) for axis, value in sizes.items() if axis not in ("hidden", "depth")}
    drop = None
    if int(sizes.get("depth", 0)):
        keep = keep_weights(np, config, int(sizes["depth"]), removal_order)
        drop = [int(i) for i in np.flatnonzero(keep == 0)]
    hidden = sizes.get("hidden")
    return prune(model, _Prefix(), hidden=None if hidden is None else int(hidden), drop_layers=drop, **widths)
