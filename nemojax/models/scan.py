"""Scanned layer stacks: the repeats in a hybrid pattern, and the params layout they imply.

With `config.runtime.scan_layers` the NemotronH stack runs its repeated runs of layers as `jax.lax.scan` (flax
`nn.scan`), as MaxText's `scan_layers` does for uniform stacks, and the layers outside any run unrolled. XLA then
compiles one copy of each run's body (forward and backward) instead of every layer. Hybrid patterns repeat at two
scales, so a run's body may itself hold runs:

    Nemotron-H-8B  "M" + "-M" x 3 + ("*" + "-M" x 5) x 4 + "-"
    plan           ("M", Run(("-", "M"), 3), Run(("*", Run(("-", "M"), 5)), 4), "-")
                   7 blocks to compile ("M-M*-M-") instead of 52: 3 Mamba mixers instead of 24

A plan is a sequence of segments: a layer kind (one character of the pattern) or a `Run` of `repeats` copies of a
body sequence. `find_plan` picks the plan with the least compile work (each kind's `compile_cost` per compiled
block).

Params layouts (plain nested dicts; `to_scanned` / `to_unrolled` convert exactly, both ways, whatever a layer
holds):

    unrolled (the checkpoint names)     scanned
    layers_{i}/...                      layers_{i}/...            a layer outside any run (unchanged)
                                        layers_scan_{i}/...       a run starting at layer i; inside it
                                            slot_{j}/...          body position j: one layer, leaves [R, ...]
                                            scan_{j}/...          body position j: a nested run, [R, R', ...]

Everything else (embeddings, norm_f, lm_head, mtp) is shared. A top-level run's stacked axis has the logical axis
name `layers`, which the sharding rules leave unsharded; a nested run's axis is unnamed (None), so also unsharded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp

from nemojax import families

MIN_REPEATS = 2
# A scan adds a little compile work to its body's (its loop and stacked slices); each kind's own is
# `LayerKind.compile_cost`.
SCAN_COST = 0.5

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Run:
    """`repeats` copies of `body` (a tuple of segments: layer kinds or nested runs), back to back."""

    body: tuple[Segment, ...]
    repeats: int

    @property
    def period(self) -> str:
        """The pattern of one repeat."""
        return "".join(pattern_of(s) for s in self.body)


Segment = Union[str, Run]  # noqa: UP007 (a runtime alias used in a forward reference above)


def pattern_of(segment: Segment) -> str:
    """The layer kinds a segment covers."""
    return segment if isinstance(segment, str) else segment.period * segment.repeats


def compile_cost(segments: tuple[Segment, ...]) -> float:
    """The compile work of a sequence: each layer kind once per place it appears, a run's body once."""
    return sum(families.kind(s).compile_cost if isinstance(s, str) else SCAN_COST + compile_cost(s.body)
               for s in segments)


def compiled_blocks(segments: tuple[Segment, ...]) -> str:
    """The layer kinds XLA compiles, in order (a run's body once)."""
    return "".join(s if isinstance(s, str) else compiled_blocks(s.body) for s in segments)


@functools.cache
def _best(pattern: str) -> tuple[float, tuple[Segment, ...]]:
    """The cheapest plan of `pattern`: its first segment is one layer, or a run of r >= 2 copies of a prefix."""
    if not pattern:
        return 0.0, ()
    cost, rest = _best(pattern[1:])
    best = (families.kind(pattern[0]).compile_cost + cost, (pattern[0], *rest))
    for period_len in range(1, len(pattern) // MIN_REPEATS + 1):
        period = pattern[:period_len]
        repeats = 1
        while pattern.startswith(period, repeats * period_len):
            repeats += 1
        if repeats < MIN_REPEATS:
            continue
        body_cost, body = _best(period)
        for r in range(MIN_REPEATS, repeats + 1):
            cost, rest = _best(pattern[r * period_len:])
            candidate = (SCAN_COST + body_cost + cost, (Run(body, r), *rest))
            if candidate[0] < best[0] - 1e-9:
                best = candidate
    return best


def find_plan(pattern: str) -> tuple[Segment, ...] | None:
    """The plan of `pattern` with the least compile work, or None when no run of layers repeats (nothing to scan).

    "M-M*-MM-" -> ("M", "-", "M", "*", "-", Run(("M",), 2), "-").
    """
    plan = _best(pattern)[1]
    return plan if any(isinstance(s, Run) for s in plan) else None


def plan(pattern: str) -> tuple[Segment, ...]:
    """`find_plan` that raises a ValueError when the pattern has nothing to scan."""
    found = find_plan(pattern)
    if found is None:
        raise ValueError(f"runtime.scan_layers=True is invalid for pattern={pattern!r}: no run of layers repeats at "
                         f"least {MIN_REPEATS} times; use runtime.scan_layers=False")
    return found


def top_level_name(segment: Segment, position: int) -> str:
    """The params key of a top-level segment starting at layer `position`."""
    return f"layers_{position}" if isinstance(segment, str) else f"layers_scan_{position}"


def inner_name(segment: Segment, position: int) -> str:
    """The params key of a segment at body position `position` of a run."""
    return f"slot_{position}" if isinstance(segment, str) else f"scan_{position}"


def _pack(segments: tuple[Segment, ...], layers: list[Any], name) -> Params:
    """The params of the layers a sequence covers (in order) -> that sequence's scanned tree."""
    out, position = {}, 0
    for segment in segments:
        if isinstance(segment, str):
            out[name(segment, position)] = layers[position]
            position += 1
            continue
        size = len(segment.period)
        repeats = [_pack(segment.body, layers[position + r * size:position + (r + 1) * size], inner_name)
                   for r in range(segment.repeats)]
        out[name(segment, position)] = jax.tree.map(lambda *xs: jnp.stack(xs), *repeats)
        position += size * segment.repeats
    return out


def _unpack(segments: tuple[Segment, ...], tree: Mapping[str, Any], name, where: str) -> list[Any]:
    """Inverse of `_pack`: a sequence's scanned tree -> the params of its layers, in order."""
    layers, position = [], 0
    for segment in segments:
        key = name(segment, position)
        if key not in tree:
            raise ValueError(f"params are not in the scanned layout: {where}{key} is missing")
        if isinstance(segment, str):
            layers.append(tree[key])
            position += 1
            continue
        stacked = tree[key]
        bad = [x.shape for x in jax.tree.leaves(stacked) if not x.shape or x.shape[0] != segment.repeats]
        if bad:
            raise ValueError(f"{where}{key} leaves must have a leading layers axis of {segment.repeats}; found "
                             f"shapes {bad[:3]}")
        for r in range(segment.repeats):
            layers += _unpack(segment.body, jax.tree.map(lambda x, r=r: x[r], stacked), inner_name,
                              f"{where}{key}/")
        position += len(segment.period) * segment.repeats
    return layers


def _is_layer_key(key: str) -> bool:
    return key.startswith("layers_") and (key[7:].isdigit() or key.startswith("layers_scan_"))


def to_scanned(pattern: str, params: Mapping[str, Any]) -> Params:
    """Unrolled params (`layers_{i}` for every pattern index i) -> the scanned layout of `plan(pattern)`.

    Every leaf x of the layers in a run is stacked into [repeats, *x.shape] (once more per nested run); the layers
    a stack joins are of one kind, so they have one tree structure. Other entries pass through untouched.
    """
    segments = plan(pattern)
    missing = [f"layers_{i}" for i in range(len(pattern)) if f"layers_{i}" not in params]
    scanned = [k for k in params if k.startswith("layers_scan_")]
    if missing or scanned:
        raise ValueError(f"params are not in the unrolled layout of pattern={pattern!r}: "
                         + (f"missing {missing}" if missing else f"found {scanned}"))
    out = {k: v for k, v in params.items() if not _is_layer_key(k)}
    out.update(_pack(segments, [params[f"layers_{i}"] for i in range(len(pattern))], top_level_name))
    return out


def to_unrolled(pattern: str, params: Mapping[str, Any]) -> Params:
    """Scanned params (see `to_scanned`) -> the unrolled `layers_{i}` layout (slices `leaf[r]` of each stack)."""
    segments = plan(pattern)
    layers = _unpack(segments, params, top_level_name, "")
    out = {k: v for k, v in params.items() if not _is_layer_key(k)}
    out.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
    return out
