"""Per-tensor FP8 scaling: current scaling and delayed scaling as a functional state (docs/formats.md 2).

TE convention: the scale s multiplies to quantize, s = (FP8_MAX / amax) / 2^margin, q = cast(clip(x s, +-FP8_MAX)),
x_hat = q / s. An amax that is 0 or non-finite keeps the previous scale.

Delayed scaling (flax fp8_ops / TE-JAX order): at every step the scale is computed from the amax history *before*
the current tensor's amax is written; that scale quantizes the current tensor; then the history rolls and the
current amax lands in slot 0 (most recent first). `update` does exactly this and returns the new state, whose
`scale` is the one to use for the tensor whose amax was just recorded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.lowp.formats import FLT_MAX, check_format, get_format
from nemojax.lowp.qarray import QArray

FP8_FORMATS = ("fp8_e4m3", "fp8_e5m2")
AMAX_ALGOS = ("max", "most_recent")


@dataclasses.dataclass(frozen=True)
class DelayedScaling:
    """Delayed-scaling config: history_len >= 1, algo "max" | "most_recent", margin (power of two, >= 0), fmt."""

    history_len: int = 1024
    algo: str = "max"
    margin: int = 0
    fmt: str = "fp8_e4m3"

    def __post_init__(self):
        _check_fp8(self.fmt, "fmt")
        if not isinstance(self.history_len, int) or self.history_len < 1:
            raise ValueError(f"history_len={self.history_len!r}; allowed: an int >= 1")
        if self.algo not in AMAX_ALGOS:
            raise ValueError(f"algo={self.algo!r}; allowed: {AMAX_ALGOS}")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin={self.margin!r}; allowed: an int >= 0")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["amax_history", "scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class FP8State:
    """amax_history: f32 [history_len], most recent first. scale: f32 () encode scale (multiply to quantize)."""

    amax_history: jax.Array
    scale: jax.Array

    @property
    def scale_inv(self) -> jax.Array:
        return jnp.float32(1.0) / self.scale


def _check_fp8(fmt: str, field: str = "fmt") -> None:
    check_format(fmt, field)
    if fmt not in FP8_FORMATS:
        raise ValueError(f"{field}={fmt!r}; allowed for per-tensor FP8 scaling: {FP8_FORMATS}")


def compute_scale(amax: jax.Array, prev_scale: jax.Array | float = 1.0, fmt: str = "fp8_e4m3",
                  margin: int = 0) -> jax.Array:
    """Encode scale f32 [...] = (FP8_MAX / amax) / 2^margin, capped at FLT_MAX; prev_scale if amax is 0/non-finite."""
    _check_fp8(fmt)
    amax = jnp.asarray(amax, jnp.float32)
    s = jnp.minimum((jnp.float32(get_format(fmt).elem_max) / amax) / jnp.float32(2.0**margin), jnp.float32(FLT_MAX))
    return jnp.where((amax > 0) & jnp.isfinite(amax), s, jnp.asarray(prev_scale, jnp.float32))


def _check_elements(x: jax.Array) -> None:
    if x.size == 0:
        raise ValueError(f"x has shape {x.shape} with no elements; allowed: at least one element (an empty tensor "
                         "has no amax to scale by)")


def _check_static_scale(scale) -> None:
    """A host-side encode scale (Python number, numpy scalar or array) must be finite and > 0: 0 / inf / nan turn
    every code into 0 or nan. jax arrays are not read back (quantize runs traced in training; a check would cost a
    host sync); compute_scale never produces such a scale."""
    if not isinstance(scale, int | float | np.generic | np.ndarray):
        return
    values = np.asarray(scale, np.float64)
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"scale={values.tolist()!r} is invalid; allowed: finite values > 0")


def current_amax(x: jax.Array) -> jax.Array:
    """max |x| over the finite elements of x [...], f32 ()."""
    xf = jnp.asarray(x, jnp.float32)
    return jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0))


def quantize_fp8(x: jax.Array, scale: jax.Array, fmt: str = "fp8_e4m3") -> QArray:
    """x [...] -> QArray with codes cast(clip(x * scale, +-FP8_MAX)) and decode scale 1/scale (scale: f32 ())."""
    _check_fp8(fmt)
    x = jnp.asarray(x)
    _check_elements(x)
    spec = get_format(fmt)
    _check_static_scale(scale)
    s = jnp.asarray(scale, jnp.float32)
    v = jnp.clip(x.astype(jnp.float32) * s, -spec.elem_max, spec.elem_max)
    return QArray(v.astype(spec.elem_dtype), jnp.float32(1.0) / s, None, fmt, x.ndim - 1, jnp.dtype(x.dtype).name)


def current_scaling(x: jax.Array, fmt: str = "fp8_e4m3", margin: int = 0) -> QArray:
    """Current scaling: quantize x [...] with the scale of its own amax (scale 1 if the amax is 0)."""
    _check_elements(jnp.asarray(x))
    return quantize_fp8(x, compute_scale(current_amax(x), 1.0, fmt, margin), fmt)


def init_state(cfg: DelayedScaling) -> FP8State:
    """Zero history [history_len] and scale 1."""
    return FP8State(jnp.zeros((cfg.history_len,), jnp.float32), jnp.float32(1.0))


def scale_from_history(state: FP8State, cfg: DelayedScaling) -> jax.Array:
    """Encode scale f32 () from the history (max or most recent); keeps state.scale if that amax is 0/non-finite."""
    h = state.amax_history
    amax = jnp.max(h) if cfg.algo == "max" else h[0]
    return compute_scale(amax, state.scale, cfg.fmt, cfg.margin)


def update(state: FP8State, amax: jax.Array, cfg: DelayedScaling) -> FP8State:
    """One delayed-scaling step: scale from the history *before* `amax` is written, then roll amax (f32 ()) in."""
    scale = scale_from_history(state, cfg)
    history = jnp.roll(state.amax_history, 1).at[0].set(jnp.asarray(amax, jnp.float32))
    return FP8State(history, scale)


def delayed_quantize(x: jax.Array, state: FP8State, cfg: DelayedScaling) -> tuple[QArray, FP8State]:
    """Quantize x [...] with delayed scaling: returns (QArray, new state); x's own amax only affects later steps."""
    new = update(state, current_amax(x), cfg)
    return quantize_fp8(x, new.scale, cfg.fmt), new
