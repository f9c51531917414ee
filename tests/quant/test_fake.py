"""fake_quant and its straight-through gradients (spec quant.md 2.1; invariant 16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.quant.fake import fake_quant
from nemojax.quant.qarray import quantize


def test_forward_equals_qdq_and_pass_gradient_is_identity():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(fake_quant(x, "nvfp4")), np.asarray(quantize(x, "nvfp4").dequantize()))
    w = jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, "nvfp4") * w))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
