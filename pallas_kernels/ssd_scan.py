"""The chunked Mamba-2 SSD scan (prefill and training) as Pallas kernels, forward and backward, plus a pure-JAX
reference.

Per batch row and head h (group g = h // (H / G); Mamba-2, arXiv:2405.21060 section 6, and the grouped B/C of
state-spaces/mamba@v2.2.4:mamba_ssm/ops/triton/ssd_combined.py):

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t        S: [P, N], float32
    y_t = S_t @ C_t

the same contract as `nemojax.nn.ssd.ssd_chunked` (the D skip, gate and norm belong to the mixer). Shapes:

    x: [b, L, H, P]   dt: [b, L, H] (after softplus and clamp)   A: [H] (negative)   B, C: [b, L, G, N]
    initial_state: [b, H, P, N] or None   reset: [b, L] bool or None (S_{t-1} is dropped before token t: the first
    token of a packed document)
    returns y: [b, L, H, P] float32 and final_state: [b, H, P, N] float32

Internally the scan runs on a per-token log-decay a = dt * A and input weight w = dt, so that the backward can run
the same kernels on other inputs (below). The wrapper pads L to a multiple of the chunk Q (a = w = 0 and x = 0 on
pads: decay 1, no input, so the final state is exact) and computes the per-token scalars of every head, O(b L H)
next to the O(b L H P N) scan: the in-chunk inclusive cumsum c_l of a, the weight w_s exp(c_{Q-1} - c_s) of token s
in its chunk's end state, and the chunk decay exp(c_{Q-1}). Per chunk c:

    CB      = C_c @ B_c^T                                     [Q, Q], shared by the heads of the group
    y_c     = (CB * exp(c_l - c_s) [s <= l] * w_s) @ x_c      intra-chunk, the quadratic form
            + exp(c_l) * (C_c @ S^T)                          the state entering the chunk
    S      <- exp(c_{Q-1}) * S + (w' * x_c)^T @ B_c           [P, N]

Two algorithms compute it. "fused" (GPU and TPU; "auto"): one program owns `block_heads` heads of one group and
walks the chunks in order in a `fori_loop`, carrying the states in registers, so no chunk state goes to memory.
"chunked" (GPU; `pallas_kernels.ssd_chunked`): three kernels with chunk-level parallelism, the chunk states through
memory. On an H200 (experiments/results/) the fused kernel was the faster of the two at the 8B and Nano 2 shapes.
Resets are masks, not infinite log-decays (a difference of running sums would turn -inf into NaN): with k_t the
number of resets in the chunk up to t, the quadratic form keeps s only if k_s = k_l, the entering state reaches l
only if k_l = 0, the end state takes s only if k_s = k_{Q-1}, and the chunk decay is 0 when the chunk holds a reset.
In-chunk decays are differences of the cumsum, as in mamba_ssm's kernels; the XLA path's masked segment sums avoid
that cancellation (a difference of 1e-7 to 1e-6 relative in the tests, growing with the chunk).

Dots take `dot_dtype` operands with float32 accumulation: float32 (Precision.HIGHEST) when B and C are float32, else
bfloat16, the tensor-core path of a bf16 model. The state, decays and y are always float32.

Backward (`custom_vjp`): the adjoint of the SSD is an SSD in reverse time, so the gradients come from three more
runs of the same kernels. With G_t = dL/dS_t = dy_t C_t^T + exp(a_{t+1}) G_{t+1} (+ dfinal at the end):
  1. x' = dy, B' = C, C' = B in reversed time, log-decays a shifted by one, weight 1, initial state dfinal:
     its y is G_t B_t, so dx_t = dt_t G_t B_t, and its final state gives d initial_state = exp(a_0) G_0;
  2. the same run transposed (x' = C per head, B' = dy, C' = x): G_t^T x_t, so dB_t = sum_h dt_t G_t^T x_t;
  3. forward time with x' = B per head, B' = x, C' = dy, weight dt, initial state S_0^T: S_t^T dy_t = dC_t (summed
     over the group's heads);
and the decays from dL/dc_t = dy_t . y_t - dt_t x_t . G_t B_t (+ <dfinal, final> at the last token), summed from the
end of each document (a = dt * A gives ddt and dA). Runs 2 and 3 have one "group" per head.

Layouts. GPU (Triton): every tensor in a kernel has a power-of-two size, so P is rounded up to a power of two Pb (at
least 16, `tl.dot`'s minimum); Triton does not mask a block that overhangs its array, so the loads of x and the
stores of y mask the columns past P (Nano 2's P = 80) and the states are held padded to Pb. N, which is contracted,
is zero-padded in the wrapper (a no-op for every preset: N is 128 or 256). The chunk must be a power of two; the
GPU kernels shorten it, and the fused one drops a pipeline stage, until their shared-memory bound fits the device
(`resources.device_limits`). Refs hold a head's whole sequence and the loop reads [Q, P] slices, the layout of JAX's
own Pallas GPU attention (x, y stay [b, L, H, P]: no transpose). TPU (Mosaic) tiles the last two dims of every
block, so there the wrapper moves heads before the sequence ([b, H, L, P] and [b, G, L, N] slabs, one transpose
each way), and the per-token scalars come as [.., 1, Q] rows and [.., Q, 1] columns in both layouts. The TPU layout
is tested in interpret mode and under JAX's TPU interpreter and lowers to Mosaic from a CPU host; it has not run on
a TPU. Depends on JAX alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import dispatch, resources
from pallas_kernels.ssd_chunked import chunked_scan, gpu_chunk, load_cols, store_cols

f32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_NT = (((1,), (1,)), ((), ()))  # [m, k] x [n, k]
_TN = (((0,), (0,)), ((), ()))  # [k, m] x [k, n]


def _check(x, dt, A, B, C, initial_state, chunk_size, reset=None) -> tuple[int, ...]:
    if x.ndim != 4 or B.ndim != 4:
        raise ValueError(f"ssd_scan: x has shape {x.shape}, B {B.shape}; allowed: x [b, L, H, P], B/C [b, L, G, N]")
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if dt.shape != (b, L, H) or A.shape != (H,) or B.shape != (b, L, G, N) or C.shape != B.shape:
        raise ValueError(f"ssd_scan shapes disagree: x {x.shape}, dt {dt.shape}, A {A.shape}, B {B.shape}, "
                         f"C {C.shape}")
    if H % G:
        raise ValueError(f"ssd_scan: {H} heads do not divide into {G} groups")
    if initial_state is not None and initial_state.shape != (b, H, P, N):
        raise ValueError(f"initial_state has shape {initial_state.shape}; allowed: {(b, H, P, N)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size!r}; allowed: a positive integer")
    if reset is not None and reset.shape != (b, L):
        raise ValueError(f"reset has shape {reset.shape}; allowed: {(b, L)}")
    return b, L, H, P, G, N


def _token_scalars(a: jax.Array, w_in: jax.Array, Q: int,
                   reset: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-head token scalars of padded log-decays a and input weights w_in [b, H, Lp] and reset [b, Lp] (see the
    module docstring) -> (c [b, H, Lp] in-chunk cumsum of a, w [b, H, Lp] end-state weights, chunk_decay
    [b, H, nc], k [b, Lp] float32 in-chunk reset count)."""
    b, H, Lp = a.shape
    nc = Lp // Q
    c = jnp.cumsum(a.reshape(b, H, nc, Q), axis=-1)
    total = c[..., -1:]
    if reset is None:
        k = jnp.zeros((b, 1, nc, Q), f32)
    else:
        k = jnp.cumsum(reset.reshape(b, 1, nc, Q).astype(f32), axis=-1)
    w = jnp.where(k == k[..., -1:], jnp.exp(total - c) * w_in.reshape(c.shape), 0.0)
    decay = jnp.where(k[..., -1] == 0, jnp.exp(total[..., 0]), 0.0)
    return c.reshape(b, H, Lp), w.reshape(b, H, Lp), decay, k.reshape(b, Lp)


def _pad_axis(t: jax.Array, axis: int, size: int) -> jax.Array:
    pad = size - t.shape[axis]
    if pad == 0:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, pad)
    return jnp.pad(t, widths)


# --------------------------------------------------------------------------------------------------- reference


def ssd_scan_reference(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *,
                       chunk_size: int = 128, initial_state: jax.Array | None = None,
                       reset: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The kernel's algorithm in plain JAX, float32 throughout (shapes in the module docstring): a `lax.scan` over
    chunks carrying the state, each chunk's quadratic form batched over heads."""
    b, L, H, P, G, N = _check(x, dt, A, B, C, initial_state, chunk_size, reset)
    Q, R = chunk_size, H // G
    Lp = L + (-L % Q)
    nc = Lp // Q
    dt_h = _pad_axis(jnp.swapaxes(dt.astype(f32), 1, 2), 2, Lp)  # [b, H, Lp]
    c, w, chunk_decay, k = _token_scalars(dt_h * A.astype(f32)[:, None], dt_h, Q,
                                          None if reset is None else _pad_axis(reset, 1, Lp))

    def chunked(t: jax.Array, axis: int) -> jax.Array:  # [..., Lp at axis, ...] -> chunk axis first
        t = _pad_axis(t, axis, Lp)
        t = t.reshape(*t.shape[:axis], nc, Q, *t.shape[axis + 1:])
        return jnp.moveaxis(t, axis, 0)

    xs = chunked(x.astype(f32).reshape(b, L, G, R, P), 1)  # [nc, b, Q, G, R, P]
    Bs, Cs = chunked(B.astype(f32), 1), chunked(C.astype(f32), 1)  # [nc, b, Q, G, N]
    hs = [chunked(t.reshape(b, G, R, Lp), 3) for t in (c, w, dt_h)]  # [nc, b, G, R, Q]
    ks = chunked(k, 1)  # [nc, b, Q]
    decays = jnp.moveaxis(chunk_decay.reshape(b, G, R, nc), 3, 0)  # [nc, b, G, R]
    S0 = jnp.zeros((b, H, P, N), f32) if initial_state is None else initial_state.astype(f32)
    causal = jnp.tril(jnp.ones((Q, Q), bool))

    def chunk(S, inputs):  # S: [b, G, R, P, N]
        x_c, B_c, C_c, c_c, w_c, dt_c, k_c, decay = inputs
        CB = jnp.einsum("blgn,bsgn->bgls", C_c, B_c)
        visible = (causal & (k_c[:, :, None] == k_c[:, None, :]))[:, None, None]  # [b, 1, 1, Q, Q]
        seg = jnp.exp(jnp.where(visible, c_c[..., :, None] - c_c[..., None, :], -jnp.inf))  # [b, G, R, Q, Q]
        y = jnp.einsum("bgrls,bsgrp->blgrp", CB[:, :, None] * seg * dt_c[..., None, :], x_c)
        entering = jnp.where(k_c[:, None, None] == 0, jnp.exp(c_c), 0.0)  # [b, G, R, Q]
        y = y + jnp.einsum("blgn,bgrpn->blgrp", C_c, S) * jnp.moveaxis(entering, -1, 1)[..., None]
        S = S * decay[..., None, None] + jnp.einsum("bsgrp,bsgn->bgrpn", x_c * jnp.moveaxis(w_c, -1, 1)[..., None],
                                                    B_c)
        return S, y

    final, ys = jax.lax.scan(chunk, S0.reshape(b, G, R, P, N), (xs, Bs, Cs, *hs, ks, decays))
    y = jnp.moveaxis(ys, 0, 1).reshape(b, Lp, H, P)[:, :L]
    return y, final.reshape(b, H, P, N)


# ------------------------------------------------------------------------------------------------------ kernel


def _kernel(x_ref, B_ref, C_ref, c_row_ref, c_col_ref, w_ref, dt_ref, decay_ref, k_row_ref, k_col_ref, s0_ref, y_ref,
            s_ref, *, Q: int, nc: int, heads: int, P: int, dot_dtype, head_major: bool):
    """One program: `heads` heads of one group, all chunks. Refs (per program): x/y [Lp, heads, Pb] (or
    [heads, Lp, Pb] head-major), B/C [Lp, Nb], per head and chunk c as a row [heads, nc, 1, Q] and as a column
    (c, w) [heads, nc, Q, 1], the input weight as a row [heads, nc, 1, Q], decay [heads, nc, 1, 1], the in-chunk
    reset count k (shared by the heads) as a row [nc, 1, Q] and a column [nc, Q, 1], s0/s [heads, Pb, Nb]."""
    precision = jax.lax.Precision.HIGHEST if dot_dtype == f32 else None
    dot = functools.partial(jax.lax.dot_general, preferred_element_type=f32, precision=precision)
    causal = jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 0) >= jax.lax.broadcasted_iota(jnp.int32, (Q, Q), 1)

    def chunk(ci, states):
        t = pl.ds(pl.multiple_of(ci * Q, Q), Q)
        B_c = B_ref[t, :].astype(dot_dtype)  # [Q, Nb]
        C_c = C_ref[t, :].astype(dot_dtype)
        CB = dot(C_c, B_c, _NT)  # [Q, Q], once for the group
        k_col = k_col_ref[ci]  # [Q, 1]
        visible = causal & (k_col == k_row_ref[ci])  # s <= l, with no reset between them
        fresh = k_col == 0  # no reset in the chunk up to l: the entering state reaches l
        out = []
        for h, S in enumerate(states):
            x_c = (x_ref[h, t, :] if head_major else load_cols(x_ref.at[t, np.int32(h), :], P)).astype(f32)  # [Q, Pb]
            c_col = c_col_ref[h, ci]  # [Q, 1]
            seg = jnp.exp(jnp.where(visible, c_col - c_row_ref[h, ci], -jnp.inf))  # exp(c_l - c_s)
            y = dot((CB * seg * dt_ref[h, ci]).astype(dot_dtype), x_c.astype(dot_dtype), _NN)
            y += dot(C_c, S.astype(dot_dtype), _NT) * jnp.where(fresh, jnp.exp(c_col), 0.0)
            if head_major:
                y_ref[h, t, :] = y
            else:
                store_cols(y_ref.at[t, np.int32(h), :], y, P)
            update = dot((x_c * w_ref[h, ci]).astype(dot_dtype), B_c, _TN)  # [Pb, Nb]
            out.append(S * decay_ref[h, ci] + update)
        return tuple(out)

    states = tuple(s0_ref[h].astype(f32) for h in range(heads))
    states = jax.lax.fori_loop(0, nc, chunk, states)
    for h, S in enumerate(states):
        s_ref[h] = S


def _pow2(n: int) -> int:
    return max(16, pl.next_power_of_2(n))


def fused_shared_bytes_bound(Q: int, Pb: int, Nb: int, bc_bytes: int, x_bytes: int, stages: int) -> int:
    """An upper bound on the shared memory Triton gives the fused GPU kernel: the chunk loop's loads (B_c, C_c
    [Q, Nb], x_c [Q, Pb]) staged `stages` times by the software pipeline, plus the state [Pb, Nb] and x_c^T staged
    once as dot operands. tests/pallas_kernels/test_kernel_resources.py checks it against Triton's own allocation
    at every preset (it is within 15% of it at the 8B forward)."""
    return stages * Q * (2 * Nb * bc_bytes + Pb * x_bytes) + (Pb * Nb + Q * Pb) * bc_bytes


def fused_launch(chunk: int, Pb: int, Nb: int, bc_bytes: int, x_bytes: int, budget: int) -> tuple[int, int]:
    """(chunk, num_stages) for the fused GPU kernel: two pipeline stages if they fit `budget` bytes, else one,
    else the chunk halved (down to 16), from at most 128 (its [Q, Q] float32 tiles live in registers; a longer
    chunk only adds spills, and any chunk gives the same result). Measured on an H200 at the 8B shape: 2 stages
    ran 15% faster than 1."""
    Q = min(chunk, 128)
    while True:
        for stages in (2, 1):
            if fused_shared_bytes_bound(Q, Pb, Nb, bc_bytes, x_bytes, stages) <= budget:
                return Q, stages
        if Q <= 16 or Q % 2:
            return Q, 1
        Q //= 2


@dataclasses.dataclass(frozen=True)
class Launch:
    """How the scan runs (hashable: a static argument of the custom_vjp). algorithm "fused" or "chunked" (see the
    module docstring); block_heads, num_warps: Triton launch choices; num_stages: the fused kernel's software
    pipelining depth (None: sized from the device's shared memory); interpret; backend: the platform lowered for."""

    algorithm: str
    block_heads: int
    num_warps: int
    num_stages: int | None
    interpret: bool
    backend: str | None


def _scan(x, a, w_in, B, C, s0, reset, chunk_size: int, launch: Launch) -> tuple[jax.Array, jax.Array]:
    """The scan on log-decays a and input weights w_in [b, L, H] (x [b, L, H, P], B / C [b, L, G, N], s0
    [b, H, P, N] float32, reset [b, L] float32 0/1) -> (y [b, L, H, P], final [b, H, P, N]) float32."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    backend, interpret = launch.backend, launch.interpret
    Q, R = chunk_size, H // G
    if not interpret and (Q & (Q - 1)):
        raise ValueError(f"chunk_size={Q}; allowed on GPU/TPU: a power of two (Triton tensor sides, TPU tiles)")
    head_major = (backend or jax.default_backend()) == "tpu"
    Pb, Nb = _pow2(P), _pow2(N)
    dot_dtype = f32 if B.dtype == f32 and C.dtype == f32 else jnp.bfloat16
    bc_bytes = jnp.dtype(dot_dtype).itemsize
    stages = launch.num_stages
    if not head_major:  # the chunk (the same result at any chunk) and pipelining that fit the device
        budget = resources.device_limits().max_shared_bytes_per_block
        if launch.algorithm == "chunked":
            Q = gpu_chunk(Q, Pb, Nb, bc_bytes, budget)
        elif stages is None:
            Q, stages = fused_launch(Q, Pb, Nb, bc_bytes, x.dtype.itemsize, budget)
    hb = max(d for d in range(1, min(launch.block_heads, R) + 1) if R % d == 0)  # heads per program: divides R
    Lp = L + (-L % Q)
    nc = Lp // Q

    a_h, w_h = (_pad_axis(jnp.swapaxes(t.astype(f32), 1, 2), 2, Lp) for t in (a, w_in))  # [b, H, Lp]
    c, w, decay, k = _token_scalars(a_h, w_h, Q, _pad_axis(reset, 1, Lp))
    rows = lambda t: t.reshape(b, H, nc, 1, Q)  # noqa: E731
    cols = lambda t: t.reshape(b, H, nc, Q, 1)  # noqa: E731
    # Pads get x = 0 (and a = w = 0): no input, decay 1, so the state passes through unchanged. B and C are padded
    # along N with zeros, since N is contracted; the states are held padded to [Pb, Nb].
    xp = _pad_axis(x, 1, Lp)
    Bp, Cp = (_pad_axis(_pad_axis(t, 1, Lp), 3, Nb) for t in (B, C))
    s0 = _pad_axis(_pad_axis(s0.astype(f32), 2, Pb), 3, Nb)
    if launch.algorithm == "chunked":
        y, final = chunked_scan(xp, Bp, Cp, c, w, w_h, decay, k, s0, Q=Q, P=P, block_heads=launch.block_heads,
                                dot_dtype=dot_dtype, interpret=interpret, num_warps=launch.num_warps,
                                backend=backend)
        return y[:, :L], final[:, :, :P, :N]
    if head_major:  # TPU tiles the last two dims of a block: give it whole [Lp, P] and [Lp, N] slabs
        xp, Bp, Cp = (jnp.swapaxes(t, 1, 2) for t in (xp, Bp, Cp))

    head_block = lambda i, g, j: g * (R // hb) + j  # noqa: E731 -- the head-block index of program (i, g, j)
    if head_major:
        seq_heads = pl.BlockSpec((None, hb, Lp, Pb), lambda i, g, j: (i, head_block(i, g, j), 0, 0))
        seq_group = pl.BlockSpec((None, None, Lp, Nb), lambda i, g, j: (i, g, 0, 0))
        y_shape = (b, H, Lp, P)
    else:
        seq_heads = pl.BlockSpec((None, Lp, hb, Pb), lambda i, g, j: (i, 0, head_block(i, g, j), 0))
        seq_group = pl.BlockSpec((None, Lp, None, Nb), lambda i, g, j: (i, 0, g, 0))
        y_shape = (b, Lp, H, P)
    per_chunk = lambda r, q: pl.BlockSpec((None, hb, nc, r, q),  # noqa: E731
                                          lambda i, g, j: (i, head_block(i, g, j), 0, 0, 0))
    state = pl.BlockSpec((None, hb, Pb, Nb), lambda i, g, j: (i, head_block(i, g, j), 0, 0))
    per_row = lambda r, q: pl.BlockSpec((None, nc, r, q), lambda i, g, j: (i, 0, 0, 0))  # noqa: E731
    params = {"num_warps": launch.num_warps, **({} if stages is None else {"num_stages": stages})}
    y, final = pl.pallas_call(
        functools.partial(_kernel, Q=Q, nc=nc, heads=hb, P=P, dot_dtype=dot_dtype, head_major=head_major),
        out_shape=(jax.ShapeDtypeStruct(y_shape, f32), jax.ShapeDtypeStruct((b, H, Pb, Nb), f32)),
        grid=(b, G, R // hb),
        in_specs=[seq_heads, seq_group, seq_group, per_chunk(1, Q), per_chunk(Q, 1), per_chunk(Q, 1),
                  per_chunk(1, Q), per_chunk(1, 1), per_row(1, Q), per_row(Q, 1), state],
        out_specs=(seq_heads, state),
        interpret=interpret,
        compiler_params=None if interpret else dispatch.compiler_params(backend, **params),
        name="ssd_scan",
    )(xp, Bp, Cp, rows(c), cols(c), cols(w), rows(w_h), decay.reshape(b, H, nc, 1, 1), k.reshape(b, nc, 1, Q),
      k.reshape(b, nc, Q, 1), s0)
    if head_major:
        y = jnp.swapaxes(y, 1, 2)
    return y[:, :L], final[:, :, :P, :N]


# ------------------------------------------------------------------------------------------------------ backward


def _reversed(t: jax.Array) -> jax.Array:
    return jnp.flip(t, axis=1)


def _reversed_shifted(t: jax.Array) -> jax.Array:
    """[b, L, ...] -> t' with t'_0 = 0 and t'_s = t_{L-s}: what token t + 1 does to token t, in reversed time."""
    r = _reversed(t)
    return jnp.concatenate([jnp.zeros_like(r[:, :1]), r[:, :-1]], axis=1)


def _document_suffix_sums(v: jax.Array, reset: jax.Array) -> jax.Array:
    """out_t = sum of v_u over u >= t in t's document, 0 where reset_t (a document's first token has no decay):
    v [b, L, H], reset [b, L] 0/1. A linear recurrence out'_t = v_t + keep_{t+1} out'_{t+1}, associatively."""
    keep = 1.0 - jnp.concatenate([reset[:, 1:], jnp.zeros_like(reset[:, :1])], axis=1)[..., None]

    def combine(left, right):  # (multiplier, addend) pairs, applied from the end of the sequence
        return left[0] * right[0], left[1] * right[0] + right[1]

    _, sums = jax.lax.associative_scan(combine, (jnp.broadcast_to(keep, v.shape), v), reverse=True, axis=1)
    return jnp.where(reset[..., None] > 0, 0.0, sums)


def _scan_vjp(chunk_size: int, launch: Launch, residuals, cotangents):
    """Gradients of the scan by three more runs of the kernels (the module docstring's Backward)."""
    x, dt, A, B, C, s0, reset, y, final = residuals
    dy, dfinal = (t.astype(f32) for t in cotangents)
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    dt32, A32 = dt.astype(f32), A.astype(f32)
    a = dt32 * A32
    a_rev, reset_rev, ones = _reversed_shifted(a), _reversed_shifted(reset), jnp.ones_like(a)
    scan = functools.partial(_scan, chunk_size=chunk_size, launch=launch)
    per_head = lambda t: jnp.repeat(t, R, axis=2)  # noqa: E731 -- [b, L, G, N] -> [b, L, H, N]
    by_group = lambda t: t.reshape(b, L, G, R, N).sum(axis=3)  # noqa: E731 -- [b, L, H, N] -> [b, L, G, N]
    lowp = B.dtype  # the roles B / C of runs 2 and 3 take the forward's operand precision

    GB_rev, G0 = scan(_reversed(dy), a_rev, ones, _reversed(C), _reversed(B), dfinal, reset_rev)  # run 1
    GB = _reversed(GB_rev)  # [b, L, H, P]: G_t B_t
    dx = dt32[..., None] * GB
    ds0 = jnp.where(reset[:, 0, None] > 0, 0.0, jnp.exp(a[:, 0]))[..., None, None] * G0
    GTx_rev, _ = scan(_reversed(per_head(C)), a_rev, ones, _reversed(dy).astype(lowp),  # run 2
                      _reversed(x).astype(lowp), jnp.swapaxes(dfinal, 2, 3), reset_rev)
    dB = by_group(dt32[..., None] * _reversed(GTx_rev))
    STdy, _ = scan(per_head(B), a, dt32, x.astype(lowp), dy.astype(lowp),  # run 3
                   jnp.swapaxes(s0.astype(f32), 2, 3), reset)
    dC = by_group(STdy)

    x_GB = jnp.sum(x.astype(f32) * GB, axis=-1)  # [b, L, H]
    dc = jnp.sum(dy * y, axis=-1) - dt32 * x_GB  # dL/dc_t, c the running sum of a within a document
    dc = dc.at[:, -1].add(jnp.sum(dfinal * final, axis=(-2, -1)))
    da = _document_suffix_sums(dc, reset)
    ddt = x_GB + da * A32
    dA = jnp.sum(da * dt32, axis=(0, 1))
    return (dx.astype(x.dtype), ddt.astype(dt.dtype), dA.astype(A.dtype), dB.astype(B.dtype), dC.astype(C.dtype),
            ds0.astype(s0.dtype), jnp.zeros_like(reset))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _ssd_scan(x, dt, A, B, C, initial_state, reset, chunk_size, launch):
    a = dt.astype(f32) * A.astype(f32)
    return _scan(x, a, dt, B, C, initial_state, reset, chunk_size, launch)


def _ssd_scan_fwd(x, dt, A, B, C, initial_state, reset, chunk_size, launch):
    y, final = _ssd_scan(x, dt, A, B, C, initial_state, reset, chunk_size, launch)
    return (y, final), (x, dt, A, B, C, initial_state, reset, y, final)


_ssd_scan.defvjp(_ssd_scan_fwd, _scan_vjp)


ALGORITHMS = ("auto", "fused", "chunked")


def ssd_scan(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, chunk_size: int = 128,
             initial_state: jax.Array | None = None, reset: jax.Array | None = None, block_heads: int = 1,
             interpret: bool = False, num_warps: int = 8, num_stages: int | None = None,
             backend: str | None = None, algorithm: str = "auto") -> tuple[jax.Array, jax.Array]:
    """The chunked SSD scan as Pallas kernels: (y [b, L, H, P], final_state [b, H, P, N]), both float32.

    Any L (not a multiple of the chunk, shorter than it, 1). `block_heads`: heads of one group per program (the
    largest divisor of H / G not above it), which share the chunk's C @ B^T; more heads per program mean fewer
    programs and more state held at once. `num_warps`, `num_stages`: the Triton launch on GPU (num_stages None:
    the most the device's shared memory holds). `backend`: the platform the kernels are lowered for and so their
    layout (default: JAX's default backend). `algorithm`: "auto" (= "fused"), "fused" or "chunked" (GPU layout
    only). `reset`: [b, L] bool, packed documents (see the module docstring).
    Differentiable: the backward runs the same kernels (see the module docstring).
    """
    if not isinstance(block_heads, int) or block_heads <= 0:
        raise ValueError(f"block_heads={block_heads!r}; allowed: a positive integer")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}; allowed: {ALGORITHMS}")
    if algorithm == "auto":
        algorithm = "fused"
    elif algorithm == "chunked" and (backend or jax.default_backend()) == "tpu":
        raise ValueError("algorithm='chunked' is the GPU (sequence-major) layout; allowed on TPU: 'fused' or 'auto'")
    _check(x, dt, A, B, C, initial_state, chunk_size, reset)
    if initial_state is None:  # a zero state and no resets, so the custom_vjp sees arrays only
        initial_state = jnp.zeros((x.shape[0], x.shape[2], x.shape[3], B.shape[-1]), f32)
    reset = jnp.zeros(x.shape[:2], f32) if reset is None else reset.astype(f32)
    launch = Launch(algorithm, block_heads, num_warps, num_stages, interpret, backend)
    return _ssd_scan(x, dt, A, B, C, initial_state, reset, chunk_size, launch)
