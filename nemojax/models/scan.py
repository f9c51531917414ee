"""Scanned layer stacks: the repeating period of a hybrid pattern, and the params layouts it implies.

With `ModelConfig.scan_layers` the NemotronH stack runs as a `jax.lax.scan` (flax `nn.scan`) over `repeats` copies
of one `period` of the pattern, with the layers before and after it unrolled, as MaxText's `scan_layers` does for
uniform stacks. XLA then compiles one period's blocks (forward and backward) instead of every layer's.

    pattern "M-M-M-M*-M-M-M-M-M*-M-..."  ->  prefix layers [0, start), period pattern[start:start + P] run
                                              `repeats` times, suffix layers [start + repeats * P, n)

Params layouts (both plain nested dicts; `to_scanned` / `to_unrolled` convert exactly, both ways):

    unrolled (the checkpoint names)         scanned
    layers_{i}/...         i < start        layers_{i}/...                      (unchanged)
    layers_{start + r*P + j}/...            layers_scan/slot_{j}/...  [repeats, ...]  (leaf stacked over r)
    layers_{i}/...         i >= stop        layers_{i}/...                      (unchanged)

Everything else (embeddings, norm_f, lm_head, mtp) is shared. The stacked leading axis carries the logical axis
name `layers`, which the sharding rules leave unsharded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

SCAN_KEY = "layers_scan"
MIN_REPEATS = 2


def slot_name(j: int) -> str:
    """The scanned params' name of position j of the period."""
    return f"slot_{j}"


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """Layers [start, stop) run as `repeats` scan steps of `period`; the others stay unrolled."""

    num_layers: int
    start: int
    period: str
    repeats: int

    @property
    def stop(self) -> int:
        return self.start + self.repeats * len(self.period)

    @property
    def prefix(self) -> range:
        return range(self.start)

    @property
    def suffix(self) -> range:
        return range(self.stop, self.num_layers)

    @property
    def unrolled(self) -> tuple[int, ...]:
        """Indices of the layers outside the scan."""
        return (*self.prefix, *self.suffix)

    @property
    def compiled_blocks(self) -> int:
        """Blocks XLA compiles: the unrolled ones plus one period."""
        return len(self.prefix) + len(self.period) + len(self.suffix)

    def layer(self, r: int, j: int) -> int:
        """The pattern index of repeat r, period position j."""
        return self.start + r * len(self.period) + j


def find_plan(pattern: str) -> ScanPlan | None:
    """The scan of `pattern` that leaves XLA the fewest blocks to compile (unrolled layers + one period), among
    runs of a period repeated at least twice; ties go to the longer run, then the shorter period, then the earlier
    start. None when no period repeats.

    "M-M*-MM-" -> start 0, period "M-", 2 repeats (6 blocks compiled instead of 8).
    """
    n = len(pattern)
    best, best_key = None, None
    for period_len in range(1, n // MIN_REPEATS + 1):
        for start in range(n - MIN_REPEATS * period_len + 1):
            period = pattern[start:start + period_len]
            repeats = 1
            while pattern[start + repeats * period_len:start + (repeats + 1) * period_len] == period:
                repeats += 1
            if repeats < MIN_REPEATS:
                continue
            plan = ScanPlan(n, start, period, repeats)
            key = (plan.compiled_blocks, -repeats * period_len, period_len, start)
            if best_key is None or key < best_key:
                best, best_key = plan, key
    return best


def plan(pattern: str) -> ScanPlan:
    """`find_plan` that raises a ValueError when the pattern has no period to scan over."""
    found = find_plan(pattern)
    if found is None:
        raise ValueError(f"scan_layers=True is invalid for pattern={pattern!r}: no run of layers repeats at least "
                         f"{MIN_REPEATS} times; use scan_layers=False")
    return found


Params = dict[str, Any]


def to_scanned(pattern: str, params: Mapping[str, Any]) -> Params:
    """Unrolled params (`layers_{i}` for every pattern index i) -> the scanned layout of `plan(pattern)`.

    Generic over what a layer holds: every leaf x of the layers in the scanned run is stacked into
    [repeats, *x.shape]; the layers of one slot have one tree structure, as they are of one kind. Other entries
    pass through untouched.
    """
    p = plan(pattern)
    missing = [f"layers_{i}" for i in range(p.num_layers) if f"layers_{i}" not in params]
    if missing or SCAN_KEY in params:
        raise ValueError(f"params are not in the unrolled layout of pattern={pattern!r}: "
                         + (f"missing {missing}" if missing else f"found {SCAN_KEY!r}"))
    run = {f"layers_{p.layer(r, j)}" for r in range(p.repeats) for j in range(len(p.period))}
    out = {k: v for k, v in params.items() if k not in run}
    out[SCAN_KEY] = {
        slot_name(j): jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{p.layer(r, j)}"]
                                                                 for r in range(p.repeats)])
        for j in range(len(p.period))
    }
    return out


def to_unrolled(pattern: str, params: Mapping[str, Any]) -> Params:
    """Scanned params (see `to_scanned`) -> the unrolled `layers_{i}` layout; slices `leaf[r]` of each stacked leaf."""
    p = plan(pattern)
    slots = params.get(SCAN_KEY)
    expected = {slot_name(j) for j in range(len(p.period))}
    if not isinstance(slots, Mapping) or set(slots) != expected:
        raise ValueError(f"params are not in the scanned layout of pattern={pattern!r}: {SCAN_KEY!r} must hold "
                         f"{sorted(expected)}, found {sorted(slots) if isinstance(slots, Mapping) else slots!r}")
    for name, tree in slots.items():
        bad = [x.shape for x in jax.tree.leaves(tree) if not x.shape or x.shape[0] != p.repeats]
        if bad:
            raise ValueError(f"{SCAN_KEY}/{name} leaves must have a leading layers axis of {p.repeats}; found "
                             f"shapes {bad[:3]}")
    out = {k: v for k, v in params.items() if k != SCAN_KEY}
    for r in range(p.repeats):
        for j in range(len(p.period)):
            out[f"layers_{p.layer(r, j)}"] = jax.tree.map(lambda x, r=r: x[r], slots[slot_name(j)])
    return out
