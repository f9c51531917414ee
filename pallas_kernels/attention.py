"""Causal flash attention through the Pallas kernels that ship with JAX (no copy of a kernel lives here).

    out = flash_attention(q, k, v, scale=d ** -0.5)            # q: [b, L, Hq, d], k, v: [b, L, Hkv, d]

Which kernel runs, by `backend` (default: JAX's default backend):

- "gpu": `jax.experimental.pallas.ops.gpu.attention.mha`, the Triton FlashAttention-2 kernel, causal, blocks of
  `block_q` x `block_k` in the forward pass and `block_bwd` x `block_bwd` in its fused dq/dk/dv backward pass.
- "cpu": the same `mha` kernel with `interpret=True` (Pallas has no CPU lowering); this is how it is tested.
- "tpu": `jax.experimental.pallas.ops.tpu.flash_attention.flash_attention` (layout [b, H, L, d]), causal. With
  `interpret=True` it runs under `pltpu.force_tpu_interpret_mode()`, the TPU simulator on CPU, which is how the
  TPU path is tested without a TPU.

The gradient is the shipped kernel's own `custom_vjp` backward (Triton dq/dk/dv kernels on GPU, the dkv and dq
kernels on TPU), not XLA autodiff of a reference.

Adapting our shapes to the shipped kernels, with what it costs:

- GQA: both kernels want as many kv heads as query heads (their BlockSpecs map query head h to kv head h), so K
  and V are repeated to Hq heads before the call (query head h reads kv head h // (Hq / Hkv), as in
  `nemojax.nn.attention.causal_attention`). That materialises Hq/Hkv copies of K and V in HBM and reads each
  once per query head: extra memory of 2 * b * L * (Hq - Hkv) * d elements per layer, and the backward pass sums
  the repeated heads' dk, dv back (autodiff of the repeat). Reading kv head h // g inside the kernel would avoid
  it, but only in a modified copy of the kernel.
- Length: both kernels need L to be a multiple of their blocks, so q, k, v are zero-padded at the end to Lp.
  Causal masking means a real query i < L only sees keys j <= i < L, never a pad key, so the real rows are
  exact; the pad rows are sliced off (and get a zero cotangent, so they add nothing to dk, dv).
- head_dim: `mha` pads head_dim to the next power of two itself (its BlockSpecs and masked loads), so any d
  works on GPU/CPU. The TPU kernel takes d < 128 as is and needs a multiple of 128 above that, so a larger d is
  zero-padded to the next multiple of 128 (zero q/k channels add nothing to the scores; zero v channels give
  zero output channels, sliced off).
- Segment ids (packed documents): both kernels take them natively (`mha`'s `segment_ids`, the TPU kernel's
  `SegmentIds`); pad positions get id -1, a segment no real token is in.
- Blocks: powers of two, at least 16 on GPU/CPU (Triton's `tl.dot` minimum) and at least 128 on TPU (the TPU
  kernel's lane width); each is clipped to the padded length, so a short sequence runs as one block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention

BACKENDS = ("gpu", "cpu", "tpu")
# smallest block each kernel accepts: Triton's tl.dot needs 16; the TPU kernel tiles keys by its 128 lanes
MIN_BLOCK = {"gpu": 16, "cpu": 16, "tpu": 128}
TPU_LANES = 128


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4:
        raise ValueError(f"q.shape={q.shape} is invalid: must be [batch, seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k.shape={k.shape} and v.shape={v.shape} are invalid: must be equal")
    if k.ndim != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        raise ValueError(f"k.shape={k.shape} is invalid for q.shape={q.shape}: must be "
                         f"[{q.shape[0]}, {q.shape[1]}, kv_heads, {q.shape[3]}] (self-attention: same batch, "
                         "length and head_dim as q)")
    if q.shape[1] == 0:
        raise ValueError(f"q.shape={q.shape} is invalid: the sequence length must be at least 1")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads={k.shape[2]} is invalid for q heads={q.shape[2]}: must divide it")


def _blocks(L: int, backend: str, **blocks: int) -> tuple[dict[str, int], int]:
    """Each block clipped to the sequence (a power of two >= the backend's minimum), and L padded to a multiple
    of all of them (they are powers of two, so a multiple of the largest)."""
    least = MIN_BLOCK[backend]
    for name, size in blocks.items():
        if size < least or size & (size - 1):
            raise ValueError(f"{name}={size} is invalid on backend {backend!r}: must be a power of two >= {least}")
    cap = max(least, 1 << (L - 1).bit_length())
    clipped = {name: min(size, cap) for name, size in blocks.items()}
    step = max(clipped.values())
    return clipped, -(-L // step) * step


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, backend: str | None = None,
                    interpret: bool | None = None, block_q: int = 128, block_k: int = 128,
                    block_bwd: int = 32, segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention softmax(scale * q k^T + causal mask) v by JAX's shipped Pallas flash attention.

    q: [b, L, Hq, d], k, v: [b, L, Hkv, d] with Hq a multiple of Hkv (query head h reads kv head h // (Hq/Hkv))
    -> [b, L, Hq, d] in q's dtype (k, v are cast to it; the kernels accumulate in float32). `backend` picks the
    kernel (module docstring); `interpret` defaults to True exactly on "cpu". block_q, block_k: forward tiles
    (GPU/CPU and TPU); block_bwd: the backward tiles of the GPU kernel (JAX's default 32 keeps its fused
    dq/dk/dv kernel in shared memory); the TPU backward reuses block_q, block_k. Differentiable wrt q, k, v.
    segment_ids: [b, L] int (packed documents): a query sees only the keys of its own segment.
    """
    backend = backend or jax.default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: must be one of {BACKENDS}")
    if interpret is None:
        interpret = backend == "cpu"
    if backend == "cpu" and not interpret:
        raise ValueError("interpret=False is invalid on backend 'cpu': Pallas has no CPU lowering; must be True "
                         "or None")
    _check_shapes(q, k, v)
    b, L, Hq, d = q.shape
    if segment_ids is not None and segment_ids.shape != (b, L):
        raise ValueError(f"segment_ids.shape={segment_ids.shape} is invalid: must be [batch, seq] = {(b, L)}")
    group = Hq // k.shape[2]
    # Expanded KV heads: the shipped kernels pair query head h with kv head h (see the module docstring's cost).
    k = jnp.repeat(k.astype(q.dtype), group, axis=2)
    v = jnp.repeat(v.astype(q.dtype), group, axis=2)
    if backend == "tpu":
        blocks, Lp = _blocks(L, backend, block_q=block_q, block_k=block_k)
        out = _tpu(q, k, v, scale=float(scale), Lp=Lp, interpret=bool(interpret), segment_ids=_pad_ids(segment_ids, Lp),
                   **blocks)
    else:
        blocks, Lp = _blocks(L, backend, block_q=block_q, block_k=block_k, block_bwd=block_bwd)
        # the backward kernel runs one program per kv block for dk/dv and per q block for dq, so it needs the
        # same q and kv block counts: one block size for all four backward tiles
        sizes = gpu_attention.BlockSizes(
            block_q=blocks["block_q"], block_k=blocks["block_k"], block_q_dkv=blocks["block_bwd"],
            block_kv_dkv=blocks["block_bwd"], block_q_dq=blocks["block_bwd"], block_kv_dq=blocks["block_bwd"])
        q, k, v = (_pad_axis(x, 1, Lp) for x in (q, k, v))
        out = gpu_attention.mha(q, k, v, _pad_ids(segment_ids, Lp), sm_scale=float(scale), causal=True,
                                block_sizes=sizes, interpret=bool(interpret))
    return out[:, :L]


def _pad_ids(segment_ids: jax.Array | None, Lp: int) -> jax.Array | None:
    """[b, L] segment ids -> [b, Lp] int32, the pad positions in segment -1."""
    if segment_ids is None:
        return None
    return jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, Lp - segment_ids.shape[1])], constant_values=-1)


def _tpu(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, Lp: int, interpret: bool, block_q: int,
         block_k: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """The TPU kernel on [b, L, H, d] inputs (equal heads): pad L to Lp and a large d to lanes, go head-major."""
    d = q.shape[3]
    dp = d if d <= TPU_LANES else -(-d // TPU_LANES) * TPU_LANES
    q, k, v = (jnp.transpose(_pad_axis(_pad_axis(x, 1, Lp), 3, dp), (0, 2, 1, 3)) for x in (q, k, v))
    sizes = tpu_attention.BlockSizes(
        block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
        block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k, block_q_dkv=block_q,
        block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q)
    segments = None if segment_ids is None else tpu_attention.SegmentIds(q=segment_ids, kv=segment_ids)
    call = functools.partial(tpu_attention.flash_attention, segment_ids=segments, causal=True, sm_scale=scale,
                             block_sizes=sizes)
    out = _tpu_interpreted(call, q, k, v) if interpret else call(q, k, v)
    return jnp.transpose(out, (0, 2, 1, 3))[..., :d]


def _tpu_interpreted(call, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`call` under the TPU simulator, backward pass included.

    force_tpu_interpret_mode applies to kernels traced inside it, and the kernel's custom_vjp backward is traced
    when the gradient is transposed, after this function has returned; so the forward linearises (jax.vjp)
    inside the context and the backward calls the saved vjp inside it again.
    """

    @jax.custom_vjp
    def run(q, k, v):
        with pltpu.force_tpu_interpret_mode():
            return call(q, k, v)

    def fwd(q, k, v):
        with pltpu.force_tpu_interpret_mode():
            return jax.vjp(call, q, k, v)

    def bwd(vjp, g):
        with pltpu.force_tpu_interpret_mode():
            return vjp(g)

    run.defvjp(fwd, bwd)
    return run(q, k, v)

