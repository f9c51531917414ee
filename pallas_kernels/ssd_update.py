"""Single-token selective state update (Mamba-2 decode step) as a Pallas kernel, plus its pure-JAX reference.

Per batch row and head h (group g = h // (H / G), the repeat-interleave of docs/numerics.md 1):

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

Layout: the step is bound by streaming the state once (read + write, 8 bytes per element), so the grid is
(b, H, P / bp) and each program owns one [bp, N] slab of one head's state (bp a power of two, default 32: 16 KB
of f32 at N = 128, few registers per thread, and b * H * P / bp programs to keep every SM's loads in flight).
The head's B/C rows are read straight from their group (the index map sends head h to group h // (H / G), so B/C
are never repeated in memory) and dt, A, D arrive as one scalar per program. Any H, G (G | H) and P: bp is a
power of two that divides P (Nemotron Nano 2's P = 80 gets 16), since Triton does not mask a block that
overhangs its array and the rows past a head's P are the next head's (an H200 run with bp = 32 at P = 80 wrote
over them). N is padded to a power of two in the block only, with masked state loads and stores and the lanes past
N kept out of y's sum. No padding in memory (a pad would copy the state and lose the in-place update).

Depends on JAX alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.ssd_chunked import load_cols, store_cols

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


def p_block(P: int, block_p: int) -> int:
    """The rows of a head's state per program: the largest power of two <= `block_p` that divides P (P = 80 gets
    16). Triton does not mask a block that overhangs its array, and here the rows past P are the next head's."""
    if block_p <= 0 or block_p & (block_p - 1):
        raise ValueError(f"block_p={block_p}; allowed: a positive power of two")
    bp = 1
    while P % (2 * bp) == 0 and 2 * bp <= block_p:
        bp *= 2
    return bp


def _kernel(state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, y_ref, new_state_ref, *, N: int):
    # Blocks (batch and head dims squeezed): state [bp, Nb]; x [bp]; dt, A, D [1, 1]; B, C [Nb] of the head's
    # group, with bp, Nb powers of two (see the module docstring).
    dt = dt_ref[0, 0].astype(f32)
    decay = jnp.exp(dt * A_ref[0, 0].astype(f32))
    x = x_ref[...].astype(f32)
    Bv = B_ref[...].astype(f32)
    Cv = C_ref[...].astype(f32)
    S = load_cols(state_ref, N) * decay + (x * dt)[:, None] * Bv[None, :]
    store_cols(new_state_ref, S, N)  # a block past N would reach into the next row: masked
    SC = S * Cv[None, :]
    if SC.shape[1] != N:  # the block overhangs N: keep the lanes past it (unspecified, maybe NaN) out of the sum
        SC = jnp.where(jax.lax.broadcasted_iota(jnp.int32, SC.shape, 1) < N, SC, 0.0)
    y_ref[...] = jnp.sum(SC, axis=1) + D_ref[0, 0].astype(f32) * x


def ssd_update(state: jax.Array, x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
               D: jax.Array, *, interpret: bool = False, block_p: int = 32, num_warps: int | None = None,
               backend: str | None = None) -> tuple[jax.Array, jax.Array]:
    """One decode step of the Mamba-2 state, as a Pallas kernel: (y [b, H, P] f32, new_state [b, H, P, N] f32).

    Shapes and semantics in the module docstring. `state` must be float32 and is updated in place when donated.
    `block_p`: state rows per program (a power of two; capped at P rounded up, see `p_block`); `num_warps`: the
    Triton launch width on GPU (None: Triton's default, 4). `interpret=True` runs the kernel through the Pallas
    interpreter (any backend, e.g. CPU tests). `backend`: the platform it is lowered for (default: JAX's default
    backend). Differentiable: the backward is the vjp of `ssd_update_reference` (a step of elementwise products;
    a kernel would gain nothing).
    """
    _check(state, x, dt, A, B, C, D)
    if state.dtype != f32:
        raise ValueError(f"ssd_update: state must be float32, got {state.dtype}")
    p_block(state.shape[2], block_p)
    if num_warps is not None and (num_warps <= 0 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps={num_warps}; allowed: None or a positive power of two")
    return _ssd_update(state, x, dt, A, B, C, D, interpret, block_p, num_warps, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _ssd_update(state, x, dt, A, B, C, D, interpret, block_p, num_warps, backend):
    return _update(state, x, dt, A, B, C, D, interpret, block_p, num_warps, backend)


def _ssd_update_fwd(state, x, dt, A, B, C, D, interpret, block_p, num_warps, backend):
    out = _update(state, x, dt, A, B, C, D, interpret, block_p, num_warps, backend)
    return out, (state, x, dt, A, B, C, D)


def _ssd_update_bwd(interpret, block_p, num_warps, backend, residuals, cotangents):
    del interpret, block_p, num_warps, backend
    _, vjp = jax.vjp(ssd_update_reference, *residuals)
    return vjp(cotangents)


_ssd_update.defvjp(_ssd_update_fwd, _ssd_update_bwd)


def _update(state, x, dt, A, B, C, D, interpret: bool, block_p: int, num_warps: int | None, backend: str | None):
    b, H, P, G, N = _check(state, x, dt, A, B, C, D)
    R = H // G
    bp, Nb = p_block(P, block_p), pl.next_power_of_2(N)
    grid = (b, H, pl.cdiv(P, bp))
    sq = pl.Squeezed() if hasattr(pl, "Squeezed") else None

    # scalars per (batch, head) / per head as [.., 1] columns: a (1, 1) block is one element, read as ref[0, 0]
    dt3, A2, D2 = dt.reshape(b, H, 1), A.reshape(H, 1), D.reshape(H, 1)
    state_spec = pl.BlockSpec((sq, sq, bp, Nb), lambda i, h, p: (i, h, p, 0))
    x_spec = pl.BlockSpec((sq, sq, bp), lambda i, h, p: (i, h, p))
    dt_spec = pl.BlockSpec((sq, 1, 1), lambda i, h, p: (i, h, 0))
    head_spec = pl.BlockSpec((1, 1), lambda i, h, p: (h, 0))
    bc_spec = pl.BlockSpec((sq, sq, Nb), lambda i, h, p: (i, h // R, 0))  # the head's group: no repeat of B/C

    triton = {} if num_warps is None else dict(num_warps=num_warps)
    y, new_state = pl.pallas_call(
        functools.partial(_kernel, N=N),
        out_shape=(jax.ShapeDtypeStruct((b, H, P), f32), jax.ShapeDtypeStruct(state.shape, f32)),
        grid=grid,
        in_specs=[state_spec, x_spec, dt_spec, head_spec, bc_spec, bc_spec, head_spec],
        out_specs=(x_spec, state_spec),
        input_output_aliases={0: 1},  # state (input 0) is written as new_state (output 1)
        interpret=interpret,
        compiler_params=None if interpret else dispatch.compiler_params(backend, **triton),
        name="ssd_update",
    )(state, x, dt3, A2, B, C, D2)
    return y, new_state
