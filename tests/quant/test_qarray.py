"""quantize / dequantize / packing (spec quant.md 1.2-1.6; invariants 3, 5-10, 12, 13)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.quant.formats import FORMATS
from nemojax.quant.qarray import QArray, dequantize, pack_fp4, quantize, unpack_fp4


def _x(shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_shapes_and_zero_tensor(fmt):
    x = _x((3, 40))
    q = quantize(x, fmt)
    assert q.data.shape == x.shape
    xh = q.dequantize()
    assert xh.dtype == x.dtype and xh.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(xh)))
    # a coarse accuracy check: every format keeps the relative RMSE below its element precision
    rel = float(jnp.sqrt(jnp.mean((x - xh) ** 2)) / jnp.sqrt(jnp.mean(x**2)))
    assert rel < {"fp8_e4m3": 0.05, "fp8_e5m2": 0.1, "mxfp8": 0.06}.get(fmt, 0.3)
    z = quantize(jnp.zeros((2, 32)), fmt).dequantize()
    np.testing.assert_array_equal(np.asarray(z), 0.0)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(xh))


def test_qarray_is_pytree_and_jit():
    x = _x((4, 32))
    q = jax.jit(lambda x: quantize(x, "nvfp4"))(x)
    leaves, tree = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3
    q2 = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(q2, QArray) and q2.fmt == "nvfp4" and q2.axis == 1 and q2.dtype == "float32"


def test_pack_matches_bitcast():
    codes = quantize(_x((3, 32)), "nvfp4").data
    p = pack_fp4(codes)
    ref = jax.lax.bitcast_convert_type(codes.reshape(3, 16, 2), jnp.uint8)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(ref))
    assert bool(jnp.all(unpack_fp4(p) == codes))
