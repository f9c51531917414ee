"""Fake quantization with straight-through gradients (docs/formats.md 6).

fake_quant(x) = dequantize(quantize(x)) computed in f32 and returned in x's dtype; the forward numerics equal the
real low-precision path. The backward is a straight-through estimator:

- ste="pass": identity, dL/dx = g (ModelOpt pass_through_bwd, qwix QAT).
- ste="clipped": dL/dx = g * 1[|x| <= amax] (ModelOpt default). amax is the static per-tensor amax if one is given,
  else the tensor's own finite max |x|, so the dynamic clipped STE differs from "pass" only at +-inf (and NaN).

amax and block_scale are constants: they get zero gradients (as with stop_gradient), as does the rounding key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nemojax.lowp.formats import check_format
from nemojax.lowp.qarray import _lead, quantize

STES = ("pass", "clipped")


def _forward(fmt, axis, rounding, x, amax, block_scale, key):
    q = quantize(x.astype(jnp.float32), fmt, axis=axis, amax=amax, block_scale=block_scale, rounding=rounding, key=key)
    return q.dequantize(jnp.float32).astype(x.dtype)


def _clip_mask(x: jax.Array, amax: jax.Array | None) -> jax.Array:
    """1[|x| <= amax] as x's dtype; amax left-aligned with x's leading dims, or the finite max |x| if None."""
    xf = x.astype(jnp.float32)
    if amax is None:
        a = jnp.max(jnp.where(jnp.isfinite(xf), jnp.abs(xf), 0.0))
    else:
        a = _lead(jnp.asarray(amax, jnp.float32), x.ndim)
    return (jnp.abs(xf) <= a).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fake_quant(fmt, axis, ste, rounding, x, amax, block_scale, key):
    return _forward(fmt, axis, rounding, x, amax, block_scale, key)


def _fake_quant_fwd(fmt, axis, ste, rounding, x, amax, block_scale, key):
    y = _forward(fmt, axis, rounding, x, amax, block_scale, key)
    mask = _clip_mask(x, amax) if ste == "clipped" else None
    return y, mask


def _fake_quant_bwd(fmt, axis, ste, rounding, mask, g):
    gx = g if mask is None else g * mask
    return gx, None, None, None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(
    x: jax.Array,
    fmt: str,
    *,
    axis: int = -1,
    amax: jax.Array | float | None = None,
    block_scale: jax.Array | None = None,
    ste: str = "pass",
    rounding: str = "rne",
    key: jax.Array | None = None,
) -> jax.Array:
    """Quantize-dequantize x [...] (same shape and dtype out) with an STE backward; jit/vmap/grad compatible.

    Arguments as in `quantize` (axis = blocked/contraction axis, amax = static per-tensor amax () or [leading dims],
    block_scale = static NVFP4 block decode scales, rounding "rne" | "stochastic" with `key`), plus
    ste: "pass" (identity gradient) or "clipped" (gradient zeroed where |x| > amax).
    """
    check_format(fmt)
    if ste not in STES:
        raise ValueError(f"ste={ste!r}; allowed: {STES}")
    x = jnp.asarray(x)
    if amax is not None:
        amax = jax.lax.stop_gradient(jnp.asarray(amax, jnp.float32))
    if block_scale is not None:
        block_scale = jax.lax.stop_gradient(jnp.asarray(block_scale))
    return _fake_quant(fmt, axis, ste, rounding, x, amax, block_scale, key)
