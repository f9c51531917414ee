"""The chunked SSD scan as three GPU kernels with chunk-level parallelism (the split of mamba_ssm's Triton kernels,
state-spaces/mamba@v2.2.4:mamba_ssm/ops/triton/ssd_combined.py: chunk state, state passing, chunk scan).

The fused kernel of `ssd_scan` walks the chunks of a sequence in one program, so a batch-1 prefill has only
b * H programs and each waits on its previous chunk. Here only the cheap part is sequential:

    chunk_states   grid (b, nc, H)        s_c = (w * x_c)^T @ B_c                      [P, N] per chunk and head
    state_passing  grid (b, H, P / bp)    S_0 = s0;  entering_c = S_c;  S_{c+1} = decay_c * S_c + s_c
    chunk_scan     grid (b, nc, H / hb)   y_c = (C_c B_c^T * exp(c_l - c_s) [s <= l] * dt_s) @ x_c
                                                + exp(c_l) * (C_c @ entering_c^T)

The inputs are those the `ssd_scan` wrapper prepares (sequence-major layout, L padded to a multiple of Q, N padded
to a power of two Nb, the per-token scalars c, w, dt and chunk decays of its module docstring, the reset counts k).
The chunk states and entering states go through memory in float32 ([b, nc, H, P, Nb] each: 268 MB for the 8B mixer
at L = 8192); everything else stays in registers. Depends on JAX alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dispatch

f32 = jnp.float32
_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]
_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_TN = (((0,), (0,)), ((), ()))  # [k, m] x [k, n]


def _dot(dot_dtype):
    precision = jax.lax.Precision.HIGHEST if dot_dtype == f32 else None  # IEEE f32 under Triton, not TF32
    return functools.partial(jax.lax.dot_general, preferred_element_type=f32, precision=precision)


def load_cols(ref, cols: int) -> jax.Array:
    """ref[...] with the columns (last dim) at and past `cols` read as 0. Triton does not mask a block that
    overhangs its array (a [Q, 128] block over P = 80 reaches into the next head), so those loads are masked."""
    if ref.shape[-1] == cols:
        return ref[...]
    mask = jax.lax.broadcasted_iota(jnp.int32, ref.shape, len(ref.shape) - 1) < cols
    return pltriton.load(ref, mask=mask, other=0)


def store_cols(ref, value: jax.Array, cols: int) -> None:
    """ref[...] = value for the columns (last dim) below `cols` only (see `load_cols`)."""
    if ref.shape[-1] == cols:
        ref[...] = value
        return
    mask = jax.lax.broadcasted_iota(jnp.int32, ref.shape, len(ref.shape) - 1) < cols
    pltriton.store(ref, value, mask=mask)


def _chunk_state_kernel(x_ref, B_ref, w_ref, s_ref, *, P: int, dot_dtype):
    # x [Q, Pb] (one head, one chunk), B [Q, Nb] (its group), w [Q, 1] end-state weights -> s [Pb, Nb]
    xw = load_cols(x_ref, P).astype(f32) * w_ref[...]
    s_ref[...] = _dot(dot_dtype)(xw.astype(dot_dtype), B_ref[...].astype(dot_dtype), _TN)


def _state_passing_kernel(s_ref, decay_ref, s0_ref, enter_ref, final_ref, *, nc: int):
    # s / enter [nc, bp, Nb] (one head, bp rows of P), decay [nc, 1, 1], s0 / final [bp, Nb]
    def step(c, S):
        enter_ref[c] = S
        return S * decay_ref[c] + s_ref[c]

    final_ref[...] = jax.lax.fori_loop(0, nc, step, s0_ref[...])


def _chunk_scan_kernel(x_ref, B_ref, C_ref, c_row_ref, c_col_ref, dt_ref, k_row_ref, k_col_ref, enter_ref, y_ref, *,
                       heads: int, P: int, dot_dtype):
    # x / y [Q, hb, Pb]; B / C [Q, Nb]; per head c and dt as rows [hb, 1, Q], c as a column [hb, Q, 1]; the reset
    # counts k as a row [1, Q] and a column [Q, 1]; enter [hb, Pb, Nb]
    dot = _dot(dot_dtype)
    Q = x_ref.shape[0]
    B_c = B_ref[...].astype(dot_dtype)
    C_c = C_ref[...].astype(dot_dtype)
    CB = dot(C_c, B_c, _NT)  # [Q, Q], shared by the heads of the group
    causal = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0) >= jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)
    k_col = k_col_ref[...]
    visible = causal & (k_col == k_row_ref[...])  # s <= l with no reset between them
    fresh = k_col == 0  # no reset in the chunk up to l: the entering state reaches l
    for h in range(heads):
        c_col = c_col_ref[h]
        seg = jnp.exp(jnp.where(visible, c_col - c_row_ref[h], -jnp.inf))  # exp(c_l - c_s)
        x_c = load_cols(x_ref.at[:, np.int32(h), :], P).astype(dot_dtype)
        y = dot((CB * seg * dt_ref[h]).astype(dot_dtype), x_c, _NN)
        y += dot(C_c, enter_ref[h].astype(dot_dtype), _NT) * jnp.where(fresh, jnp.exp(c_col), 0.0)
        store_cols(y_ref.at[:, np.int32(h), :], y.astype(y_ref.dtype), P)


def shared_bytes_bound(Q: int, Pb: int, Nb: int, itemsize: int) -> int:
    """An upper bound on the shared memory Triton gives the largest of the three kernels at chunk Q, power-of-two
    P / N tiles Pb / Nb and dot operands of `itemsize` bytes: the chunk scan's dot operands (C_c and B_c [Q, Nb],
    x_c [Q, Pb], the masked C B^T [Q, Q]) and the chunk states' ([Q, Pb], [Q, Nb]), as if all were staged at once.
    tests/pallas_kernels/test_kernel_resources.py checks it against Triton's own allocation at every preset."""
    return itemsize * max(Q * (2 * Nb + Pb + Q), Q * (Pb + Nb))


def gpu_chunk(chunk: int, Pb: int, Nb: int, itemsize: int, budget: int) -> int:
    """The chunk the kernels run: min(chunk, 128), halved while its `shared_bytes_bound` exceeds `budget` bytes
    (down to 16, tl.dot's minimum side). Any chunk gives the same result: the chunking only blocks the sum. Longer
    than 128 only adds register spills ([Q, Q] float32 tiles live in registers)."""
    Q = min(chunk, 128)
    while Q > 16 and Q % 2 == 0 and shared_bytes_bound(Q, Pb, Nb, itemsize) > budget:
        Q //= 2
    return Q


def _pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while n % (2 * d) == 0 and 2 * d <= cap:
        d *= 2
    return d


def chunked_scan(xp: jax.Array, Bp: jax.Array, Cp: jax.Array, c: jax.Array, w: jax.Array, dt: jax.Array,
                 decay: jax.Array, k: jax.Array, s0: jax.Array, *, Q: int, P: int, block_heads: int, dot_dtype,
                 interpret: bool, num_warps: int, backend: str | None) -> tuple[jax.Array, jax.Array]:
    """The three kernels on prepared inputs: xp [b, Lp, H, P], Bp / Cp [b, Lp, G, Nb], c / w / dt [b, H, Lp]
    float32 (dt: the input weight of the quadratic form), decay [b, H, nc], k [b, Lp], s0 [b, H, Pb, Nb] float32
    (P padded to the power of two Pb) -> (y [b, Lp, H, P] f32, final [b, H, Pb, Nb])."""
    b, Lp, H, _ = xp.shape
    G, Nb = Bp.shape[2], Bp.shape[3]
    R, nc = H // G, Lp // Q
    Pb = max(16, pl.next_power_of_2(P))  # power-of-two tiles; a block past P only reaches outputs never stored
    hb = _pow2_divisor(R, block_heads)
    bp = min(Pb, 32)
    params = None if interpret else dispatch.compiler_params(backend, num_warps=num_warps)
    rows = lambda t: t.reshape(b, H, nc, 1, Q)  # noqa: E731
    cols = lambda t: t.reshape(b, H, nc, Q, 1)  # noqa: E731

    states = pl.pallas_call(
        functools.partial(_chunk_state_kernel, P=P, dot_dtype=dot_dtype),
        out_shape=jax.ShapeDtypeStruct((b, nc, H, Pb, Nb), f32),
        grid=(b, nc, H),
        in_specs=[pl.BlockSpec((None, Q, None, Pb), lambda i, c, h: (i, c, h, 0)),
                  pl.BlockSpec((None, Q, None, Nb), lambda i, c, h: (i, c, h // R, 0)),
                  pl.BlockSpec((None, None, None, Q, 1), lambda i, c, h: (i, h, c, 0, 0))],
        out_specs=pl.BlockSpec((None, None, None, Pb, Nb), lambda i, c, h: (i, c, h, 0, 0)),
        interpret=interpret, compiler_params=params, name="ssd_chunk_states",
    )(xp, Bp, cols(w))

    entering, final = pl.pallas_call(
        functools.partial(_state_passing_kernel, nc=nc),
        out_shape=(jax.ShapeDtypeStruct(states.shape, f32), jax.ShapeDtypeStruct(s0.shape, f32)),
        grid=(b, H, Pb // bp),
        in_specs=[pl.BlockSpec((None, nc, None, bp, Nb), lambda i, h, j: (i, 0, h, j, 0)),
                  pl.BlockSpec((None, None, nc, 1, 1), lambda i, h, j: (i, h, 0, 0, 0)),
                  pl.BlockSpec((None, None, bp, Nb), lambda i, h, j: (i, h, j, 0))],
        out_specs=(pl.BlockSpec((None, nc, None, bp, Nb), lambda i, h, j: (i, 0, h, j, 0)),
                   pl.BlockSpec((None, None, bp, Nb), lambda i, h, j: (i, h, j, 0))),
        interpret=interpret, compiler_params=None if interpret else dispatch.compiler_params(backend, num_warps=4),
        name="ssd_state_passing",
    )(states, decay.reshape(b, H, nc, 1, 1), s0)

    head_block = lambda j: (j * hb) // R  # noqa: E731 -- the group of head block j (hb divides R)
    y = pl.pallas_call(
        functools.partial(_chunk_scan_kernel, heads=hb, P=P, dot_dtype=dot_dtype),
        out_shape=jax.ShapeDtypeStruct((b, Lp, H, P), f32),
        grid=(b, nc, H // hb),
        in_specs=[pl.BlockSpec((None, Q, hb, Pb), lambda i, c, j: (i, c, j, 0)),
                  pl.BlockSpec((None, Q, None, Nb), lambda i, c, j: (i, c, head_block(j), 0)),
                  pl.BlockSpec((None, Q, None, Nb), lambda i, c, j: (i, c, head_block(j), 0)),
                  pl.BlockSpec((None, hb, None, 1, Q), lambda i, c, j: (i, j, c, 0, 0)),
                  pl.BlockSpec((None, hb, None, Q, 1), lambda i, c, j: (i, j, c, 0, 0)),
                  pl.BlockSpec((None, hb, None, 1, Q), lambda i, c, j: (i, j, c, 0, 0)),
                  pl.BlockSpec((None, None, 1, Q), lambda i, c, j: (i, c, 0, 0)),
                  pl.BlockSpec((None, None, Q, 1), lambda i, c, j: (i, c, 0, 0)),
                  pl.BlockSpec((None, None, hb, Pb, Nb), lambda i, c, j: (i, c, j, 0, 0))],
        out_specs=pl.BlockSpec((None, Q, hb, Pb), lambda i, c, j: (i, c, j, 0)),
        interpret=interpret, compiler_params=params, name="ssd_chunk_scan",
    )(xp, Bp, Cp, rows(c), cols(c), rows(dt), k.reshape(b, nc, 1, Q), k.reshape(b, nc, Q, 1), entering)
    return y, final
