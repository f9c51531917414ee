"""One decode step's attention over a KV cache, reading only the filled part of the cache: JAX's shipped Pallas
split-K decode kernel (`jax.experimental.pallas.ops.gpu.decode_attention.gqa`, FlashDecoding) plus the new token.

    out = decode_attention(q, k, v, cache_k, cache_v, lengths, scale=d ** -0.5)

q: [b, Hq, d] the new token's queries; k, v: [b, Hkv, d] its key and value; cache_k, cache_v: [b, Hkv, S, d], the
head-major cache as nemojax.infer holds it, of which row i's first lengths[i] entries are filled (the new token is
not in it yet: attention reads the cache before writing it). -> [b, Hq, d] in q's dtype.

The kernel splits the S axis into `k_splits` parts, one program each, and walks each part in blocks of `block_k` only
up to lengths[i]: a part past the filled length is skipped and a partly filled one stops at its last filled block,
so a step costs O(length), not O(S) (the XLA path, `nemojax.nn.attention.cached_attention`, reads the whole cache
with a mask). Its un-normalised output, running max and denominator per split are merged here with the new token's
own score, one softmax over the cache entries and the token. The kernel wants [b, S, Hkv, d]; the cache is passed
through two transposes that cancel, so nothing is copied. S must split into power-of-two blocks (`supports`);
nemojax falls back to the XLA path otherwise. bfloat16 / float16 caches only: an f32 `tl.dot` would run as TF32.
Depends on JAX alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import decode_attention as shipped

f32 = jnp.float32


def _splits(S: int, block_k: int, k_splits: int) -> tuple[int, int] | None:
    """(k_splits, block_k) dividing S into parts of >= 16 entries made of whole power-of-two blocks, or None."""
    block = block_k
    while block >= 16 and S % block:
        block //= 2
    if block < 16:
        return None
    splits = k_splits
    while splits > 1 and (S % splits or (S // splits) % block or S // splits < 16):
        splits //= 2
    return splits, block


def supports(cache_k: jax.Array, block_k: int = 128, k_splits: int = 16) -> bool:
    """Whether `decode_attention` takes a cache like cache_k [b, Hkv, S, d]: bf16 / f16 and S a multiple of 16."""
    return cache_k.dtype in (jnp.bfloat16, jnp.float16) and _splits(cache_k.shape[2], block_k, k_splits) is not None


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     lengths: jax.Array, *, scale: float, interpret: bool = False, block_k: int = 128,
                     k_splits: int = 16) -> jax.Array:
    """Attention of one new token per row over its filled cache entries and itself (shapes: module docstring)."""
    b, Hq, d = q.shape
    _, Hkv, S, _ = cache_k.shape
    if cache_k.shape != cache_v.shape or k.shape != (b, Hkv, d) or v.shape != k.shape or Hq % Hkv:
        raise ValueError(f"decode_attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}, cache "
                         f"{cache_k.shape} / {cache_v.shape}; allowed: q [b, Hq, d], k/v [b, Hkv, d], cache "
                         "[b, Hkv, S, d] with Hkv dividing Hq")
    split = _splits(S, block_k, k_splits)
    if split is None or not supports(cache_k, block_k, k_splits):
        raise ValueError(f"decode_attention: cache {cache_k.shape} {cache_k.dtype}; allowed: bfloat16/float16 and "
                         "a length S that is a multiple of 16 (see `supports`)")
    splits, block = split
    q = q.astype(cache_k.dtype)
    out, (denom, peak) = shipped.gqa(q, jnp.swapaxes(cache_k, 1, 2), jnp.swapaxes(cache_v, 1, 2),
                                     kv_seq_len=lengths.astype(jnp.int32), sm_scale=float(scale), block_k=block,
                                     k_splits=splits, interpret=interpret, return_residuals=True,
                                     normalize_output=False)
    # merge with the new token: out, denom, peak are the cache's un-normalised sum, its softmax denominator and max
    g = Hq // Hkv
    own = jnp.einsum("bkgd,bkd->bkg", q.reshape(b, Hkv, g, d).astype(f32), k.astype(cache_k.dtype).astype(f32))
    own = (own * scale).reshape(b, Hq)
    top = jnp.maximum(peak, own)
    w_cache = jnp.where(denom > 0, jnp.exp(peak - top), 0.0)  # an empty cache (length 0) adds nothing
    w_own = jnp.exp(own - top)
    v_own = jnp.repeat(v.astype(cache_v.dtype).astype(f32), g, axis=1)  # [b, Hq, d]
    total = out.astype(f32) * w_cache[..., None] + v_own * w_own[..., None]
    return (total / (denom * w_cache + w_own)[..., None]).astype(q.dtype)
