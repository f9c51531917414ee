"""Post-training quantization (PTQ): calibrate the frozen quantization state of a model (docs/formats.md 6).

    student = quant.calibrate(quant.apply(model, "nvfp4"), batches)                  # "max"
    student = quant.calibrate(quant.apply(model, "nemotron3_super_nvfp4"), batches, method="mse")

Input (and KV) amaxes: the running max of |x| over the calibration batches, collected with the quantizers off
(the layers run in high precision, as ModelOpt's calibration forward does). Weights: "max" sets the per-tensor
amax to max|W|; "mse" searches it (candidates initial amax x 0.25..4, least squared quantization error) and, for
weights with static NVFP4 block scales, tries every finite E4M3 value per 16-block and keeps the best. The
parts of one checkpoint module (the Mamba mixer's in_proj_z ... in_proj_dt, fused as `in_proj` in checkpoints)
are calibrated together, on their concatenated weight, and share its amax, as ModelOpt calibrates `in_proj`;
block scales are per column, so each part keeps its own columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from nemojax.data.batch_tokens import batch_tokens
from nemojax.interop.naming import fused_parts
from nemojax.lowp.recipe import CALIBRATION
from nemojax.model import Model, apply
from nemojax.quant import mse

METHODS = ("max", "mse")
f32 = jnp.float32


def _tokens(batch: Any) -> jax.Array:
    return jnp.asarray(batch_tokens(batch, "calibrate"))  # a pipeline dict batch or [b, L] tokens


def activation_amaxes(model: Model, batches: Iterable[Any]) -> dict[tuple[str, ...], jax.Array]:
    """{state path: running max |x|} of every quantized input (and KV cache) over `batches` ([b, L] tokens or
    dicts with "tokens"), e.g. ("layers_0", "mixer", "in_proj_x", "kernel_input_amax") -> scalar."""
    @jax.jit
    def stats(params, tokens):
        return flatten_dict(apply(model.config, params, tokens, collect=(CALIBRATION,)).collected[CALIBRATION])

    running: dict[tuple[str, ...], jax.Array] = {}
    count = 0
    for batch in batches:
        for path, value in stats(model.params, _tokens(batch)).items():
            value = jnp.asarray(value[0] if isinstance(value, tuple) else value)
            running[path] = value if path not in running else jnp.maximum(running[path], value)
        count += 1
    if count == 0:
        raise ValueError("calibrate needs at least one batch; got an empty iterable")
    return running


def _weight_for(path: tuple[str, ...], flat: dict) -> tuple[tuple[str, ...], str]:
    """(weight path, state kind) of a state leaf `M/W_amax` or `M/W_block_scale`."""
    name = path[-1]
    for suffix, kind in (("_block_scale", "block_scale"), ("_amax", "amax")):
        if name.endswith(suffix) and not name.endswith("_input_amax"):
            weight = (*path[:-1], name[: -len(suffix)])
            if weight in flat:
                return weight, kind
    raise ValueError(f"quantization state {'/'.join(path)} has no weight beside it")


def _weight_state(w: jax.Array, fmt: str, method: str, block_scales: bool) -> tuple[jax.Array, jax.Array | None]:
    """(per-tensor amax, static NVFP4 block scales or None) of a kernel [in, out] or stacked experts [E, in, out]
    (one amax per expert), contraction axis `in`."""

    def one(w_io: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        amax = mse.mse_amax(w_io, fmt, axis=0) if method == "mse" else jnp.max(jnp.abs(w_io))
        scales = mse.nvfp4_mse_block_scales(w_io, axis=0, amax=amax, fmt=fmt) if block_scales else None
        return amax.astype(f32), None if scales is None else jnp.asarray(scales, f32)

    return jax.vmap(one)(w) if w.ndim == 3 else one(w)


def _calibrate_weight(flat: dict, parts: list[tuple[tuple[str, ...], jax.Array, tuple[str, ...] | None, str]],
                      method: str) -> None:
    """Sets the amax leaf (and block scales) of each part (amax path, weight [in, out_i] or stacked experts,
    block-scale path or None, format; one format for all), calibrated on the weights concatenated along `out`:
    one shared amax, each part its own block-scale columns."""
    weights = [w for _, w, _, _ in parts]
    w = weights[0] if len(weights) == 1 else jnp.concatenate(weights, axis=-1)
    amax, scales = _weight_state(w, parts[0][3], method, parts[0][2] is not None)
    cuts = np.cumsum([x.shape[-1] for x in weights])[:-1]
    for i, (path, _, block, _) in enumerate(parts):
        flat[path] = amax
        if scales is not None:
            flat[block] = jnp.split(scales, cuts, axis=-1)[i].reshape(flat[block].shape)


def calibrate(model: Model, batches: Iterable[Any] | None = None, *, method: str = "max") -> Model:
    """`model` (with a recipe; see `quant.apply`) with its quantization state calibrated.

    batches: token arrays [b, L] (or dicts with "tokens") for the input and KV amaxes; may be None when the
    recipe has no static input amaxes (weight-only). method: "max" or "mse" (weights; see the module docstring).
    """
    config = model.config
    if config.runtime.quant is None:
        raise ValueError("model.config.runtime.quant is None: apply a recipe first (nemojax.quant.apply)")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is invalid: must be one of {METHODS}")
    flat = dict(flatten_dict(model.params))
    wants_inputs = any(p[-1].endswith("_input_amax") or p[-1] in ("k_amax", "v_amax") for p in flat)
    if wants_inputs:
        if batches is None:
            raise ValueError(f"recipe {config.runtime.quant.name!r} has static input amaxes: pass calibration batches")
        for path, value in activation_amaxes(model, batches).items():
            if path not in flat:
                raise ValueError(f"calibration produced {'/'.join(path)}, which the params do not hold")
            flat[path] = value.astype(f32).reshape(flat[path].shape)

    groups: dict[tuple[str, ...], list[tuple[str, ...]]] = {}  # weight amaxes, the parts of a fused module together
    parts = fused_parts()
    for path in flat:
        name = path[-1]
        if not name.endswith("_amax") or name.endswith("_input_amax") or name in ("k_amax", "v_amax"):
            continue
        fused = len(path) > 1 and path[-2] in parts
        key = (*path[:-2], parts[path[-2]][0], name) if fused else path
        groups.setdefault(key, []).append(path)
    for paths in groups.values():
        parts = []  # (amax path, weight, block-scale path or None, format) per part
        for path in paths:
            weight_path, _ = _weight_for(path, flat)
            layer = "/".join(weight_path[:-1]) if weight_path[-1] == "kernel" else "/".join(weight_path)
            block_path = (*weight_path[:-1], f"{weight_path[-1]}_block_scale")
            if block_path in flat and method != "mse":
                raise ValueError(f"{'/'.join(block_path)}: static NVFP4 block scales are chosen by MSE search; "
                                 "calibrate with method='mse'")
            parts.append((path, flat[weight_path].astype(f32), block_path if block_path in flat else None,
                          config.runtime.quant.linear(layer, config.pattern).weight.fmt))
        if len({(fmt, block is None) for _, _, block, fmt in parts}) > 1:  # parts quantized differently
            for part in parts:
                _calibrate_weight(flat, [part], method)
        else:
            _calibrate_weight(flat, parts, method)
    return Model(config, unflatten_dict(flat))


def calibration_report(model: Model) -> dict[str, float]:
    """{state path: value} of the scalar calibrated amaxes (for logs); per-expert entries report their max."""
    return {"/".join(p): float(np.max(np.asarray(v))) for p, v in flatten_dict(model.params).items()
            if p[-1].endswith("_amax")}
