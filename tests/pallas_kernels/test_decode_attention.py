"""pallas_kernels.decode_attention (JAX's split-K decode kernel, interpreted on CPU) against the XLA cached attention
it replaces, and that it reads only the filled part of the cache; the model's decode steps on either path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.nn import attention
from nemojax.nn.attention import cached_attention
from nemojax.nn.state import KVCache
from pallas_kernels.decode_attention import decode_attention, supports
from tests.decoding import prefill_then_decode


def _inputs(b=3, Hq=8, Hkv=2, d=32, S=256, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, Hq, d), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, Hkv, d), jnp.bfloat16) for key in ks[1:3])
    cache = KVCache(*(jax.random.normal(key, (b, Hkv, S, d), jnp.bfloat16) for key in ks[3:5]))
    return q, k, v, cache


def _kernel(**kw):
    return jax.jit(functools.partial(decode_attention, interpret=True, **kw))


@pytest.mark.parametrize("lengths", [(0, 37, 255), (256, 16, 1)])
def test_equals_the_xla_cached_attention(lengths):
    """An empty cache, a partly filled block, a full cache; GQA 8 / 2: within bf16 rounding of the XLA path (one
    softmax over the filled entries and the token itself)."""
    q, k, v, cache = _inputs()
    lengths = jnp.array(lengths)
    scale = 32 ** -0.5
    out = _kernel(scale=scale)(q, k, v, cache.k, cache.v, lengths)
    ref = cached_attention(q[:, None], k[:, None], v[:, None], cache, lengths, scale)[:, 0]
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2, rtol=2e-2)


def test_reads_only_the_filled_blocks():
    """NaN in every cache block past the filled length: the kernel never loads them (its loop stops at the length
    and skips empty splits), while the XLA path, which reads the whole cache, turns NaN."""
    q, k, v, cache = _inputs(b=2)
    lengths = jnp.array([37, 100])
    poisoned = KVCache(*(c.at[0, :, 48:].set(jnp.nan).at[1, :, 112:].set(jnp.nan) for c in (cache.k, cache.v)))
    clean = _kernel(scale=0.2, block_k=16)(q, k, v, cache.k, cache.v, lengths)
    out = _kernel(scale=0.2, block_k=16)(q, k, v, poisoned.k, poisoned.v, lengths)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(clean, np.float32))
    assert np.isnan(np.asarray(cached_attention(q[:, None], k[:, None], v[:, None], poisoned, lengths, 0.2))).any()


def test_supports_and_bad_input():
    q, k, v, cache = _inputs()
    assert supports(cache.k)
    assert not supports(cache.k.astype(jnp.float32))  # an f32 dot in Triton would be TF32
    assert not supports(cache.k[:, :, :40])  # 40 entries split into no power-of-two blocks of >= 16
    with pytest.raises(ValueError, match="allowed: bfloat16/float16"):
        decode_attention(q, k, v, cache.k[:, :, :40], cache.v[:, :, :40], jnp.zeros(3, jnp.int32), scale=1.0,
                         interpret=True)
    with pytest.raises(ValueError, match="shapes disagree"):
        decode_attention(q, k[:, :1], v, cache.k, cache.v, jnp.zeros(3, jnp.int32), scale=1.0, interpret=True)


def test_model_decode_steps_take_the_kernel(monkeypatch):
    """A bf16 hybrid: prefill, then 3 decode steps with runtime.attention_decode_impl "pallas" vs "xla" give the same
    logits within bf16 rounding, and the kernel ran for the attention layer's decode steps."""
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*M", runtime={"dtype": "bfloat16"})
    model = nemojax.Model.init(config, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 260)
    traced = []
    kernel = attention.pallas_decode.decode_attention
    monkeypatch.setattr(attention.pallas_decode, "decode_attention",
                        lambda *a, **k: traced.append(1) or kernel(*a, **k))
    runs = {impl: prefill_then_decode(config.replace(runtime={"attention_decode_impl": impl}), model.params, tokens,
                                      (8, 5), steps=3, max_len=32)[0] for impl in ("xla", "pallas")}
    np.testing.assert_allclose(runs["pallas"], runs["xla"], rtol=3e-2, atol=3e-2)
    assert traced
    with pytest.raises(ValueError, match="runtime.attention_decode_impl"):
        config.replace(runtime={"attention_decode_impl": "cuda"})
