"""fake_quant and its straight-through gradients (docs/formats.md 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp.fake import fake_quant
from nemojax.lowp.qarray import quantize


def test_forward_equals_qdq_and_pass_gradient_is_identity():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fake_quant(x, "nvfp4")), np.asarray(quantize(x, "nvfp4").dequantize()))
    w = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, "nvfp4") * w))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_clipped_gradient_is_indicator_of_static_amax():
    x = jnp.asarray([-3.0, -2.0, -1.5, 0.0, 1.0, 2.0, 2.5, 7.0] * 2, jnp.float32)
    for fmt in ("nvfp4", "fp8_e4m3", "fp8_e5m2"):
        g = jax.grad(lambda x, fmt=fmt: jnp.sum(fake_quant(x, fmt, amax=2.0, ste="clipped") * 3.0))(x)
        np.testing.assert_array_equal(np.asarray(g), np.where(np.abs(np.asarray(x)) <= 2.0, 3.0, 0.0))
        g = jax.grad(lambda x, fmt=fmt: jnp.sum(fake_quant(x, fmt, amax=2.0, ste="pass") * 3.0))(x)
        np.testing.assert_array_equal(np.asarray(g), 3.0)


def test_dynamic_clipped_zeroes_only_nonfinite_and_batched_amax():
    x = jnp.asarray([1.0, -5.0, jnp.inf, 2.0] * 8, jnp.float32)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, "mxfp4", ste="clipped")))(x)
    np.testing.assert_array_equal(np.asarray(g), np.where(np.isfinite(np.asarray(x)), 1.0, 0.0))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16)).astype(np.float32))
    amax = jnp.asarray([0.5, 10.0])
    g = jax.grad(lambda w: jnp.sum(fake_quant(w, "nvfp4_2d", axis=1, amax=amax, ste="clipped")))(w)
    np.testing.assert_array_equal(np.asarray(g[0]), (np.abs(np.asarray(w[0])) <= 0.5).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(g[1]), 1.0)


def test_scales_get_zero_gradient():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32))
    ga = jax.grad(lambda a: jnp.sum(fake_quant(x, "nvfp4", amax=a, ste="clipped") ** 2))(jnp.float32(1.5))
    assert float(ga) == 0.0
    bs = jnp.full((4, 2), 100.0)
    gb = jax.grad(lambda b: jnp.sum(fake_quant(x, "nvfp4", block_scale=b) ** 2))(bs)
    np.testing.assert_array_equal(np.asarray(gb), 0.0)


def test_jit_vmap_bf16_and_stochastic():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 4, 32)).astype(np.float32))
    f = jax.jit(jax.vmap(lambda r: fake_quant(r, "nvfp4")))
    y = f(x)
    for i in range(3):  # vmap = per-slice dynamic amax
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(quantize(x[i], "nvfp4").dequantize()))
    xb = x.astype(jnp.bfloat16)
    yb = fake_quant(xb, "mxfp8")
    assert yb.dtype == jnp.bfloat16
    gb = jax.grad(lambda v: jnp.sum(fake_quant(v, "nvfp4").astype(jnp.float32)))(xb)
    assert gb.dtype == jnp.bfloat16 and bool(jnp.all(gb == 1))
    k = jax.random.key(0)
    s1 = fake_quant(x, "nvfp4", rounding="stochastic", key=k)
    s2 = jax.jit(lambda x, k: fake_quant(x, "nvfp4", rounding="stochastic", key=k))(x, k)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, "nvfp4", rounding="stochastic", key=k)))(x)
    np.testing.assert_array_equal(np.asarray(g), 1.0)
    with pytest.raises(ValueError, match="ste"):
        fake_quant(x, "nvfp4", ste="tanh")
