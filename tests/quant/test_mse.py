"""MSE calibration (docs/formats.md 6): generic amax search and the NVFP4 126-candidate block-scale sweep."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp import reference as R
from nemojax.lowp.qarray import quantize
from nemojax.quant.mse import e4m3_positive_values, mse_amax, nvfp4_mse_block_scales


def test_e4m3_candidates():
    v = e4m3_positive_values()
    assert v.shape == (126,) and v[0] == 2.0**-9 and v[-1] == 448.0 and np.all(np.diff(v) > 0)


def _block_sse(x, scales, s_dec):
    """numpy oracle: squared error per 16-block for decode scales `scales` [m, n/16] (TE op order)."""
    xb = x.reshape(x.shape[0], -1, 16)
    d = scales[..., None].astype(np.float32)
    with np.errstate(all="ignore"):
        e = np.minimum(np.float32(1) / (d * s_dec), R.FLT_MAX)
    q = R.e2m1_values(R.e2m1_codes(np.clip(xb * e, -6, 6)))
    return np.sum(((q * d) * s_dec - xb) ** 2, axis=-1)


def test_block_scale_sweep_matches_bruteforce_and_beats_dynamic():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(3, (4, 64)) * 10.0 ** rng.uniform(-2, 1, (4, 1))).astype(np.float32)
    x[1, 16:32] = 0.0
    bs = np.asarray(nvfp4_mse_block_scales(jnp.asarray(x)).astype(jnp.float32))
    s_dec = R.nvfp4_te(x)["s_dec"]
    # brute force in numpy over all 126 candidates
    cands = e4m3_positive_values()
    errs = np.stack([_block_sse(x, np.full((4, 4), v, np.float32), s_dec) for v in cands])
    best = cands[np.argmin(errs, axis=0)]
    best[1, 1] = 0.0  # the all-zero block keeps scale 0
    np.testing.assert_array_equal(bs, best)
    dyn = R.nvfp4_te(x)["scale"]
    assert np.all(_block_sse(x, bs, s_dec) <= _block_sse(x, dyn, s_dec))
    assert np.sum(_block_sse(x, bs, s_dec)) < np.sum(_block_sse(x, dyn, s_dec))
    # usable as static block scales: quantize reproduces the oracle's error
    q = quantize(jnp.asarray(x), "nvfp4", block_scale=bs)
    np.testing.assert_array_equal(np.asarray(q.scale.astype(jnp.float32)), bs)
    sse = np.sum((np.asarray(q.dequantize()) - x) ** 2)
    np.testing.assert_allclose(sse, np.sum(_block_sse(x, bs, s_dec)), rtol=1e-5)


def test_block_scale_sweep_2d_and_axis():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 48)).astype(np.float32)
    b2 = nvfp4_mse_block_scales(jnp.asarray(w), fmt="nvfp4_2d")
    assert b2.shape == (2, 3)
    bt = nvfp4_mse_block_scales(jnp.asarray(w.T), fmt="nvfp4_2d")
    np.testing.assert_array_equal(np.asarray(bt.astype(jnp.float32)), np.asarray(b2.astype(jnp.float32)).T)
    b0 = nvfp4_mse_block_scales(jnp.asarray(w), axis=0)
    b1 = nvfp4_mse_block_scales(jnp.asarray(w.T), axis=1)
    np.testing.assert_array_equal(np.asarray(b0.astype(jnp.float32)), np.asarray(b1.astype(jnp.float32)).T)
    with pytest.raises(ValueError, match="fmt"):
        nvfp4_mse_block_scales(jnp.asarray(w), fmt="mxfp4")


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
def test_mse_amax_picks_least_error_candidate(fmt):
    rng = np.random.default_rng(2)
    x = rng.standard_t(2, (8, 64)).astype(np.float32)
    a = float(mse_amax(jnp.asarray(x), fmt))
    a0 = float(np.max(np.abs(x)))
    ms = np.linspace(0.25, 4.0, 10, dtype=np.float32)
    errs = [np.sum((np.asarray(quantize(jnp.asarray(x), fmt, amax=a0 * m).dequantize()) - x) ** 2) for m in ms]
    assert a == pytest.approx(a0 * ms[int(np.argmin(errs))], rel=1e-6)
    assert len(set(np.round(errs, 3))) > 1  # the candidates really differ, so the argmin is meaningful
    with pytest.raises(ValueError, match="fmt"):
        mse_amax(jnp.asarray(x), "mxfp8")
