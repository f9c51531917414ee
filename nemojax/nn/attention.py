"""Grouped-query causal attention. NemotronH uses no positional encoding; partial RoPE (NeoX rotate-half) is an
option for the Nemotron-4 family (docs/numerics.md 6)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.lowp import fake
from nemojax.nn.linear import calibrated, calibrating, dense, logical_param, record_amax
from nemojax.nn.live import keep
from nemojax.nn.segments import document_positions
from nemojax.nn.state import Extend, KVCache
from pallas_kernels import attention as pallas_attention
from pallas_kernels import decode_attention as pallas_decode
from pallas_kernels import dispatch

f32 = jnp.float32


def apply_rope(x: jax.Array, positions: jax.Array, theta: float, rotary_dim: int) -> jax.Array:
    """Rotates the first `rotary_dim` channels of each head, rotate-half style (channel i pairs with
    i + rotary_dim/2); the rest pass through. x: [b, L, heads, head_dim], positions: [b, L]."""
    inv_freq = theta ** (-jnp.arange(0, rotary_dim, 2, dtype=f32) / rotary_dim)
    freqs = positions.astype(f32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    rot, rest = x[..., :rotary_dim].astype(f32), x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    rot = rot * jnp.cos(angles) + rotated_half * jnp.sin(angles)
    return jnp.concatenate([rot.astype(x.dtype), rest], axis=-1)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, offset: int, seg_q: jax.Array | None = None,
            seg_k: jax.Array | None = None) -> jax.Array:
    """Softmax attention of queries at positions offset.. over keys 0..; q is pre-scaled.

    q: [b, Lq, Hkv, g, d], k, v: [b, Lk, Hkv, d] -> [b, Lq, Hkv, g, d]; query i sees keys j <= offset + i, and
    with segment ids (seg_q [b, Lq], seg_k [b, Lk]) only those of its own segment.
    """
    Lq, Lk = q.shape[1], k.shape[1]
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=f32)
    visible = jnp.arange(Lk)[None, :] <= offset + jnp.arange(Lq)[:, None]
    if seg_q is not None:
        visible = (visible & (seg_q[:, :, None] == seg_k[:, None, :]))[:, None, None]  # [b, 1, 1, Lq, Lk]
    scores = jnp.where(visible, scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgls,bskd->blkgd", probs, v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *, block: int = 128,
                     segment_ids: jax.Array | None = None) -> jax.Array:
    """Exact causal softmax attention, scores and softmax in float32.

    q: [b, L, Hq, d], k, v: [b, L, Hkv, d] with Hq a multiple of Hkv (query head h reads kv head h // (Hq/Hkv))
    -> [b, L, Hq, d]. Queries go in blocks of `block`, each against the keys up to its own end, so the masked
    upper triangle is mostly never computed (about half the work and memory of the dense form at long L).
    segment_ids: [b, L] (packed documents): a query sees only the keys of its own segment.
    """
    b, L, Hq, d = q.shape
    Hkv = k.shape[2]
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, L, Hkv, Hq // Hkv, d)

    def seg(lo: int, hi: int) -> jax.Array | None:
        return None if segment_ids is None else segment_ids[:, lo:hi]

    blocks = [_attend(q[:, s:s + block], k[:, :s + block], v[:, :s + block], s, seg(s, s + block), seg(0, s + block))
              for s in range(0, L, block)]
    out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)
    return out.reshape(b, L, Hq, d)


def cudnn_takes(q: jax.Array) -> bool:
    """Whether cuDNN's fused attention (as `jax.nn.dot_product_attention` calls it) takes queries like q
    [b, L, Hq, d]: bfloat16 / float16 and a head_dim up to 128 in steps of 8."""
    d = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0


def attention_impl(impl: str, q: jax.Array, packed: bool, backend: str | None = None) -> str:
    """The implementation `self_attention` runs for the setting `impl`, queries like q and packed (segment ids) or
    plain sequences on `backend` (default: JAX's default backend)."""
    if impl == "auto":
        impl = dispatch.resolve("attention_packed" if packed else "attention", "auto", backend)
        if impl == "cudnn" and not cudnn_takes(q):
            impl = "xla"
    return dispatch.resolve("attention", impl, backend)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, impl: str = "xla",
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """Causal self-attention (no cache) by the implementation the setting `impl` (`runtime.attention_impl`) resolves to.

    q: [b, L, Hq, d], k, v: [b, L, Hkv, d] -> [b, L, Hq, d]. "xla": `causal_attention`, the oracle the others are
    tested against. "pallas": JAX's shipped Pallas flash attention (`pallas_kernels.attention`; interpreted on
    CPU). "cudnn": `jax.nn.dot_product_attention`'s cuDNN fused kernel (GPU only, bfloat16/float16; GQA natively).
    "auto": what `pallas_kernels.dispatch` has validated for this backend, separately for plain and packed
    sequences (cuDNN only where it takes the case: bfloat16/float16, head_dim <= 128 and a multiple of 8, no
    segments); "xla" where no device run has validated anything.
    segment_ids: [b, L] (packed documents) keep each query within its segment ("xla" and "pallas").
    """
    impl = attention_impl(impl, q, segment_ids is not None)
    if segment_ids is not None and impl == "cudnn":
        raise ValueError("runtime.attention_impl='cudnn' does not take segment_ids (packed documents); use 'xla' or "
                         "'pallas', or train without train.document_mask")
    if impl == "pallas":
        return pallas_attention.flash_attention(q, k, v, scale=scale, interpret=dispatch.interpret(),
                                                segment_ids=segment_ids)
    if impl == "cudnn":
        backend = jax.default_backend()
        if backend != "gpu":
            raise ValueError(f"runtime.attention_impl='cudnn' is invalid on backend {backend!r}: cuDNN runs on GPU "
                             "only; must be one of ('xla', 'pallas', 'auto') here")
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"runtime.attention_impl='cudnn' is invalid for dtype={q.dtype}: cuDNN flash attention "
                             "takes bfloat16 or float16; use runtime.dtype='bfloat16' or runtime.attention_impl "
                             "'xla', 'pallas' or 'auto'")
        return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=scale, is_causal=True,
                                            implementation="cudnn")
    return causal_attention(q, k, v, scale, segment_ids=segment_ids)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: KVCache, start: jax.Array,
                     scale: float) -> jax.Array:
    """New queries against the cache as it was before them, plus the new keys and values.

    q: [b, T, Hq, d]; k, v: [b, T, Hkv, d], the new tokens' keys and values; cache k/v: [b, Hkv, S, d]; start:
    [b] -> [b, T, Hq, d]. Query t of sequence i sits at position start[i] + t and sees the cache entries before
    start[i] and the new tokens 0..t, in one softmax over both. Work is O(T * S), meant for short T (decode
    steps, speculative verification).

    Call it before `write_kv`: every read of the cache then precedes the in-place write, so inside a decode loop
    XLA updates the loop-carried cache buffers where they lie instead of copying them each step (with
    `nemojax.infer.extend.DECODE_COMPILER_OPTIONS`). The head-major cache makes both products batched matmuls
    over (b, Hkv) that read it in place.
    """
    b, T, Hq, d = q.shape
    Hkv, S = cache.k.shape[1], cache.k.shape[2]
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, T, Hkv, Hq // Hkv, d)
    # The new entries as the cache will hold them, so this step sees what later steps will see.
    k = k.astype(cache.k.dtype).astype(q.dtype)
    v = v.astype(cache.v.dtype).astype(q.dtype)
    old = jnp.einsum("btkgd,bksd->bkgts", q, cache.k.astype(q.dtype), preferred_element_type=f32)
    before = jnp.arange(S)[None, :] < start[:, None]  # [b, S]
    old = jnp.where(before[:, None, None, None], old, jnp.finfo(f32).min)
    new = jnp.einsum("btkgd,bukd->bkgtu", q, k, preferred_element_type=f32)
    new = jnp.where(jnp.tril(jnp.ones((T, T), bool)), new, jnp.finfo(f32).min)
    # One softmax over [old, new] without concatenating them; token t always sees itself, so peak is finite.
    peak = jnp.maximum(old.max(-1), new.max(-1))[..., None]  # [b, Hkv, g, T, 1]
    p_old, p_new = jnp.exp(old - peak), jnp.exp(new - peak)
    total = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
    out = (jnp.einsum("bkgts,bksd->bkgtd", p_old.astype(q.dtype), cache.v.astype(q.dtype), preferred_element_type=f32)
           + jnp.einsum("bkgtu,bukd->bkgtd", p_new.astype(q.dtype), v, preferred_element_type=f32))
    out = (out / total).astype(q.dtype)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, T, Hq, d)


def write_kv(cache: KVCache, k: jax.Array, v: jax.Array, start: jax.Array) -> KVCache:
    """Stores k, v: [b, T, Hkv, d] at positions start[i] .. start[i] + T - 1 of each sequence (cache [b, Hkv, S, d]).
    Writes past the cache's end are dropped (the caller sizes the cache; `nemojax.infer` checks it)."""
    b, T = k.shape[:2]
    rows = jnp.arange(b)[:, None]
    cols = start[:, None] + jnp.arange(T)[None, :]
    # x[rows, :, cols] indexes [b, T, Hkv, d]: the advanced indices come first, the sliced head axis after.
    return KVCache(cache.k.at[rows, :, cols].set(k.astype(cache.k.dtype), mode="drop"),
                   cache.v.at[rows, :, cols].set(v.astype(cache.v.dtype), mode="drop"))


class Attention(nn.Module):
    """x: [b, T, hidden] -> (y [b, T, hidden], cache). q/o are num_heads * head_dim wide, which need not equal
    hidden.

    With `cache` (and `step`) the T tokens sit at positions step.start[i] + t: their keys and values are written
    into the cache and the new `KVCache` comes back (else None); see `nemojax.nn.state`. segment_ids: [b, T]
    (packed documents, uncached only): queries see their own document, and RoPE positions restart at each
    document.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache: KVCache | None = None, step: Extend | None = None,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        cfg, a = self.config, self.config.attention
        b, T, _ = x.shape
        q = dense(cfg, a.num_heads * a.head_dim, ("embed", "heads"), name="q_proj", use_bias=a.bias)(x)
        k = dense(cfg, a.num_kv_heads * a.head_dim, ("embed", "kv_heads"), name="k_proj", use_bias=a.bias)(x)
        v = dense(cfg, a.num_kv_heads * a.head_dim, ("embed", "kv_heads"), name="v_proj", use_bias=a.bias)(x)
        q = q.reshape(b, T, a.num_heads, a.head_dim)
        k = k.reshape(b, T, a.num_kv_heads, a.head_dim)
        v = v.reshape(b, T, a.num_kv_heads, a.head_dim)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed documents) apply to the uncached forward; a cached extend "
                             "continues one sequence per row")
        if a.rope_theta is not None:
            start = jnp.zeros((b,), jnp.int32) if step is None else step.start
            positions = start[:, None] + jnp.arange(T)[None, :]
            if segment_ids is not None:  # positions restart at every document's first token
                positions = document_positions(segment_ids)
            rotary_dim = int(a.head_dim * a.partial_rotary_factor)
            q = apply_rope(q, positions, a.rope_theta, rotary_dim)
            k = apply_rope(k, positions, a.rope_theta, rotary_dim)
        if cfg.runtime.quant is not None and cfg.runtime.quant.kv_cache is not None:
            k, v = self._quantize_kv(k, v)
        scale = a.head_dim ** -0.5
        if cache is None:
            out = self_attention(q, k, v, scale, cfg.runtime.attention_impl, segment_ids)
        else:
            # A fresh prefill attends within the new tokens (no O(T * max_len) score matrix), so it can take the
            # fused kernel; a decode step can take the split-K decode kernel, which reads only the filled part of
            # the cache; later chunks read the cache on XLA. All read the cache before writing it.
            if step.fresh:
                out = self_attention(q, k, v, scale, cfg.runtime.attention_impl)
            elif T == 1 and dispatch.resolve("decode_attention", cfg.runtime.attention_decode_impl) == "pallas" and \
                    pallas_decode.supports(cache.k):
                out = pallas_decode.decode_attention(q[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, step.start,
                                                     scale=scale, interpret=dispatch.interpret())[:, None]
            else:
                out = cached_attention(q, k, v, cache, step.start, scale)
            cache = write_kv(cache, k, v, step.start)
        out = nn.with_logical_constraint(out, ("batch", "seq", "act_heads", "head_dim"))
        out = out.reshape(b, T, a.num_heads * a.head_dim)
        self.sow("taps", "o_proj_in", out)  # activation importance (nemojax.compress.importance)
        out = keep(self, "heads", out)  # a nested submodel's live heads (nemojax.nn.live)
        y = dense(cfg, cfg.hidden_size, ("heads", "embed"), name="o_proj", use_bias=a.bias)(out)
        return y, cache

    def _quantize_kv(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values as a low-precision KV cache stores them (per-tensor FP8; `k_amax` / `v_amax` params
        when the recipe calibrates them). k, v: [b, T, kv_heads, head_dim]."""
        kv = self.config.runtime.quant.kv_cache
        out = []
        for name, t in (("k_amax", k), ("v_amax", v)):
            static = logical_param(self, name, nn.initializers.zeros_init(), (), (), f32) if kv.static else None
            if calibrating(self):
                record_amax(self, name, jnp.max(jnp.abs(t)))
                out.append(t)
                continue
            amax = calibrated(static, lambda t=t: jnp.max(jnp.abs(t)).astype(f32))
            out.append(fake.fake_quant(t, kv.fmt, amax=amax, ste=kv.ste))
        return out[0], out[1]
