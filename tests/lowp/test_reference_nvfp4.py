"""Bit-exact agreement of `quantize` with a numpy reference of TE's NVFP4 order (docs/formats.md 4).

The oracle (nemojax.lowp.reference.nvfp4_te) mirrors TransformerEngine's reference_nvfp4.py in float32 numpy, with
E2M1 rounding from TE's threshold table and the E4M3 cast from ml_dtypes. Acceptance: elements identical except
ties that may differ by one step; for the TE order the measured mismatch rate is 0, and the test asserts it. The
ModelOpt formula (same algebra, other float order) must give block scales within 1 E4M3 ulp; its element mismatch
rate is printed (run with -s) and bounded. The larger sweep is experiments/nvfp4_reference_agreement.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp import reference as R
from nemojax.lowp.qarray import quantize

SHAPE = (64, 256)


def _codes(q) -> np.ndarray:
    """E2M1 codes of a QArray as the uint8 code numbers of the reference."""
    return np.asarray(jax.lax.bitcast_convert_type(q.data, jnp.uint4).astype(jnp.uint8))


@pytest.fixture(scope="module")
def qfns():
    return {f: jax.jit(lambda x, f=f: quantize(x, f)) for f in ("nvfp4", "nvfp4_2d")}


@pytest.mark.parametrize("category", R.CATEGORIES)
def test_te_order_bit_exact(category, qfns):
    x = R.make_tensor(category, SHAPE, seed=1)
    for fmt, tile in (("nvfp4", (1, 16)), ("nvfp4_2d", (16, 16))):
        ref = R.nvfp4_te(x, tile)
        q = qfns[fmt](jnp.asarray(x))
        codes = _codes(q)
        # -0 vs +0 codes are the same value; compare values for the element check and codes for the rest
        code_rate = np.mean(R.e2m1_values(ref["codes"]) != R.e2m1_values(codes))
        print(f"{category:15s} {fmt:9s} element mismatch rate {code_rate:.2e}")
        assert code_rate == 0.0
        np.testing.assert_array_equal(codes, ref["codes"])
        np.testing.assert_array_equal(np.asarray(q.scale.astype(jnp.float32)), ref["scale"])
        # S_dec: XLA:CPU flushes the subnormal 1/FLT_MAX of an all-zero tensor to 0
        s_dec = np.float32(0.0) if ref["s_dec"] < np.finfo(np.float32).tiny else ref["s_dec"]
        assert float(q.global_scale) == s_dec
        np.testing.assert_array_equal(np.asarray(q.dequantize()), ref["xhat"] if s_dec else 0.0)


def test_comparison_detects_a_wrong_order(qfns):
    """The bit-exact comparison can fail: an order that scales elements by the *unrounded* block scale
    (6 / a_b instead of 1 / (e4m3(d_b) S_dec), a classic mistake) disagrees with the quantizer on many elements."""
    x = R.make_tensor("normal", SHAPE, seed=3)
    xb = x.reshape(SHAPE[0], -1, 16)
    a_b = np.max(np.abs(xb), axis=-1, keepdims=True)
    wrong = R.e2m1_codes(np.clip(xb * (np.float32(6.0) / a_b), -6, 6)).reshape(SHAPE)
    codes = _codes(qfns["nvfp4"](jnp.asarray(x)))
    rate = np.mean(R.e2m1_values(wrong) != R.e2m1_values(codes))
    assert rate > 0.01, rate


@pytest.mark.parametrize("category", [c for c in R.CATEGORIES if c != "all_zero"])
def test_modelopt_formula_within_one_ulp(category):
    x = R.make_tensor(category, SHAPE, seed=2)
    r = R.modelopt_vs_te(x)
    print(f"{category:15s} modelopt vs TE: {r}")
    assert r["scale_max_ulp"] <= 1
    assert r["code_mismatch_rate"] <= 0.01
