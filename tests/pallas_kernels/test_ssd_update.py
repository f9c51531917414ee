"""The single-token SSD state-update Pallas kernel (interpret mode on CPU) against its pure-JAX reference and against
nemojax's own decode step (`ssd_sequential` with L = 1, plus the mixer's D skip)."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.nn.ssd import ssd_sequential
from pallas_kernels.ssd_update import p_block, ssd_update, ssd_update_reference

TOL = dict(rtol=1e-5, atol=1e-5)


def make_inputs(seed, b, H, P, G, N, dtype=jnp.float32, L=None):
    """Random decode inputs (numpy RNG: no per-shape eager compiles); L adds a time axis after batch."""
    rng = np.random.default_rng(seed)
    t = () if L is None else (L,)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    state = jnp.asarray(normal(b, H, P, N))
    x = jnp.asarray(normal(b, *t, H, P)).astype(dtype)
    dt = jnp.asarray(np.clip(np.log1p(np.exp(normal(b, *t, H) - 1.0)), 1e-3, 1e2))
    A = jnp.asarray(-np.exp(rng.uniform(0.0, 2.0, (H,)).astype(np.float32)))
    B = jnp.asarray(normal(b, *t, G, N)).astype(dtype)
    C = jnp.asarray(normal(b, *t, G, N)).astype(dtype)
    D = jnp.asarray(normal(H))
    return state, x, dt, A, B, C, D


def nemojax_step(state, x, dt, A, B, C, D):
    """What the Mamba-2 mixer computes for one decode token (nemojax/nn/mamba2.py, T = 1)."""
    x32 = x.astype(jnp.float32)
    y, new_state = ssd_sequential(x32[:, None], dt[:, None], A, B[:, None], C[:, None], initial_state=state)
    return y[:, 0] + D[:, None] * x32, new_state


# (b, H, P, G, N, block_p): batch 1, G < H, G = H, one group, odd H; P a multiple of the block (several P blocks
# per head), P smaller than the block, P not a multiple of it (the last block overhangs, as P = 80 with bp 32/64).
SHAPES = [
    (2, 6, 8, 2, 16, 4),
    (1, 8, 4, 1, 8, 4),
    (1, 16, 8, 4, 16, 8),
    (3, 7, 4, 7, 8, 16),
    (1, 12, 4, 2, 8, 2),
    (2, 6, 4, 3, 8, 64),
    (1, 4, 5, 2, 12, 4),  # P and N not powers of two: the blocks overhang both
    (2, 4, 10, 2, 8, 4),  # three P blocks, the last overhanging by 2 rows
]


@pytest.mark.parametrize("b,H,P,G,N,bp", SHAPES)
def test_matches_reference_and_nemojax_fp32(b, H, P, G, N, bp):
    args = make_inputs(0, b, H, P, G, N)
    y, new_state = jax.jit(partial(ssd_update, interpret=True, block_p=bp))(*args)
    assert y.shape == (b, H, P) and new_state.shape == (b, H, P, N)
    assert y.dtype == jnp.float32 and new_state.dtype == jnp.float32
    y_ref, s_ref = jax.jit(ssd_update_reference)(*args)
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(new_state, s_ref, **TOL)
    y_nj, s_nj = jax.jit(nemojax_step)(*args)
    np.testing.assert_allclose(y, y_nj, **TOL)
    np.testing.assert_allclose(new_state, s_nj, **TOL)
    # the update is not a no-op (guards against a kernel that passes the state through)
    assert not np.allclose(new_state, args[0], atol=1e-3)


def test_bf16_inputs_fp32_state():
    """bf16 x/B/C are upcast exactly, so against the same bf16 inputs the kernel is fp32-exact (rtol 1e-5);
    against the unrounded fp32 inputs the gap is bf16 rounding (rtol/atol 5e-2 stated)."""
    b, H, P, G, N = 2, 6, 8, 2, 16
    args32 = make_inputs(1, b, H, P, G, N)
    state, x, dt, A, B, C, D = args32
    args16 = (state, x.astype(jnp.bfloat16), dt, A, B.astype(jnp.bfloat16), C.astype(jnp.bfloat16), D)
    y, new_state = jax.jit(partial(ssd_update, interpret=True, block_p=4))(*args16)
    assert new_state.dtype == jnp.float32 and y.dtype == jnp.float32
    for ref in (ssd_update_reference, nemojax_step):
        y_ref, s_ref = jax.jit(ref)(*args16)
        np.testing.assert_allclose(y, y_ref, **TOL)
        np.testing.assert_allclose(new_state, s_ref, **TOL)
    y32, s32 = jax.jit(ssd_update_reference)(*args32)
    np.testing.assert_allclose(y, y32, rtol=5e-2, atol=5e-2 * float(jnp.abs(y32).max()))
    np.testing.assert_allclose(new_state, s32, rtol=5e-2, atol=5e-2)


def test_several_steps_match_sequential_scan():
    b, H, P, G, N, L = 2, 6, 4, 2, 8, 5
    state0, x, dt, A, B, C, D = make_inputs(2, b, H, P, G, N, L=L)
    step = jax.jit(partial(ssd_update, interpret=True, block_p=4))
    state, ys = state0, []
    for t in range(L):
        y, state = step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y)
    y_seq, final = jax.jit(ssd_sequential)(x, dt, A, B, C, initial_state=state0)
    y_seq = y_seq + D[:, None] * x
    np.testing.assert_allclose(jnp.stack(ys, axis=1), y_seq, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(state, final, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("P,block,expected", [(64, 32, 32), (80, 32, 16), (80, 128, 16), (5, 64, 1), (4, 4, 4),
                                              (96, 64, 32)])
def test_p_block(P, block, expected):
    """The largest power of two <= block dividing P: no block overhangs a head's rows (Triton would not mask it;
    on an H200 bp = 32 at P = 80 corrupted the next head's state)."""
    assert p_block(P, block) == expected


@pytest.mark.parametrize("block", [0, 24, -4])
def test_p_block_rejects_non_powers_of_two(block):
    with pytest.raises(ValueError, match=f"block_p={block}"):
        p_block(64, block)


def test_launch_options_do_not_change_the_result():
    """num_warps only reaches the Triton params; interpreted, every (block_p, num_warps) gives the same values."""
    args = make_inputs(6, 1, 4, 8, 2, 8)
    y_ref, s_ref = jax.jit(ssd_update_reference)(*args)
    for bp, warps in ((2, 1), (8, 8)):
        y, s = jax.jit(partial(ssd_update, interpret=True, block_p=bp, num_warps=warps))(*args)
        np.testing.assert_allclose(y, y_ref, **TOL)
        np.testing.assert_allclose(s, s_ref, **TOL)
    with pytest.raises(ValueError, match="num_warps=3"):
        ssd_update(*args, interpret=True, num_warps=3)


def _pallas_eqn(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            return eqn
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None:
                found = _pallas_eqn(getattr(inner, "jaxpr", inner))
                if found is not None:
                    return found
    return None


def test_state_aliased_and_donation():
    b, H, P, G, N = 1, 8, 4, 2, 8
    args = make_inputs(3, b, H, P, G, N)
    fn = partial(ssd_update, interpret=True, block_p=4)
    # the kernel declares state (input 0) -> new_state (output 1)
    eqn = _pallas_eqn(jax.make_jaxpr(fn)(*args).jaxpr)
    assert eqn is not None
    assert tuple(eqn.params["input_output_aliases"]) == ((0, 1),)
    # donating the state under jit: the lowering aliases it to the new-state output, and the result is right
    y_ref, s_ref = jax.jit(ssd_update_reference)(*args)
    y_ref, s_ref = np.asarray(y_ref), np.asarray(s_ref)
    jitted = jax.jit(fn, donate_argnums=0)
    assert "tf.aliasing_output = 1" in jitted.lower(*args).as_text()
    state = jnp.array(args[0])  # a fresh buffer to donate
    y, new_state = jitted(state, *args[1:])
    np.testing.assert_allclose(y, y_ref, **TOL)
    np.testing.assert_allclose(new_state, s_ref, **TOL)


def test_rejects_bad_inputs():
    state, x, dt, A, B, C, D = make_inputs(4, 1, 6, 4, 2, 8)
    with pytest.raises(ValueError, match="float32"):
        ssd_update(state.astype(jnp.bfloat16), x, dt, A, B, C, D, interpret=True)
    with pytest.raises(ValueError, match="shapes disagree"):
        ssd_update(state, x, dt[:, :5], A, B, C, D, interpret=True)
    with pytest.raises(ValueError, match="groups"):
        B4, C4 = jnp.ones((1, 4, 8)), jnp.ones((1, 4, 8))
        ssd_update(state, x, dt, A, B4, C4, D, interpret=True)


def test_gradients_equal_the_reference():
    """The custom_vjp backward (vjp of the reference) through the kernel: every input's gradient equals autodiff
    of ssd_update_reference (float32, 1e-6 relative), bf16 x/B/C included."""
    args = list(make_inputs(5, 2, 6, 4, 3, 8))
    args[1], args[4] = args[1].astype(jnp.bfloat16), args[4].astype(jnp.bfloat16)
    w_y = jax.random.normal(jax.random.key(11), (2, 6, 4))
    w_s = jax.random.normal(jax.random.key(12), args[0].shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a)[0] * w_y) + jnp.sum(fn(*a)[1] * w_s)

    g_kernel = jax.jit(jax.grad(loss(partial(ssd_update, interpret=True)), argnums=range(7)))(*args)
    g_ref = jax.grad(loss(ssd_update_reference), argnums=range(7))(*args)
    for i, (a, b) in enumerate(zip(g_kernel, g_ref, strict=True)):
        assert a.dtype == b.dtype == args[i].dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)
