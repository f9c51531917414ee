"""Per-tensor FP8 current and delayed scaling (docs/formats.md 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.lowp import fp8
from nemojax.lowp.qarray import quantize


@pytest.mark.parametrize("fmt,fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_current_scaling_hits_fp8_max(fmt, fmax):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 24)).astype(np.float32) * 3.0)
    q = fp8.current_scaling(x, fmt)
    assert float(jnp.max(jnp.abs(q.data.astype(jnp.float32)))) == fmax
    amax = float(jnp.max(jnp.abs(x)))
    assert float(q.scale) == np.float32(1.0) / (np.float32(fmax) / np.float32(amax))
    # the generic quantizer with a dynamic amax is the same quantization
    q2 = quantize(x, fmt)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(q2.dequantize()))


def test_zero_and_nonfinite_amax_keep_previous_scale():
    assert float(fp8.compute_scale(0.0, 2.5)) == 2.5
    assert float(fp8.compute_scale(jnp.inf, 2.5)) == 2.5
    assert float(fp8.compute_scale(jnp.nan, 2.5)) == 2.5
    assert float(fp8.compute_scale(2.0, 2.5)) == 224.0
    assert float(fp8.compute_scale(2.0, 2.5, margin=1)) == 112.0
    # a zero tensor quantizes with scale 1 and dequantizes to zeros
    q = fp8.current_scaling(jnp.zeros((4, 4)))
    assert float(q.scale) == 1.0
    np.testing.assert_array_equal(np.asarray(q.dequantize()), 0.0)


def test_delayed_scaling_uses_history_before_update_and_rolls():
    cfg = fp8.DelayedScaling(history_len=3, algo="max", fmt="fp8_e4m3")
    st = fp8.init_state(cfg)
    amaxes = [2.0, 8.0, 4.0, 1.0, 0.5]
    scales = []
    for a in amaxes:
        st = fp8.update(st, a, cfg)
        scales.append(float(st.scale))
    # step t uses max of the previous (up to 3) amaxes; step 0 sees an all-zero history and keeps scale 1
    expect = [1.0, 448 / 2.0, 448 / 8.0, 448 / 8.0, 448 / 8.0]
    np.testing.assert_allclose(scales, expect, rtol=0)
    np.testing.assert_array_equal(np.asarray(st.amax_history), [0.5, 1.0, 4.0])
    st = fp8.update(st, 0.25, cfg)  # history now [0.5, 1, 4] -> max 4
    assert float(st.scale) == 448 / 4.0


def test_delayed_most_recent_and_jit_and_quantize():
    cfg = fp8.DelayedScaling(history_len=4, algo="most_recent")
    st = fp8.init_state(cfg)
    step = jax.jit(lambda x, st: fp8.delayed_quantize(x, st, cfg))
    x1 = jnp.full((4,), 2.0)
    q, st = step(x1, st)
    assert float(q.scale) == 1.0  # empty history: previous scale 1
    x2 = jnp.array([1.0, -3.0, 0.5, 0.0])
    q, st = step(x2, st)
    assert float(st.scale) == 224.0  # most recent amax = 2 (x1's), not x2's 3
    np.testing.assert_array_equal(np.asarray(q.data.astype(jnp.float32)), [224.0, -448.0, 112.0, 0.0])
    np.testing.assert_array_equal(np.asarray(st.amax_history), [3.0, 2.0, 0.0, 0.0])


def test_config_validation():
    with pytest.raises(ValueError, match="algo"):
        fp8.DelayedScaling(algo="mean")
    with pytest.raises(ValueError, match="history_len"):
        fp8.DelayedScaling(history_len=0)
    with pytest.raises(ValueError, match="fmt"):
        fp8.DelayedScaling(fmt="nvfp4")
