"""The analytic cost of an elastic submodel, written in jnp so that every size may be a float (an expected size
sum_i pi_i * choice_i) and the cost differentiable in it: the parameter counter of Nemotron Elastic's router loss
(arXiv 2511.16664 sec. 3), for the hybrid pattern's Mamba-2, attention, MLP and MoE layers and the MTP head.

    n = count(config, {"hidden": 48, "ffn": 96, "depth": 2}, removal_order=(5, 3))        # params, a jnp scalar
    n = count(config, {"ffn": (128, 96, 128)})                                            # one size per '-' layer
    b = count(config, sizes, kind="memory", context=131072)                               # bytes

Sizes: {axis: size}. A width axis (`nemojax.elastic.choices`) takes one size for every layer of its kind (an int or
a float) or one per layer of its kind, in pattern order (a tuple or a 1-d array: heterogeneous; "hidden" is always
one global size). The MTP head's layers take the single size; with per-layer sizes they keep the full size, unless
the tuple also lists them (after the main pattern's, depth by depth). A missing axis keeps its full size.
"depth": the number of dropped layers, the first `depth` entries of `removal_order` (an int, possibly traced), or
per-layer keep probabilities gamma [num_layers] in [0, 1] (the expected cost over a depth distribution; see
`nemojax.elastic.router.expected_sizes`). A dropped layer costs nothing; the MTP head is never dropped.

kind:
  "params"         every parameter; for integer sizes exactly `nemojax.param_count(pruned_config(config, ...))`
                   (`count_exact` gives the int, float64-exact for full-size models).
  "active_params"  the parameters one token passes through: as "params", but each MoE layer counts top_k routed
                   experts instead of all of them (its router, latent projections and shared experts count whole),
                   and the MTP head counts like the main stack. The project had no active count before this one.
  "memory"         bytes of serving `batch` sequences of `context` tokens: weights at `weight_dtype`'s itemsize
                   (the float32-pinned MoE router at 4 bytes) + KV cache + Mamba SSM and conv states, exactly
                   `nemojax.infer.memory.cache_bytes(pruned config, ...).total` for integer sizes (`mtp`: also the MTP
                   head's caches, as cache_bytes(mtp=True)).

Each layer kind's formulas are one `KindCount` in `COUNTS` (keyed by pattern character); a new kind registers its
own with `register_count`. A dropped or per-layer size enters linearly: the cost is the sum over layers of
keep_l * cost_l(sizes_l), so expected keep probabilities give the expected cost exactly.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax import families
from nemojax.compress.prune import width_targets
from nemojax.elastic.choices import axis_owners

__all__ = ["COUNTS", "KINDS", "KindCount", "check_sizes", "count", "count_exact", "keep_weights", "register_count"]

KINDS = ("params", "active_params", "memory")
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KindCount:
    """The cost formulas of one layer kind's mixer (the block's pre-norm is added by the caller).

    Each is called as f(config, D, s): D the hidden size (a scalar), s {axis: array [n]} the sizes of the kind's
    width axes for n layers (every axis of the kind present; float arrays), and returns an array [n] (or a scalar
    that broadcasts). params: parameter count. active: parameters one token passes through (None: = params).
    pinned_f32: parameters stored in float32 whatever the weight dtype (None: none). cache(config, D, s, batch,
    context, itemsize) -> {"kv" | "ssm" | "conv" | ...: bytes [n]}, matching the kind's `LayerKind.cache_bytes`
    (None: stateless)."""

    params: Callable[..., Any]
    active: Callable[..., Any] | None = None
    pinned_f32: Callable[..., Any] | None = None
    cache: Callable[..., dict[str, Any]] | None = None


COUNTS: dict[str, KindCount] = {}


def register_count(char: str, entry: KindCount) -> KindCount:
    """Adds the cost formulas of layer kind `char` (one pattern character)."""
    COUNTS[char] = entry
    return entry


def _linear(n_in: Any, n_out: Any, bias: bool) -> Any:
    """An [n_in, n_out] kernel and its optional bias."""
    return n_in * n_out + (n_out if bias else 0)


# ---------------------------------------------------------------------------------------------- built-in kinds


def _mamba_params(config, D, s):
    """in_proj (z, x: I each; B, C: G*N each; dt: H), depthwise convs of x, B, C (K taps + bias), A_log, D,
    dt_bias (H each), the gated norm (I) and out_proj; I = H * P."""
    m = config.mamba
    H, P = s["mamba_heads"], s["mamba_head_dim"]
    inner, gn = H * P, m.n_groups * m.state_size
    conv_channels = inner + 2 * gn
    conv = m.conv_kernel * conv_channels + (conv_channels if m.use_conv_bias else 0)
    return _linear(D, 2 * inner + 2 * gn + H, m.proj_bias) + conv + 3 * H + inner + _linear(inner, D, m.proj_bias)


def _mamba_cache(config, D, s, batch, context, itemsize):
    """ssm [b, H, P, N] float32 and conv [b, K-1, I + 2GN] in the cache dtype (neither depends on the context)."""
    m = config.mamba
    H, P = s["mamba_heads"], s["mamba_head_dim"]
    return {"ssm": batch * H * P * m.state_size * 4,
            "conv": batch * (m.conv_kernel - 1) * (H * P + 2 * m.n_groups * m.state_size) * itemsize}


def _attention_params(config, D, s):
    """q and o over heads * head_dim, k and v over num_kv_heads * head_dim (pruning keeps the KV heads)."""
    a = config.attention
    q = s["heads"] * a.head_dim
    kv = a.num_kv_heads * a.head_dim
    return _linear(D, q, a.bias) + 2 * _linear(D, kv, a.bias) + _linear(q, D, a.bias)


def _attention_cache(config, D, s, batch, context, itemsize):
    a = config.attention
    return {"kv": 2 * batch * context * a.num_kv_heads * a.head_dim * itemsize}


def _mlp_params(config, D, s):
    return _linear(D, s["ffn"], config.mlp_bias) + _linear(s["ffn"], D, config.mlp_bias)


def _moe_router(config, D, s):
    """The gate kernel [D, E] and its score-correction bias [E], both pinned to float32."""
    return D * s["experts"] + s["experts"]


def _moe_dense(config, D, s):
    """Everything of an MoE layer but its routed experts: router, latent projections, shared experts."""
    e = config.moe
    total = _moe_router(config, D, s)
    if e.latent_size is not None:
        total = total + _linear(D, e.latent_size, config.mlp_bias) + _linear(e.latent_size, D, config.mlp_bias)
    if e.n_shared_experts:
        shared = e.n_shared_experts * s.get("shared_ffn", e.shared_intermediate_size)
        total = total + _linear(D, shared, config.mlp_bias) + _linear(shared, D, config.mlp_bias)
    return total


def _moe_expert(config, D, s):
    """One routed expert: up [D_in, F] and down [F, D_in], D_in = latent_size or D."""
    d_in = config.moe.latent_size or D
    return 2 * d_in * s["expert_ffn"]


def _moe_params(config, D, s):
    return _moe_dense(config, D, s) + s["experts"] * _moe_expert(config, D, s)


def _moe_active(config, D, s):
    return _moe_dense(config, D, s) + config.moe.top_k * _moe_expert(config, D, s)


register_count("M", KindCount(params=_mamba_params, cache=_mamba_cache))
register_count("*", KindCount(params=_attention_params, cache=_attention_cache))
register_count("-", KindCount(params=_mlp_params))
register_count("E", KindCount(params=_moe_params, active=_moe_active, pinned_f32=_moe_router))


# ---------------------------------------------------------------------------------------------- sizes


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _concrete_ints(value: Any) -> list[int] | None:
    """The values as Python ints when `value` is an int or a tuple/list of ints (then they are checked), else
    None (floats, arrays, tracers: checked by shape only)."""
    if _is_int(value):
        return [int(value)]
    if isinstance(value, (tuple, list)) and value and all(_is_int(v) for v in value):
        return [int(v) for v in value]
    return None


def _axes(config: Any) -> dict[str, families.Axis]:
    """prune's axes: "hidden" (any size, as `pruned_config` accepts) and each width target's."""
    axes = {"hidden": families.Axis(config.hidden_size)}
    for rule in dict.fromkeys(width_targets(config).values()):
        axes.update(rule.axes(config))
    return axes


def check_sizes(config: Any, sizes: Mapping[str, Any]) -> None:
    axes = _axes(config)
    for name, value in sizes.items():
        if name == "depth":
            continue
        if name not in axes:
            raise ValueError(f"sizes[{name!r}] is invalid: the model (pattern {config.pattern!r}) has no such axis; "
                             f"its axes are {', '.join(sorted(axes))} and depth")
        if name == "hidden" and np.ndim(value) != 0:
            raise ValueError(f"sizes['hidden'] is invalid: the hidden size is global, give one scalar (got shape "
                             f"{np.shape(value)})")
        for v in _concrete_ints(value) or ():
            axes[name].check(f"sizes[{name!r}]", v)


def _per_layer(xp, name: str, value: Any, full: int, n: int, m: int) -> Any:
    """The sizes of axis `name` for the n main-pattern and m MTP layers of its kind -> [n + m] float."""
    if value is None:
        return xp.full((n + m,), float(full))
    value = xp.asarray(value, dtype=xp.float64 if xp is np else f32)
    if value.ndim == 0:
        return xp.broadcast_to(value, (n + m,))
    if value.ndim == 1 and value.shape[0] == n:
        return xp.concatenate([value, xp.full((m,), float(full), dtype=value.dtype)])
    if value.ndim == 1 and value.shape[0] == n + m:
        return value
    lengths = f"{n}" + (f" (or {n + m} with the MTP head's layers)" if m else "")
    raise ValueError(f"sizes[{name!r}] has shape {list(value.shape)}: give one size, or one per layer of its kind: "
                     f"{lengths}")


def _check_removal_order(config: Any, removal_order: Sequence[int]) -> np.ndarray:
    order = [int(i) for i in removal_order]
    if len(set(order)) != len(order) or any(not 0 <= i < config.num_layers for i in order):
        raise ValueError(f"removal_order={list(removal_order)!r} is invalid: must be distinct layer indices in "
                         f"[0, {config.num_layers - 1}]")
    return np.asarray(order, np.int64)


def keep_weights(xp, config: Any, depth: Any, removal_order: Sequence[int]) -> Any:
    """Per-layer keep weights [num_layers]: 1 for every layer when depth is None; for a drop count d (int or 0-d
    array) 0 for the first d layers of removal_order; gamma itself for a 1-d array."""
    L = config.num_layers
    dtype = xp.float64 if xp is np else f32
    if depth is None:
        return xp.ones((L,), dtype)
    order = _check_removal_order(config, removal_order)
    if np.ndim(depth) == 1:
        gamma = xp.asarray(depth, dtype)
        if gamma.shape != (L,):
            raise ValueError(f"sizes['depth'] has shape {list(gamma.shape)}: per-layer keep probabilities need "
                             f"[num_layers={L}]")
        return gamma
    if np.ndim(depth) != 0:
        raise ValueError("sizes['depth'] must be a number of dropped layers or keep probabilities [num_layers]")
    if _is_int(depth) and not 0 <= int(depth) <= min(len(order), L - 1):
        raise ValueError(f"sizes['depth']={depth!r} is invalid: must be in [0, {min(len(order), L - 1)}] (the "
                         f"removal order has {len(order)} layers; at least one layer stays)")
    if isinstance(depth, (float, np.floating)) and not float(depth).is_integer():
        raise ValueError(f"sizes['depth']={depth!r} is invalid: a number of layers; pass keep probabilities "
                         "[num_layers] for an expected depth")
    position = np.full((L,), L, np.int64)  # a layer outside the removal order is never dropped
    position[order] = np.arange(len(order))
    return (xp.asarray(position) >= depth).astype(dtype)


# ---------------------------------------------------------------------------------------------- the count


def _dtype_size(value: Any, field: str) -> int:
    try:
        return jnp.dtype(value).itemsize
    except TypeError:
        raise ValueError(f"{field}={value!r} is invalid: must be a dtype name such as 'bfloat16'") from None


def _layers_of(config: Any, char: str) -> tuple[np.ndarray, int]:
    """(main-pattern indices of kind `char`, its number of MTP layers over all depths)."""
    main = np.asarray([i for i, c in enumerate(config.pattern) if c == char], np.int64)
    mtp = config.mtp.pattern.count(char) * config.mtp.num_layers if config.mtp else 0
    return main, mtp


def _count(xp, config: Any, sizes: Mapping[str, Any], kind: str, removal_order: Sequence[int], context: int,
           batch: int, dtype: Any, weight_dtype: Any, mtp: bool) -> Any:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: must be one of {KINDS}")
    if config.runtime.quant is not None:
        raise ValueError("config.runtime.quant is set: count covers unquantized params only (quantization state is "
                         "not counted); count the architecture, config.architecture()")
    check_sizes(config, sizes)
    if kind == "memory":
        for name, value in (("batch", batch), ("context", context)):
            if not _is_int(value) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    dtype_ = xp.float64 if xp is np else f32
    D = xp.asarray(sizes.get("hidden", config.hidden_size), dtype_)
    keep = keep_weights(xp, config, sizes.get("depth"), removal_order)
    owners = axis_owners(config)
    params = 2 * config.vocab_size * D + D  # embedding, lm_head, norm_f
    if config.mtp is not None:  # per depth: enorm, hnorm, eh_proj [2D, D], final_layernorm
        params = params + config.mtp.num_layers * (3 * D + 2 * D * D)
    pinned = xp.zeros((), dtype_)
    cache = xp.zeros((), dtype_)
    full = _axes(config)
    itemsize = _dtype_size(dtype or config.runtime.dtype, "dtype")
    for char in dict.fromkeys(config.pattern + (config.mtp.pattern if config.mtp else "")):
        if char not in COUNTS:
            raise ValueError(f"layer kind {char!r} ({families.kind(char).name}) has no cost formulas: register them "
                             "with nemojax.elastic.count.register_count")
        entry = COUNTS[char]
        main, m = _layers_of(config, char)
        n = len(main)
        s = {axis: _per_layer(xp, axis, sizes.get(axis), full[axis].full, n, m)
             for axis, owner in owners.items() if owner == char}
        weight = xp.concatenate([keep[main], xp.ones((m,), dtype_)]) if n else xp.ones((m,), dtype_)
        formula = entry.active if kind == "active_params" and entry.active is not None else entry.params
        params = params + xp.sum(weight * (formula(config, D, s) + D))  # + the block's pre-norm
        if kind == "memory" and entry.pinned_f32 is not None:
            pinned = pinned + xp.sum(weight * entry.pinned_f32(config, D, s))
        if kind == "memory" and entry.cache is not None:
            cached = weight if mtp else xp.concatenate([keep[main], xp.zeros((m,), dtype_)])
            parts = entry.cache(config, D, s, batch, context, itemsize)
            cache = cache + sum(xp.sum(cached * part) for part in parts.values())
    if kind != "memory":
        return params
    weight_size = _dtype_size(weight_dtype or config.runtime.param_dtype, "weight_dtype")
    return (params - pinned) * weight_size + pinned * 4 + cache


def count(config: Any, sizes: Mapping[str, Any] | None = None, *, kind: str = "params",
          removal_order: Sequence[int] = (), context: int = 131072, batch: int = 1, dtype: Any = None,
          weight_dtype: Any = None, mtp: bool = False) -> jax.Array:
    """The cost of the submodel `sizes` (module docstring) as a float32 jnp scalar, differentiable in every size
    given as a float (and in depth keep probabilities).

    kind: "params" | "active_params" | "memory". removal_order: layer indices, the first sizes["depth"] of which are
    dropped. For kind="memory": context, batch, dtype (KV cache and conv state; default config.runtime.dtype),
    weight_dtype (default config.runtime.param_dtype) and mtp as `nemojax.infer.memory.cache_bytes` takes them.
    Raises ValueError naming a bad axis, size, shape, depth or removal order."""
    return _count(jnp, config, sizes or {}, kind, removal_order, context, batch, dtype, weight_dtype, mtp)


def count_exact(config: Any, sizes: Mapping[str, Any] | None = None, *, kind: str = "params",
                removal_order: Sequence[int] = (), context: int = 131072, batch: int = 1, dtype: Any = None,
                weight_dtype: Any = None, mtp: bool = False) -> int:
    """`count` of integer sizes as a Python int, computed in float64 with numpy (exact for every published model
    size, where float32 is not); same arguments."""
    value = _count(np, config, sizes or {}, kind, removal_order, context, batch, dtype, weight_dtype, mtp)
    return int(round(float(value)))
