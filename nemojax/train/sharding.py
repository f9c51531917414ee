"""Meshes and logical-axis sharding rules: one code path from one CPU to a pod.

Mesh axes are `data, fsdp, tensor, expert` (explicit `AxisType.Auto`). Every param carries logical axis names
(`nemojax.logical_axes`), and so do the key activations (`act_*`); `RULES` maps them onto mesh axes:

    batch        -> (data, fsdp, expert)    the batch is split over every axis but tensor
    embed        -> fsdp                    ZeRO-3 style: params and optimizer state sharded over fsdp
    vocab, mlp, heads, kv_heads, ssm_heads, ssm_groups -> tensor   Megatron-style tensor parallelism
    experts      -> expert                  expert parallelism
    act_mlp, act_heads -> tensor; everything else replicated

A dimension that a mesh axis does not divide is replicated along that axis instead of failing, so a tiny model
runs on any mesh. Mamba dimensions are split only between whole heads (`ssm_heads`: H heads of P channels, or H
scalars) or whole groups (`ssm_groups`: the G groups of N channels of B and C): a tensor degree that does not
divide G replicates B and C (and their convs) while z, x and dt still shard by heads, and one that does not divide
H replicates the mixer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from nemojax.config import ModelConfig
from nemojax.model import logical_axes

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("ssm_heads", "tensor"),
    ("ssm_groups", "tensor"),
    ("experts", "expert"),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_embed", None),
    ("seq", None),
    ("head_dim", None),
    ("conv", None),
    ("ssm_state", None),
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over MESH_AXES; `shape` gives each axis a size (missing axes 1, one axis may be -1 for the rest).

    make_mesh({"fsdp": -1}) puts every device on fsdp; make_mesh({"data": 2, "tensor": 4}) is 2-way DP x 4-way TP.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are invalid: must be among {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ValueError(f"mesh shape {dict(shape)} is invalid: sizes must be positive or -1")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh shape {dict(shape)} is invalid: at most one axis may be -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(f"mesh shape {dict(shape)}: {len(devices)} devices do not divide by {known}")
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices) or any(size < 1 for size in sizes.values()):
        raise ValueError(f"mesh shape {sizes} is invalid: needs {math.prod(sizes.values())} devices, "
                         f"{len(devices)} available")
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh,
         units: tuple[int | None, ...] | None = None) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (those dimensions are replicated instead). `units[i]`,
    where given, is how many indivisible units (heads, groups) dimension i holds: the axes must divide that."""
    units = units or (None,) * len(shape)
    fitted = []
    for dim, unit, axes in zip(shape, units, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        count = dim if unit is None else unit
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, size = [], 1
        for name in names:
            if count % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def _units(config: ModelConfig) -> dict[str, int]:
    """Logical axes whose dimensions split only between whole units: {axis name: number of units}."""
    if config.mamba is None:
        return {}
    return {"ssm_heads": config.mamba.num_heads, "ssm_groups": config.mamba.n_groups}


def param_shardings(config: ModelConfig, mesh: Mesh, params_shape: Any,
                    rules: Sequence[tuple[str, Any]] = RULES) -> Any:
    """NamedShardings for a params tree (or its ShapeDtypeStructs) of `config`, by the logical rules."""
    logical = logical_axes(config)
    rules = tuple(rules)
    units = _units(config)

    def to_sharding(spec: PartitionSpec, leaf: Any) -> NamedSharding:
        physical = nn.logical_to_mesh_axes(tuple(spec), rules)
        dims = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        return NamedSharding(mesh, _fit(physical, tuple(leaf.shape), mesh, tuple(units.get(d) for d in dims)))

    return jax.tree.map(to_sharding, logical, params_shape,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def opt_state_shardings(optimizer: optax.GradientTransformation, params_shape: Any, params_sharding: Any,
                        mesh: Mesh) -> Any:
    """Optimizer state placed like the params it mirrors (Adam's mu and nu); scalars replicated. The state of a
    transform that sees part of the params (`optax.multi_transform`, `optax.masked`) keeps its MaskedNode leaves."""
    state_shape = jax.eval_shape(optimizer.init, params_shape)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(value: Any, sharding: NamedSharding) -> Any:
        return value if isinstance(value, optax.MaskedNode) else sharding

    return optax.tree_map_params(optimizer, place, state_shape, params_sharding,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """`[B, L]` arrays split over B by every axis but tensor."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
