"""Tests for nemojax.nn.ssd: the chunked SSD equals the sequential scan (values, final state, gradients), a
hand-derived case, split-sequence continuation, and the repeat-interleave head -> group mapping (docs/numerics.md
1, 2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.nn import ssd as ssd_module

# jit once per shape: op-by-op dispatch of the chunked einsums is several times slower than compiling on CPU.
ssd = jax.jit(ssd_module.ssd, static_argnames=("chunk_size", "impl"))
ssd_chunked = jax.jit(ssd_module.ssd_chunked, static_argnames="chunk_size")
ssd_sequential = jax.jit(ssd_module.ssd_sequential)

Q = 16  # chunk size
b, H, G, P, N = 2, 6, 3, 4, 5  # H/G = 2 heads per group


def _inputs(L: int, seed: int = 0, with_state: bool = True):
    """Random fp32 SSD inputs: dt > 0 (softplus of a normal), A < 0, B/C grouped, optional initial state."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, L, H, P)).astype(np.float32)
    dt = np.log1p(np.exp(rng.standard_normal((b, L, H)) - 1.0)).astype(np.float32)
    A = -np.exp(rng.uniform(-1.0, 1.0, H)).astype(np.float32)
    B = rng.standard_normal((b, L, G, N)).astype(np.float32)
    C = rng.standard_normal((b, L, G, N)).astype(np.float32)
    S0 = rng.standard_normal((b, H, P, N)).astype(np.float32) if with_state else None
    return x, dt, A, B, C, S0


def _rel(a, ref) -> float:
    """max |a - ref| / max |ref|."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def _numpy_scan(x, dt, A, B, C, S0=None):
    """Independent float64 loop over time and heads; head h reads group h // (H/G) (docs/numerics.md 1)."""
    bsz, L, nh, p = x.shape
    ng, n = B.shape[2], B.shape[3]
    S = np.zeros((bsz, nh, p, n)) if S0 is None else np.asarray(S0, np.float64).copy()
    y = np.zeros((bsz, L, nh, p))
    for t in range(L):
        for h in range(nh):
            g = h // (nh // ng)
            S[:, h] = (np.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h]
                       + dt[:, t, h][:, None, None] * x[:, t, h][:, :, None] * B[:, t, g][:, None, :])
            y[:, t, h] = np.einsum("bpn,bn->bp", S[:, h], C[:, t, g])
    return y, S


def test_sequential_oracle_matches_numpy_loop() -> None:
    """The lax.scan oracle itself equals an independent float64 numpy loop (so it can serve as the oracle)."""
    x, dt, A, B, C, S0 = _inputs(7)
    y, S = ssd_sequential(x, dt, A, B, C, initial_state=S0)
    y_ref, S_ref = _numpy_scan(x, dt, A, B, C, S0)
    assert _rel(y, y_ref) < 1e-5 and _rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("L", [1, Q - 1, Q, 3 * Q + 5])
def test_chunked_equals_sequential(L: int, with_state: bool) -> None:
    """Chunked SSD == sequential scan in fp32 (rel. max error < 1e-5; measured <= 3e-7) for outputs and final
    state."""
    x, dt, A, B, C, S0 = _inputs(L, seed=L, with_state=with_state)
    y, S = ssd_chunked(x, dt, A, B, C, chunk_size=Q, initial_state=S0)
    y_ref, S_ref = ssd_sequential(x, dt, A, B, C, initial_state=S0)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert _rel(y, y_ref) < 1e-5
    assert _rel(S, S_ref) < 1e-5


def test_chunked_gradients_equal_sequential() -> None:
    """d/d(x, dt, A, B, C, initial_state) of sum(y*w) + sum(final*w2) agree to rel. max error < 1e-5 (measured
    <= 3e-7 in fp32 for every argument), over L = 3 chunks + 5 (full and partial chunks)."""
    L = 3 * Q + 5
    x, dt, A, B, C, S0 = _inputs(L, seed=100 + L)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((b, L, H, P)).astype(np.float32)
    w2 = rng.standard_normal((b, H, P, N)).astype(np.float32)

    def loss(fn, *args):
        x_, dt_, A_, B_, C_, S0_ = args
        y, S = fn(x_, dt_, A_, B_, C_, S0_)
        return jnp.sum(y * w) + jnp.sum(S * w2)

    chunked = lambda *a: ssd_chunked(*a[:5], chunk_size=Q, initial_state=a[5])
    sequential = lambda *a: ssd_sequential(*a[:5], initial_state=a[5])
    args = (x, dt, A, B, C, S0)
    g = jax.grad(lambda *a: loss(chunked, *a), argnums=tuple(range(6)))(*args)
    g_ref = jax.grad(lambda *a: loss(sequential, *a), argnums=tuple(range(6)))(*args)
    for name, gi, gr in zip(["x", "dt", "A", "B", "C", "initial_state"], g, g_ref, strict=True):
        assert np.all(np.isfinite(np.asarray(gi))), name
        assert _rel(gi, gr) < 1e-5, (name, _rel(gi, gr))


@pytest.mark.parametrize("impl,chunk", [("sequential", 1), ("chunked", 1), ("chunked", 2), ("chunked", 16)])
def test_hand_derived_case(impl: str, chunk: int) -> None:
    """L=2, H=P=N=G=1 with numbers worked by hand.

    x = [1, 2], dt = [0.5, 1], A = -ln 4 (decays 0.5 then 0.25), B = [1, 3], C = [2, 1].
    From S0 = 0: S1 = 0.5*1*1 = 0.5, y0 = 2*0.5 = 1; S2 = 0.25*0.5 + 1*2*3 = 6.125, y1 = 6.125.
    From S0 = 4: S1 = 0.5*4 + 0.5 = 2.5, y0 = 5;     S2 = 0.25*2.5 + 6 = 6.625, y1 = 6.625.
    """
    x = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1)
    dt = jnp.array([0.5, 1.0]).reshape(1, 2, 1)
    A = jnp.array([-np.log(4.0)], jnp.float32)
    B = jnp.array([1.0, 3.0]).reshape(1, 2, 1, 1)
    C = jnp.array([2.0, 1.0]).reshape(1, 2, 1, 1)
    y, S = ssd(x, dt, A, B, C, chunk_size=chunk, impl=impl)
    np.testing.assert_allclose(np.asarray(y).ravel(), [1.0, 6.125], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(S).ravel(), [6.125], rtol=1e-6)
    y, S = ssd(x, dt, A, B, C, chunk_size=chunk, impl=impl, initial_state=jnp.full((1, 1, 1, 1), 4.0))
    np.testing.assert_allclose(np.asarray(y).ravel(), [5.0, 6.625], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(S).ravel(), [6.625], rtol=1e-6)


@pytest.mark.parametrize("split", [5, 21])
def test_split_sequence_continues_from_state(split: int) -> None:
    """Running [0, split) then [split, L) from its final state equals running [0, L) at once (split not a multiple
    of the chunk, docs/numerics.md 2)."""
    L = 3 * Q + 5
    x, dt, A, B, C, S0 = _inputs(L, seed=3)
    y_all, S_all = ssd_chunked(x, dt, A, B, C, chunk_size=Q, initial_state=S0)
    y1, S1 = ssd_chunked(x[:, :split], dt[:, :split], A, B[:, :split], C[:, :split], chunk_size=Q, initial_state=S0)
    y2, S2 = ssd_chunked(x[:, split:], dt[:, split:], A, B[:, split:], C[:, split:], chunk_size=Q, initial_state=S1)
    assert _rel(jnp.concatenate([y1, y2], axis=1), y_all) < 1e-5
    assert _rel(S2, S_all) < 1e-5


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_group_maps_to_consecutive_heads(impl: str) -> None:
    """Changing B (or C) of group 1 changes exactly heads 2 and 3 (h // (H/G) == 1), i.e. repeat-interleave, not
    tiling (docs/numerics.md 1)."""
    x, dt, A, B, C, _ = _inputs(Q + 3, seed=11)
    y, S = ssd(x, dt, A, B, C, chunk_size=Q, impl=impl)
    group1 = {2, 3}
    for which in ("B", "C"):
        B2, C2 = B.copy(), C.copy()
        (B2 if which == "B" else C2)[:, :, 1] += 1.0
        y2, S2 = ssd(x, dt, A, B2, C2, chunk_size=Q, impl=impl)
        changed = {h for h in range(H) if not np.array_equal(np.asarray(y2[:, :, h]), np.asarray(y[:, :, h]))}
        assert changed == group1, (which, changed)
        changed_state = {h for h in range(H) if not np.array_equal(np.asarray(S2[:, h]), np.asarray(S[:, h]))}
        assert changed_state == (group1 if which == "B" else set()), (which, changed_state)


def test_bfloat16_inputs_compute_in_float32() -> None:
    """bf16 inputs give float32 outputs equal to the fp32 run on the same (bf16-rounded) values."""
    x, dt, A, B, C, S0 = _inputs(Q + 1, seed=5)
    bf = [jnp.asarray(v, jnp.bfloat16) for v in (x, dt, B, C)]
    y, S = ssd_chunked(bf[0], bf[1], A, bf[2], bf[3], chunk_size=Q)
    y_ref, S_ref = ssd_sequential(*(v.astype(jnp.float32) for v in bf[:2]), A,
                                  *(v.astype(jnp.float32) for v in bf[2:]))
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert _rel(y, y_ref) < 1e-5 and _rel(S, S_ref) < 1e-5


def test_bad_shapes_raise_value_error() -> None:
    """Mismatched shapes and heads not divisible by groups raise ValueError."""
    x, dt, A, B, C, _ = _inputs(4)
    with pytest.raises(ValueError, match="shapes"):
        ssd_chunked(x, dt[:, :3], A, B, C, chunk_size=Q)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunked(x, dt, A, B[:, :, :2].repeat(2, axis=2), C[:, :, :2].repeat(2, axis=2), chunk_size=Q)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, chunk_size=Q, initial_state=jnp.zeros((b, H, P, N + 1)))


def test_reset_runs_each_packed_document_from_a_zero_state() -> None:
    """Documents packed in one row with a reset at each start: every document's outputs equal a separate run of it
    from zero (the first document continuing the initial state), with both algorithms; the final state is the last
    document's. Documents cross chunk boundaries and one starts exactly on one. Gradients stay finite and equal
    between the two algorithms."""
    L = 53
    x, dt, A, B, C, S0 = _inputs(L)
    starts = [0, 9, 16, 17, 40]  # 16: a chunk boundary; 17: a one-token document
    reset = np.zeros((b, L), bool)
    reset[:, starts[1:]] = True
    reset[1, 30] = True  # the second row differs
    for impl in ("chunked", "sequential"):
        y, final = ssd(x, dt, A, B, C, chunk_size=Q, initial_state=S0, impl=impl, reset=jnp.asarray(reset))
        for row in range(b):
            bounds = [*np.flatnonzero(reset[row]), L]
            lo = 0
            for hi in bounds:
                doc = [t[row:row + 1, lo:hi] for t in (x, dt, B, C)]
                init = S0[row:row + 1] if lo == 0 else None
                want_y, want_final = ssd_sequential(doc[0], doc[1], A, doc[2], doc[3], init)
                assert _rel(y[row:row + 1, lo:hi], want_y) < 1e-5, (impl, row, lo, hi)
                lo = hi
            assert _rel(final[row:row + 1], want_final) < 1e-5

    def loss(impl):
        def f(x, dt, B, C, S0):
            y, final = ssd_module.ssd(x, dt, A, B, C, chunk_size=Q, initial_state=S0, impl=impl,
                                      reset=jnp.asarray(reset))
            return jnp.sum(y * jnp.cos(y)) + jnp.sum(final ** 2)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4)))(x, dt, B, C, S0)

    for got, want in zip(loss("chunked"), loss("sequential"), strict=True):
        assert np.isfinite(np.asarray(got)).all()
        assert _rel(got, want) < 1e-4
