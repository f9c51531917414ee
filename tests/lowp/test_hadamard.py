"""Random Hadamard transform (arXiv 2509.25149; docs/formats.md 5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp.hadamard import RHT_SIGNS, hadamard_matrix, inverse_rht, rht, rht_matrix
from nemojax.lowp.qarray import quantize


def test_matrix_is_orthonormal_and_uses_fixed_signs():
    assert RHT_SIGNS == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    R = rht_matrix().astype(np.float64)
    np.testing.assert_allclose(R @ R.T, np.eye(16), atol=1e-6)
    H = hadamard_matrix(16)
    np.testing.assert_array_equal(H[:2, :4], [[1, 1, 1, 1], [1, -1, 1, -1]])
    np.testing.assert_array_equal(R * 4, np.diag(RHT_SIGNS) @ H)
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


def test_rht_groups_along_axis_and_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 32, 5)).astype(np.float32)
    y = np.asarray(rht(jnp.asarray(x), axis=1))
    R = rht_matrix().astype(np.float64)
    ref = np.einsum("agib,ij->agjb", x.reshape(3, 2, 16, 5).astype(np.float64), R).reshape(3, 32, 5)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(inverse_rht(jnp.asarray(y), axis=1)), x, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 16"):
        rht(jnp.zeros((4, 20)))


def test_gemm_invariance_and_amax_after_rht():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((8, 64)).astype(np.float32)
    Y = rng.standard_normal((6, 64)).astype(np.float32)
    XR, YR = np.asarray(rht(jnp.asarray(X))), np.asarray(rht(jnp.asarray(Y)))
    np.testing.assert_allclose(XR @ YR.T, X.astype(np.float64) @ Y.T, atol=1e-4)
    # RHT before the quantizer: the global scale is the amax of the transformed tensor, and an outlier is spread
    X[0, 3] = 100.0
    XR = rht(jnp.asarray(X))
    q = quantize(XR, "nvfp4")
    assert float(q.global_scale) == pytest.approx(float(jnp.max(jnp.abs(XR))) / 2688, rel=1e-6)
    assert float(jnp.max(jnp.abs(XR))) < 0.3 * 100.0
