"""The size choices of an elastic model: per axis, the sizes its nested submodels may take (Nemotron Elastic,
arXiv 2511.16664 sec. 3; Star Elastic, arXiv 2605.07182, adds the MoE axes).

    choices = default_choices(config)                 # {"hidden": (64, 56, 48, 40, 32), "ffn": (128, 112, ...), ...}
    choices = default_choices(config, max_drop=2)     # ... and "depth": (0, 1, 2)
    choices = make_choices(config, {"ffn": (128, 96, 64)})

Axes: "hidden" (the residual stream, always one global size), the width-pruning targets of the layer kinds in the
config's pattern (`nemojax.compress.prune.width_targets`: "ffn", "heads", "mamba_heads", "mamba_head_dim",
"experts", "expert_ffn", "shared_ffn" for the built-in kinds) and "depth". A width axis lists sizes in descending
order, index 0 = the full size, every one allowed by the axis's `families.Axis` (prune accepts it). "depth" lists
numbers of layers to drop in ascending order, index 0 = drop none; which layers go is a removal order (a list of
layer indices) kept beside the choices. Index 0 is the full model on every axis, which the router loss pulls the
full budget to.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nemojax import families
from nemojax.compress.prune import width_targets

__all__ = ["DEFAULT_FRACTIONS", "Choices", "axes_of", "axis_owners", "default_choices", "layer_counts", "layer_sizes",
           "make_choices"]

DEFAULT_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)


class Choices(Mapping):
    """A frozen, hashable mapping axis -> tuple of allowed sizes (see the module docstring for the order).

    Build it with `make_choices` or `default_choices` (both validate against a config); hashable, so it can be a
    static argument of `jax.jit`."""

    __slots__ = ("_items",)

    def __init__(self, table: Mapping[str, Sequence[int]]):
        object.__setattr__(self, "_items", tuple((axis, tuple(int(v) for v in table[axis])) for axis in table))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Choices is frozen")

    def __getitem__(self, axis: str) -> tuple[int, ...]:
        for name, sizes in self._items:
            if name == axis:
                return sizes
        raise KeyError(axis)

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Choices) and self._items == other._items

    def __repr__(self) -> str:
        return f"Choices({dict(self._items)!r})"


def hidden_axis(config: Any) -> families.Axis:
    """The hidden size's axis: multiples of 8 when the full size is one (tensor-core friendly), else any size."""
    full = config.hidden_size
    return families.Axis(full, 8 if full % 8 == 0 else 1, why="a tensor-core friendly hidden size")


def axis_owners(config: Any) -> dict[str, str]:
    """{width axis: pattern character of the kind that owns it} for the kinds in the pattern (and the MTP pattern),
    over the axes the config can prune (a kind's target its config cannot shrink, e.g. shared_ffn with two shared
    experts, is left out)."""
    chars = dict.fromkeys(config.pattern + (config.mtp.pattern if config.mtp else ""))
    return {target: char for char in chars for rule in families.kind(char).width for target in rule.axes(config)}


def axes_of(config: Any) -> dict[str, families.Axis]:
    """{axis: its families.Axis}: "hidden" and every width axis the config can prune (not "depth")."""
    axes = {"hidden": hidden_axis(config)}
    for rule in dict.fromkeys(width_targets(config).values()):
        axes.update(rule.axes(config))
    return axes


def layer_counts(config: Any) -> dict[str, int]:
    """{width axis: number of layers of its kind in the main pattern}: the per-layer length of a heterogeneous size
    (and of a heterogeneous router's output); "hidden" and "depth" are global (1)."""
    counts = {axis: config.pattern.count(char) for axis, char in axis_owners(config).items()}
    return {"hidden": 1, **counts, "depth": 1}


def _nearest_allowed(axis: families.Axis, target: float) -> int:
    """The allowed size nearest to `target` (ties: the larger one)."""
    return min(axis.allowed(), key=lambda v: (abs(v - target), -v))


def _check_sizes(name: str, sizes: Any) -> tuple:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise ValueError(f"choices[{name!r}]={sizes!r} is invalid: must be a sequence of integers")
    return tuple(sizes)


def _check_depth(config: Any, sizes: tuple) -> tuple[int, ...]:
    ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in sizes)
    ascending = ok and all(a < b for a, b in zip(sizes, sizes[1:], strict=False))
    if not sizes or not ascending or sizes[0] != 0 or sizes[-1] >= config.num_layers:
        raise ValueError(f"choices['depth']={sizes!r} is invalid: must be numbers of layers to drop, strictly "
                         f"ascending from 0 (drop none), each < num_layers={config.num_layers}")
    return tuple(int(v) for v in sizes)


def make_choices(config: Any, table: Mapping[str, Sequence[int]]) -> Choices:
    """Validated `Choices` from {axis: sizes}. A width axis: strictly descending sizes, the first = the full size,
    each allowed by the axis; "depth": strictly ascending drop counts from 0. ValueError naming the axis (and the
    allowed values) otherwise, or an axis the model lacks."""
    axes = axes_of(config)
    out = {}
    for name, sizes in table.items():
        sizes = _check_sizes(name, sizes)
        if name == "depth":
            out[name] = _check_depth(config, sizes)
            continue
        if name not in axes:
            raise ValueError(f"choices[{name!r}] is invalid: the model (pattern {config.pattern!r}) has no such axis; "
                             f"its axes are {', '.join(sorted(axes))} and depth")
        axis = axes[name]
        checked = tuple(axis.check(f"choices[{name!r}]", v) for v in sizes)
        if not checked or checked[0] != axis.full or any(a <= b for a, b in zip(checked, checked[1:], strict=False)):
            raise ValueError(f"choices[{name!r}]={sizes!r} is invalid: must be strictly descending and start at the "
                             f"full size {axis.full} (index 0 = the full model)")
        out[name] = checked
    return Choices(out)


def default_choices(config: Any, fractions: Sequence[float] = DEFAULT_FRACTIONS, axes: Sequence[str] | None = None,
                    max_drop: int = 0) -> Choices:
    """Choices of every axis (or of `axes`): each fraction of the full size rounded to the nearest size the axis
    allows (a multiple of its `multiple_of`, at least its minimum), deduplicated, descending; the full size is always
    index 0. "depth" (0, 1, ..., max_drop) is included when max_drop > 0 (or `axes` names it, then max_drop must be
    > 0)."""
    known = axes_of(config)
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"fractions={tuple(fractions)!r} is invalid: each must be in (0, 1]")
    if axes is None:
        names = list(known) + (["depth"] if max_drop > 0 else [])
    else:
        names = list(axes)
    table = {}
    for name in names:
        if name == "depth":
            if not isinstance(max_drop, int) or not 0 < max_drop < config.num_layers:
                raise ValueError(f"max_drop={max_drop!r} is invalid: choices for 'depth' need an integer in "
                                 f"[1, num_layers - 1 = {config.num_layers - 1}]")
            table[name] = tuple(range(max_drop + 1))
        elif name not in known:
            raise ValueError(f"axes contains {name!r}, which the model (pattern {config.pattern!r}) lacks; its axes "
                             f"are {', '.join(sorted(known))} and depth")
        else:
            axis = known[name]
            sizes = {axis.full} | {_nearest_allowed(axis, f * axis.full) for f in fractions}
            table[name] = tuple(sorted(sizes, reverse=True))
    return make_choices(config, table)


def layer_sizes(config: Any, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per main-pattern layer: {width target of its kind: that layer's value} for the targets in `values` (one
    value for every layer of the kind, or a sequence / [n] array with one per layer of it in pattern order)."""
    owners = axis_owners(config)
    seen: dict[str, int] = {}
    out = []
    for char in config.pattern:
        j = seen.get(char, 0)
        seen[char] = j + 1
        layer = {}
        for axis, owner in owners.items():
            if owner == char and axis in values:
                value = values[axis]
                layer[axis] = value[j] if isinstance(value, (tuple, list)) or np.ndim(value) == 1 else value
        out.append(layer)
    return out
