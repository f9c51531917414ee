"""Tests for nemojax.nn.attention: GQA causal attention vs numpy with explicit kv-head repeat, causality, no RoPE in
NemotronH, and apply_rope's rotation properties (docs/numerics.md 6)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import AttentionConfig, ModelConfig
from nemojax.nn import attention as attn

causal_attention = jax.jit(attn.causal_attention, static_argnames=("scale", "block"))
apply_rope = jax.jit(attn.apply_rope, static_argnames=("theta", "rotary_dim"))


def _np_attention(q, k, v, scale):
    """Float64 causal softmax attention; query head h reads kv head h // (Hq / Hkv) (torch repeat_kv)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, L, Hq, d = q.shape
    rep = Hq // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    scores = np.einsum("blhd,bshd->bhls", q, k) * scale
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", probs, v)


def _qkv(L=7, Hq=6, Hkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, L, Hq, d)).astype(np.float32),
            rng.standard_normal((2, L, Hkv, d)).astype(np.float32),
            rng.standard_normal((2, L, Hkv, d)).astype(np.float32))


@pytest.mark.parametrize("Hq,Hkv", [(6, 2), (6, 3), (4, 4), (4, 1)])
def test_causal_attention_matches_numpy(Hq: int, Hkv: int) -> None:
    """causal_attention == numpy reference with explicit kv repeat, for GQA, MHA and MQA."""
    q, k, v = _qkv(Hq=Hq, Hkv=Hkv)
    out = causal_attention(q, k, v, scale=8 ** -0.5)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, 8 ** -0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L,block", [(37, 8), (37, 5), (16, 16), (40, 128)])
def test_query_blocks_equal_the_dense_form(L: int, block: int) -> None:
    """Queries in blocks (L a multiple of the block or not, one block or many) == numpy dense attention."""
    q, k, v = _qkv(L=L, seed=L + block)
    out = causal_attention(q, k, v, scale=8 ** -0.5, block=block)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, 8 ** -0.5), rtol=1e-5, atol=1e-6)


def test_query_head_reads_kv_head_h_div_group() -> None:
    """Changing kv head 1 (of 2, with 6 query heads) changes exactly query heads 3, 4, 5 (repeat, not tile)."""
    q, k, v = _qkv(Hq=6, Hkv=2)
    out = np.asarray(causal_attention(q, k, v, scale=0.3))
    v2 = v.copy()
    v2[:, :, 1] += 1.0
    out2 = np.asarray(causal_attention(q, k, v2, scale=0.3))
    changed = {h for h in range(6) if not np.array_equal(out[:, :, h], out2[:, :, h])}
    assert changed == {3, 4, 5}


def test_causal_attention_is_causal() -> None:
    """Changing the token at position t leaves outputs before t unchanged and changes position t."""
    q, k, v = _qkv(L=9)
    out = np.asarray(causal_attention(q, k, v, scale=0.3))
    t = 5
    q2, k2, v2 = q.copy(), k.copy(), v.copy()
    for a in (q2, k2, v2):
        a[:, t:] += 3.0
    out2 = np.asarray(causal_attention(q2, k2, v2, scale=0.3))
    np.testing.assert_array_equal(out2[:, :t], out[:, :t])
    assert np.all(np.abs(out2[:, t] - out[:, t]).max(axis=(-1, -2)) > 1e-3)


def test_first_position_returns_its_value() -> None:
    """Position 0 attends only to itself, so its output is exactly v[0] of its kv head."""
    q, k, v = _qkv(Hq=4, Hkv=2)
    out = np.asarray(causal_attention(q, k, v, scale=0.5))
    np.testing.assert_allclose(out[:, 0], np.repeat(v[:, 0], 2, axis=1), rtol=1e-6)


@pytest.mark.parametrize("T", [1, 3])
def test_cached_attention_sees_old_entries_and_new_tokens(T: int) -> None:
    """Queries at start[i] + t against a cache holding stale values at and after start[i] (rejected drafts, a longer
    neighbour): equal to causal attention over the sequence's first start[i] cache entries followed by the new
    tokens. Sequences of one batch start at different positions."""
    b, S, Hq, Hkv, d = 2, 12, 6, 2, 8
    rng = np.random.default_rng(3)
    start = np.array([5, 9 - T])
    q = rng.standard_normal((b, T, Hq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, T, Hkv, d)).astype(np.float32) for _ in range(2))
    ck, cv = (rng.standard_normal((b, Hkv, S, d)).astype(np.float32) for _ in range(2))
    got = jax.jit(attn.cached_attention, static_argnames="scale")(
        q, k, v, attn.KVCache(jnp.asarray(ck), jnp.asarray(cv)), jnp.asarray(start), scale=0.3)
    for i in range(b):
        n = start[i]
        full_k = np.concatenate([ck[i, :, :n].transpose(1, 0, 2), k[i]], 0)[None]  # [1, n + T, Hkv, d]
        full_v = np.concatenate([cv[i, :, :n].transpose(1, 0, 2), v[i]], 0)[None]
        full_q = np.concatenate([np.zeros((n, Hq, d), np.float32), q[i]], 0)[None]  # only the last T rows count
        want = _np_attention(full_q, full_k, full_v, 0.3)[0, n:]
        np.testing.assert_allclose(np.asarray(got[i]), want, rtol=1e-5, atol=1e-6)


def test_cached_attention_rounds_new_entries_as_the_cache_stores_them() -> None:
    """With a bfloat16 cache under a float32 model the new token is seen as the cache will hold it, so a decode step
    reads exactly what later steps read."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.standard_normal((1, 1, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32) for _ in range(2))
    cache = attn.KVCache(*(jnp.asarray(rng.standard_normal((1, 2, 6, 8)), jnp.bfloat16) for _ in range(2)))
    start = jnp.array([4])
    got = attn.cached_attention(q, k, v, cache, start, 0.35)
    rounded = attn.cached_attention(q, k.astype(jnp.bfloat16).astype(jnp.float32),
                                    v.astype(jnp.bfloat16).astype(jnp.float32), cache, start, 0.35)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(rounded))
    written = attn.write_kv(cache, k, v, start)
    stored_k, stored_v = (x[:, :, 4:5].transpose(0, 2, 1, 3).astype(jnp.float32) for x in (written.k, written.v))
    via_cache = attn.cached_attention(q, stored_k, stored_v, cache, start, 0.35)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(via_cache))


def test_attention_module_matches_numpy_without_rope() -> None:
    """The NemotronH attention module == numpy q/k/v projections + reference attention + o_proj, and has no
    positional encoding: swapping tokens 0 and 1 leaves the output at position 4 unchanged (docs/numerics.md 6)."""
    cfg = ModelConfig(vocab_size=16, hidden_size=20, pattern="*",
                      attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=6), initializer_range=0.3)
    x = jax.random.normal(jax.random.key(0), (2, 5, 20))
    module = attn.Attention(cfg)
    p = nn.meta.unbox(jax.jit(module.init)(jax.random.key(1), x)["params"])
    out = np.asarray(jax.jit(module.apply)({"params": p}, x)[0])  # a mixer returns (y, state)
    xn = np.asarray(x, np.float64)
    q = (xn @ np.asarray(p["q_proj"]["kernel"])).reshape(2, 5, 4, 6)
    k = (xn @ np.asarray(p["k_proj"]["kernel"])).reshape(2, 5, 2, 6)
    v = (xn @ np.asarray(p["v_proj"]["kernel"])).reshape(2, 5, 2, 6)
    ref = _np_attention(q, k, v, 6 ** -0.5).reshape(2, 5, 24) @ np.asarray(p["o_proj"]["kernel"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    # No positions: swapping tokens 0 and 1 leaves the output at position 4 unchanged.
    swapped = np.asarray(jax.jit(module.apply)({"params": p}, x[:, jnp.array([1, 0, 2, 3, 4])])[0])
    np.testing.assert_allclose(swapped[:, 4], out[:, 4], rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------------- RoPE


def _positions(values, b=1):
    return jnp.broadcast_to(jnp.asarray(values, jnp.int32), (b, len(values)))


@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rope_preserves_norms(rotary_dim: int) -> None:
    """Rotation keeps each head vector's norm (and the norm of the rotated part alone)."""
    x = jax.random.normal(jax.random.key(0), (1, 6, 3, 8))
    out = apply_rope(x, _positions(range(0, 60, 10)), theta=10000.0, rotary_dim=rotary_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[..., :rotary_dim], axis=-1),
                               np.linalg.norm(x[..., :rotary_dim], axis=-1), rtol=1e-5)
    # Position 0 is the identity; later positions actually rotate.
    np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)
    assert np.abs(np.asarray(out[:, 1:] - x[:, 1:])).max() > 1e-2


def test_rope_dot_product_depends_only_on_offset() -> None:
    """q(m).k(n) == q(m+s).k(n+s): the score depends only on m - n."""
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 8))

    def score(m, n):
        qm = apply_rope(q, _positions([m]), theta=500.0, rotary_dim=8)
        kn = apply_rope(k, _positions([n]), theta=500.0, rotary_dim=8)
        return float(jnp.sum(qm * kn))

    for m, n in [(3, 1), (7, 2), (4, 4)]:
        base = score(m, n)
        for s in (1, 5, 40):
            assert abs(score(m + s, n + s) - base) < 1e-4 * (1 + abs(base))
    assert abs(score(3, 1) - score(3, 2)) > 1e-3  # and it does depend on the offset


def test_rope_leaves_channels_beyond_rotary_dim() -> None:
    """Channels [rotary_dim, head_dim) pass through unchanged (partial rotary)."""
    x = jax.random.normal(jax.random.key(3), (2, 5, 2, 10))
    out = apply_rope(x, _positions(range(5), b=2), theta=10000.0, rotary_dim=4)
    np.testing.assert_array_equal(np.asarray(out[..., 4:]), np.asarray(x[..., 4:]))


def test_rope_rotate_half_pairs() -> None:
    """Channel i pairs with i + rotary_dim/2: at position 1 with inv_freq[0] = 1, (x0, x2) rotates by 1 radian."""
    x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
    out = np.asarray(apply_rope(x, _positions([1]), theta=10000.0, rotary_dim=4))[0, 0, 0]
    np.testing.assert_allclose(out, [np.cos(1.0), 0.0, np.sin(1.0), 0.0], atol=1e-6)
