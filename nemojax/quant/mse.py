"""Calibration math: MSE searches for amax and NVFP4 block scales (docs/formats.md 6).

- `mse_amax`: the generic ModelOpt MSE calibrator: candidates amax0 * m for m in `multipliers` (default
  linspace(0.25, 4, 10)), keep the one whose quantize-dequantize has the least summed squared error.
- `nvfp4_mse_block_scales`: the Nemotron 3 Super weight recipe: for every NVFP4 block try each of the 126 finite
  positive E4M3 values v as the block decode scale (block amax A v / 448) and keep the one with the least squared
  error. Blocks that are all zero keep scale 0, as the dynamic quantizer gives them. The loop runs over candidates
  with a running minimum, so memory stays O(size of w).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from nemojax.lowp.fake import fake_quant
from nemojax.lowp.formats import FLT_MAX, cast_e2m1, check_format
from nemojax.lowp.qarray import _blockify, _check_inputs, _finite_abs, _lead, _scale_to_public, nvfp4_global_scales

DEFAULT_MULTIPLIERS = tuple(float(m) for m in np.linspace(0.25, 4.0, 10, dtype=np.float32))


def e4m3_positive_values() -> np.ndarray:
    """The 126 finite positive float8_e4m3fn values, ascending, float32 [126] (2^-9 ... 448)."""
    codes = np.arange(1, 127, dtype=np.uint8)  # 0x01..0x7E; 0x7F is NaN
    return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def mse_amax(
    x: jax.Array,
    fmt: str,
    *,
    axis: int = -1,
    amax: jax.Array | float | None = None,
    multipliers: tuple[float, ...] | jax.Array = DEFAULT_MULTIPLIERS,
) -> jax.Array:
    """Per-tensor amax f32 () minimising sum((fq(x; amax0 * m) - x)^2) over m in multipliers.

    x [...]: the tensor; fmt: a format with a per-tensor amax (fp8_* or nvfp4*); axis: its blocked axis;
    amax: the initial amax (default the finite max |x|). Non-finite elements are left out of the error.
    Ties keep the earliest multiplier.
    """
    spec = check_format(fmt)
    if spec.scale_kind == "e8m0_block":
        raise ValueError(f"fmt={fmt!r}; allowed: a format with a per-tensor amax ('fp8_e4m3', 'fp8_e5m2', "
                         "'nvfp4', 'nvfp4_2d')")
    xf = jnp.asarray(x, jnp.float32)
    a0 = jnp.max(_finite_abs(xf)) if amax is None else jnp.asarray(amax, jnp.float32)
    if a0.ndim:
        raise ValueError(f"amax has shape {a0.shape}; allowed: a scalar")
    ms = jnp.asarray(multipliers, jnp.float32)
    finite = jnp.isfinite(xf)

    def err(m):
        y = fake_quant(xf, fmt, axis=axis, amax=a0 * m)
        return jnp.sum(jnp.where(finite, (y - xf) ** 2, 0.0))

    errs = jax.lax.map(err, ms)
    return a0 * ms[jnp.argmin(errs)]


def nvfp4_mse_block_scales(
    w: jax.Array, *, axis: int = -1, amax: jax.Array | float | None = None, fmt: str = "nvfp4"
) -> jax.Array:
    """MSE-optimal NVFP4 block decode scales of w [...] as float8_e4m3fn [block_scale_shape(w.shape, fmt, axis)].

    amax: the per-tensor amax fixing the global scale S_dec = 1/S_enc (default the finite max |w|; () or leading
    dims as in `quantize`). The result is meant for quantize(w, fmt, axis=axis, amax=amax, block_scale=...).
    Candidates are scored with the quantizer's own op order (e_b = min(1/(v S_dec), FLT_MAX), q = e2m1(clip(w e_b))),
    squared error summed over the block; ties keep the smaller scale.
    """
    spec = check_format(fmt)
    if spec.scale_kind != "e4m3_block":
        raise ValueError(f"fmt={fmt!r}; allowed: 'nvfp4' or 'nvfp4_2d'")
    w = jnp.asarray(w)
    axis, amax = _check_inputs(w, spec, axis, amax, None, "rne", None)
    wf = w.astype(jnp.float32)
    wb = _blockify(wf, spec, axis)  # [..., nblocks..., B]
    A = jnp.max(_finite_abs(wf)) if amax is None else amax
    _, s_dec = nvfp4_global_scales(A)
    s_dec = _lead(s_dec, wb.ndim)
    wb = jnp.where(jnp.isfinite(wb), wb, 0.0)

    def block_err(v):
        e_b = jnp.minimum(jnp.float32(1.0) / (v * s_dec), jnp.float32(FLT_MAX))
        q = cast_e2m1(jnp.clip(wb * e_b, -6.0, 6.0))[0].astype(jnp.float32)
        return jnp.sum(((q * v) * s_dec - wb) ** 2, axis=-1)

    def step(carry, v):
        best_err, best_v = carry
        err = block_err(v)
        better = err < best_err
        return (jnp.where(better, err, best_err), jnp.where(better, v, best_v)), None

    init = (jnp.full(wb.shape[:-1], jnp.inf, jnp.float32), jnp.zeros(wb.shape[:-1], jnp.float32))
    (_, best_v), _ = jax.lax.scan(step, init, jnp.asarray(e4m3_positive_values()))
    best_v = jnp.where(jnp.max(jnp.abs(wb), axis=-1) == 0, 0.0, best_v)
    return _scale_to_public(best_v.astype(jnp.float8_e4m3fn), spec, axis)
