"""Single-token selective state update (Mamba-2 decode step) as a Pallas kernel, plus its pure-JAX reference.

Per batch row and head h (group g = h // (H / G), the repeat-interleave of spec 6.10):

    S <- exp(dt_h * A_h) * S + dt_h * x_h (outer) B_g        S: [P, N], float32
    y_h = S @ C_g + D_h * x_h

This is one step of `nemojax.nn.ssd.ssd_sequential` (L = 1) followed by the mixer's D skip, i.e. what the Mamba-2
mixer computes when decoding one token. `dt` is taken as the mixer passes it to the scan: already
`clip(softplus(dt + dt_bias), time_step_limit)`; `A = -exp(A_log)`.

Shapes (b batch, H heads, P head dim, G groups, N state size):

    state: [b, H, P, N] float32     x: [b, H, P]     dt: [b, H]     A: [H]     B, C: [b, G, N]     D: [H]
    returns (y [b, H, P] float32, new_state [b, H, P, N] float32)

x, B, C may be bf16 (the mixer's compute dtype); everything is computed in float32. The kernel writes the new state
over the old one (`input_output_aliases`): donate `state` under `jax.jit(..., donate_argnums=...)` and no second
state buffer is allocated on an accelerator.

Layout: heads are viewed as [G, R] (R = H / G heads per group; a free reshape), and the grid is
(b, G / gb, R / rb), each program owning gb * rb <= block_heads heads that read gb groups' B/C, so B/C need no
repeat inside the kernel. gb, rb are divisors of G, R (no padding: a pad would copy the state and lose the
in-place update), so any H works; an awkward H just gets smaller blocks. gb * rb is a power of two and the P and N
blocks are rounded up to powers of two (Triton's tensors have power-of-two sizes): a block that overhangs the
array (P = 80 in Nemotron Nano 2 gets a 128-row block) reads unspecified values past the end, which only ever
reach masked-off outputs, except along N, the reduction of y, where the kernel zeroes them itself.

Depends on JAX alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch

f32 = jnp.float32


def _check(state, x, dt, A, B, C, D) -> tuple[int, int, int, int, int]:
    b, H, P, N = state.shape
    G = B.shape[1] if B.ndim == 3 else -1
    if (x.shape != (b, H, P) or dt.shape != (b, H) or A.shape != (H,) or D.shape != (H,)
            or B.shape != (b, G, N) or C.shape != B.shape):
        raise ValueError(f"ssd_update shapes disagree: state {state.shape}, x {x.shape}, dt {dt.shape}, "
                         f"A {A.shape}, B {B.shape}, C {C.shape}, D {D.shape}")
    if H % G:
        raise ValueError(f"ssd_update: {H} heads do not divide into {G} groups")
    return b, H, P, G, N


def ssd_update_reference(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array,
                         C: jax.Array, D: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pure-JAX single-token state update (shapes in the module docstring): (y, new_state), float32."""
    b, H, P, G, N = _check(state, x, dt, A, B, C, D)
    R = H // G
    x, dt, A, D = x.astype(f32), dt.astype(f32), A.astype(f32), D.astype(f32)
    B_h = jnp.repeat(B.astype(f32), R, axis=1)  # [b, H, N]
    C_h = jnp.repeat(C.astype(f32), R, axis=1)
    decay = jnp.exp(dt * A)  # [b, H]
    new_state = (state.astype(f32) * decay[..., None, None]
                 + (x * dt[..., None])[..., :, None] * B_h[..., None, :])
    y = jnp.einsum("bhpn,bhn->bhp", new_state, C_h) + D[:, None] * x
    return y, new_state


def _largest_pow2_divisor_at_most(n: int, cap: int) -> int:
    d = 1
    while n % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return d


def head_blocks(H: int, G: int, block_heads: int) -> tuple[int, int]:
    """(gb, rb): groups and heads-per-group handled by one program; gb | G, rb | H/G, gb * rb <= block_heads and a
    power of two (whole groups per program only when a group's heads all fit)."""
    R = H // G
    rb = _largest_pow2_divisor_at_most(R, block_heads)
    gb = _largest_pow2_divisor_at_most(G, block_heads // R) if rb == R else 1
    return gb, rb


def _pow2(n: int) -> int:
    return pl.next_power_of_2(n)


def _kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, y_ref, new_state_ref, *, N: int):
    # Blocks: state [gb, rb, Pb, Nb]; x [gb, rb, Pb]; dt, A, D [gb, rb]; B, C [gb, Nb] (batch dim squeezed), with
    # Pb, Nb >= P, N powers of two (see the module docstring).
    S = state_ref[...].astype(f32)
    x = x_ref[...].astype(f32)
    dt = dt_ref[...].astype(f32)
    A = A_ref[...].astype(f32)
    Bm = B_ref[...].astype(f32)
    Cm = C_ref[...].astype(f32)
    D = D_ref[...].astype(f32)
    decay = jnp.exp(dt * A)  # [gb, rb]
    S = S * decay[:, :, None, None] + (x * dt[:, :, None])[:, :, :, None] * Bm[:, None, None, :]
    new_state_ref[...] = S
    SC = S * Cm[:, None, None, :]
    if SC.shape[-1] != N:  # the block overhangs N: keep the lanes past it out of the sum
        SC = jnp.where(jax.lax.broadcasted_iota(jnp.int32, SC.shape, 3) < N, SC, 0.0)
    y_ref[...] = (jnp.sum(SC, axis=-1) + D[:, :, None] * x).astype(y_ref.dtype)


def ssd_update(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
               D: jax.Array, *, interpret: bool = False, block_heads: int = 8,
               backend: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One decode step of the Mamba-2 state, as a Pallas kernel: (y [b, H, P] f32, new_state [b, H, P, N] f32).

    Shapes and semantics in the module docstring. `state` must be float32 and is updated in place when donated.
    `block_heads` caps the heads per program (rounded down to a group-compatible divisor of H, see `head_blocks`).
    `interpret=True` runs the kernel through the Pallas interpreter (any backend, e.g. CPU tests). `backend`:
    the platform it is lowered for (default: JAX's default backend). Differentiable: the backward is the vjp of
    `ssd_update_reference` (a step of elementwise products; a kernel would gain nothing).
    """
    _check(state, x, dt, A, B, C, D)
    if state.dtype != f32:
        raise ValueError(f"ssd_update: state must be float32, got {state.dtype}")
    return _ssd_update(state, x, dt, A, B, C, D, interpret, block_heads, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ssd_update(state, x, dt, A, B, C, D, interpret, block_heads, backend):
    return _update(state, x, dt, A, B, C, D, interpret, block_heads, backend)


def _ssd_update_fwd(state, x, dt, A, B, C, D, interpret, block_heads, backend):
    return _update(state, x, dt, A, B, C, D, interpret, block_heads, backend), (state, x, dt, A, B, C, D)


def _ssd_update_bwd(interpret, block_heads, backend, residuals, cotangents):
    del interpret, block_heads, backend
    _, vjp = jax.vjp(ssd_update_reference, *residuals)
    return vjp(cotangents)


_ssd_update.defvjp(_ssd_update_fwd, _ssd_update_bwd)


def _update(state, x, dt, A, B, C, D, interpret: bool, block_heads: int, backend: str | None):
    b, H, P, G, N = _check(state, x, dt, A, B, C, D)
    R = H // G
    gb, rb = head_blocks(H, G, block_heads)
    grid = (b, G // gb, R // rb)

    state5 = state.reshape(b, G, R, P, N)
    x4 = x.reshape(b, G, R, P)
    dt3 = dt.reshape(b, G, R)
    A2, D2 = A.reshape(G, R), D.reshape(G, R)
    sq = pl.Squeezed() if hasattr(pl, "Squeezed") else None

    Pb, Nb = _pow2(P), _pow2(N)
    state_spec = pl.BlockSpec((sq, gb, rb, Pb, Nb), lambda i, g, r: (i, g, r, 0, 0))
    x_spec = pl.BlockSpec((sq, gb, rb, Pb), lambda i, g, r: (i, g, r, 0))
    dt_spec = pl.BlockSpec((sq, gb, rb), lambda i, g, r: (i, g, r))
    head_spec = pl.BlockSpec((gb, rb), lambda i, g, r: (g, r))
    bc_spec = pl.BlockSpec((sq, gb, Nb), lambda i, g, r: (i, g, 0))

    y4, new_state5 = pl.pallas_call(
        functools.partial(_kernel, N=N),
        out_shape=(jax.ShapeDtypeStruct((b, G, R, P), f32), jax.ShapeDtypeStruct(state5.shape, f32)),
        grid=grid,
        in_specs=[state_spec, x_spec, dt_spec, head_spec, bc_spec, bc_spec, head_spec],
        out_specs=(x_spec, state_spec),
        input_output_aliases={0: 1},  # state (input 0) is written as new_state (output 1)
        interpret=interpret,
        compiler_params=None if interpret else dispatch.compiler_params(backend),
        name="ssd_update",
    )(state5, x4, dt3, A2, B, C, D2)
    return y4.reshape(b, H, P), new_state5.reshape(b, H, P, N)
