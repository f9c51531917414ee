"""State-space duality (SSD): the Mamba-2 selective scan, two ways.

Both functions compute, per head h with state S in R^{P x N} (docs/numerics.md 1):

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t @ C_t

with head h reading the B/C of group h // (H / G) (repeat-interleave, docs/numerics.md 1). The D skip, the gate and the
norm belong to the mixer. Everything runs in float32 whatever the input dtype (docs/numerics.md 4).

`ssd_sequential` is the oracle: a `lax.scan` over time. `ssd_chunked` is the chunked algorithm of docs/numerics.md 2
(quadratic attention-like form inside chunks of Q tokens, a scan over chunk states between them), written
group-aware so B/C are never expanded to H heads. Shapes:

    x: [b, L, H, P]   dt: [b, L, H] (after softplus and clamp)   A: [H] (negative)
    B, C: [b, L, G, N]   initial_state: [b, H, P, N] or None
    reset: [b, L] bool or None: S_{t-1} is dropped before token t (the first token of a packed document)
    returns y: [b, L, H, P] float32 and final_state: [b, H, P, N] float32

A reset is a log-decay dt_t * A of -inf at token t, so exp(.) = 0 cuts every path from before t. Both algorithms
only ever add log-decays (never subtract running sums), so -inf stays -inf and nothing turns into NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

f32 = jnp.float32


def ssd(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, chunk_size: int,
        initial_state: jax.Array | None = None, impl: str = "chunked",
        reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Dispatches to `ssd_chunked` or `ssd_sequential` (see the module docstring for shapes)."""
    if impl == "chunked":
        return ssd_chunked(x, dt, A, B, C, chunk_size=chunk_size, initial_state=initial_state, reset=reset)
    if impl == "sequential":
        return ssd_sequential(x, dt, A, B, C, initial_state=initial_state, reset=reset)
    raise ValueError(f"impl={impl!r} is invalid: must be 'chunked' or 'sequential'")


def _check_shapes(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array) -> tuple[int, ...]:
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if dt.shape != (b, L, H) or A.shape != (H,) or B.shape != (b, L, G, N) or C.shape != B.shape:
        raise ValueError(f"ssd shapes disagree: x {x.shape}, dt {dt.shape}, A {A.shape}, B {B.shape}, C {C.shape}")
    if H % G:
        raise ValueError(f"ssd: {H} heads do not divide into {G} groups")
    return b, L, H, P, G, N


def log_decay(dt: jax.Array, A: jax.Array, reset: jax.Array | None) -> jax.Array:
    """dt: [b, L, H] float32, A: [H], reset: [b, L] bool or None -> dt * A, with -inf where a reset drops the state."""
    a = dt * A.astype(f32)
    if reset is None:
        return a
    if reset.shape != dt.shape[:2]:
        raise ValueError(f"reset has shape {reset.shape}, expected [b, L] = {dt.shape[:2]}")
    return jnp.where(reset[..., None], -jnp.inf, a)


def _initial(initial_state: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    if initial_state is None:
        return jnp.zeros(shape, f32)
    if initial_state.shape != shape:
        raise ValueError(f"initial_state has shape {initial_state.shape}, expected {shape}")
    return initial_state.astype(f32)


def _scan(x, dt, A, B, C, initial_state, keep_states: bool, reset=None):
    b, L, H, P, G, N = _check_shapes(x, dt, A, B, C)
    R = H // G
    # Time-major inputs for the scan; B/C repeat-interleaved from groups to heads.
    x_t = jnp.moveaxis(x.astype(f32), 1, 0)
    dt_t = jnp.moveaxis(dt.astype(f32), 1, 0)
    a_t = jnp.moveaxis(log_decay(dt.astype(f32), A, reset), 1, 0)
    B_t = jnp.moveaxis(jnp.repeat(B.astype(f32), R, axis=2), 1, 0)
    C_t = jnp.moveaxis(jnp.repeat(C.astype(f32), R, axis=2), 1, 0)
    A = A.astype(f32)

    def step(S_bhpn, inputs):
        x_bhp, dt_bh, a_bh, B_bhn, C_bhn = inputs
        decay_bh = jnp.exp(a_bh)
        S_bhpn = (S_bhpn * decay_bh[..., None, None]
                  + jnp.einsum("bhp,bhn->bhpn", x_bhp * dt_bh[..., None], B_bhn))
        y_bhp = jnp.einsum("bhpn,bhn->bhp", S_bhpn, C_bhn)
        return S_bhpn, (y_bhp, S_bhpn) if keep_states else y_bhp

    final, out = jax.lax.scan(step, _initial(initial_state, (b, H, P, N)), (x_t, dt_t, a_t, B_t, C_t))
    if keep_states:
        return jnp.moveaxis(out[0], 0, 1), jnp.moveaxis(out[1], 0, 1)
    return jnp.moveaxis(out, 0, 1), final


def ssd_sequential(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                   initial_state: jax.Array | None = None,
                   reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The recurrence, one token at a time (`lax.scan` over L). The test oracle for every other SSD."""
    return _scan(x, dt, A, B, C, initial_state, keep_states=False, reset=reset)


def ssd_states(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
               initial_state: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The recurrence keeping the state after every token: (y [b, L, H, P], states [b, L, H, P, N]).

    For short extensions whose committed length is decided afterwards (speculative verification)."""
    return _scan(x, dt, A, B, C, initial_state, keep_states=True)


def cumsum(x: jax.Array, axis: int) -> jax.Array:
    """Inclusive cumulative sum as a log-depth tree of adds. (On CPU `jnp.cumsum` lowers to a reduce_window whose
    cost is quadratic in the axis length, which made the Q x Q segment sums the slowest part of the chunked SSD.)"""
    return jax.lax.associative_scan(jnp.add, x, axis=axis)


def segsum(a: jax.Array) -> jax.Array:
    """out[..., i, j] = sum_{j < k <= i} a[..., k] for j <= i, and -inf above the diagonal.

    Built by masking then summing rather than by subtracting two cumsums: the difference of two large running
    sums loses the small in-chunk decays to cancellation (docs/numerics.md 2).
    """
    T = a.shape[-1]
    rows = jnp.broadcast_to(a[..., :, None], (*a.shape, T))  # rows[..., k, j] = a_k
    k_after_j = jnp.tril(jnp.ones((T, T), bool), -1)
    sums = cumsum(jnp.where(k_after_j, rows, 0.0), axis=-2)
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), sums, -jnp.inf)


def ssd_chunked(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, chunk_size: int,
                initial_state: jax.Array | None = None,
                reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Chunked SSD for any L (L < chunk and L not a multiple of it included).

    Index names: g group, r head within its group (h = g*R + r), c chunk, l/s positions in a chunk, p head
    channel, n state. Work arrays are head-major ([b, g, r, c, l, ...]) so every einsum is a batched matmul over
    leading dimensions.
    """
    b, L, H, P, G, N = _check_shapes(x, dt, A, B, C)
    R, Q = H // G, chunk_size
    pad = -L % Q
    nc = (L + pad) // Q

    # Discretise, then pad: on pads dt*A = 0 (decay 1) and X = 0 (no input), so the final state is unchanged
    # (docs/numerics.md 2: padding raw dt would decay the state through softplus(dt_bias)).
    dt = dt.astype(f32)
    X = x.astype(f32) * dt[..., None]
    a = log_decay(dt, A, reset)

    def chunks(t: jax.Array) -> jax.Array:
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        return t.reshape(b, nc, Q, *t.shape[2:])

    X = jnp.transpose(chunks(X).reshape(b, nc, Q, G, R, P), (0, 3, 4, 1, 2, 5))  # [b, g, r, c, l, p]
    a = jnp.transpose(chunks(a).reshape(b, nc, Q, G, R), (0, 3, 4, 1, 2))  # [b, g, r, c, l]
    B = jnp.transpose(chunks(B.astype(f32)), (0, 3, 1, 2, 4))  # [b, g, c, l, n]
    C = jnp.transpose(chunks(C.astype(f32)), (0, 3, 1, 2, 4))
    a_cumsum = cumsum(a, axis=-1)  # decay from the chunk start to each position (inclusive)

    # 1. Within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(sum_{s<k<=l} a_k) X_s.
    CB = jnp.einsum("bgcln,bgcsn->bgcls", C, B)
    y = jnp.einsum("bgrcls,bgrcsp->bgrclp", CB[:, :, None] * jnp.exp(segsum(a)), X)

    # 2. Each chunk's own end state: the decay from s to the chunk end is exp(sum_{k>s} a_k), a shifted reverse
    # cumsum (no cancellation).
    suffix = jnp.flip(cumsum(jnp.flip(a, -1), axis=-1), -1)
    to_end = jnp.exp(jnp.concatenate([suffix[..., 1:], jnp.zeros_like(suffix[..., :1])], axis=-1))
    local = jnp.einsum("bgcsn,bgrcsp->bgrcpn", B, X * to_end[..., None])

    # 3. Pass states between chunks: S_in[c+1] = exp(sum of chunk c's a) * S_in[c] + local[c].
    chunk_decay = jnp.exp(jnp.moveaxis(a_cumsum[..., -1], -1, 0))  # [c, b, g, r]
    S0 = _initial(initial_state, (b, H, P, N)).reshape(b, G, R, P, N)

    def carry_state(S_bgrpn, inputs):
        decay_bgr, local_bgrpn = inputs
        return S_bgrpn * decay_bgr[..., None, None] + local_bgrpn, S_bgrpn

    final, entering = jax.lax.scan(carry_state, S0, (chunk_decay, jnp.moveaxis(local, 3, 0)))

    # 4. The entering state's contribution: exp(a_cumsum_l) * (C_l . S_in).
    y = y + jnp.einsum("bgcln,cbgrpn->bgrclp", C, entering) * jnp.exp(a_cumsum)[..., None]

    y = jnp.transpose(y, (0, 3, 4, 1, 2, 5)).reshape(b, nc * Q, H, P)[:, :L]
    return y, final.reshape(b, H, P, N)
