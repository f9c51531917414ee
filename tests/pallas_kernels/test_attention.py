"""pallas_kernels.attention (JAX's shipped Pallas flash attention behind runtime.attention_impl) vs the XLA oracle
`nemojax.nn.attention.causal_attention`, on CPU in interpret mode.

Both kernels are covered: the GPU Triton kernel (`mha`, interpret=True) and the TPU kernel (under the TPU
simulator, `pltpu.force_tpu_interpret_mode`). Shapes are odd on purpose: L=1, L=37 (not a multiple of the block),
L=130 over blocks of 64 (several blocks plus a padded tail), batch 1 and 2, GQA (8 query heads on 2 kv heads)
and MHA, head_dim 16 and 24 (not a power of two). Each case checks the forward output and the gradient wrt q, k
and v (a vjp with a random cotangent, so the kernel's own backward runs).

Tolerances, as |kernel - oracle| <= tol * max|oracle| per output (the oracle is float32 on the same inputs):
float32 1e-5 (measured <= 5e-7, forward and gradient, both kernels); bfloat16 inputs 2e-2 (measured <= 5e-3,
about what the XLA path itself shows in bfloat16: <= 4e-3). Interpret mode is slow, so the cases are few.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.infer.cache import init_cache
from nemojax.infer.extend import prefill
from nemojax.nn import attention as attn
from pallas_kernels import attention as pallas_attention

TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _inputs(b, L, Hq, Hkv, d, dtype, seed=0):
    """q: [b, L, Hq, d], k, v: [b, L, Hkv, d] and an output cotangent, rounded to `dtype`."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    shapes = ((kq, Hq), (kk, Hkv), (kv, Hkv), (kc, Hq))
    return [jax.random.normal(key, (b, L, H, d), jnp.float32).astype(dtype) for key, H in shapes]


def _check_against_oracle(kernel, b, L, Hq, Hkv, d, dtype, segment_ids=None):
    """kernel(q, k, v) and its vjp == causal_attention in float32 on the same (rounded) inputs."""
    q, k, v, ct = _inputs(b, L, Hq, Hkv, d, dtype, seed=L + Hq + d)
    out, vjp = jax.vjp(kernel, q, k, v)
    assert out.shape == (b, L, Hq, d) and out.dtype == jnp.dtype(dtype)
    grads = vjp(ct)
    scale = d ** -0.5
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: attn.causal_attention(q, k, v, scale, segment_ids=segment_ids),
                               *f32[:3])
    ref_grads = ref_vjp(f32[3])
    tol = TOL[dtype]
    # one gradient scale for dq, dk, dv: at L=1 the exact dq and dk are 0 (a single visible key) and the kernel
    # leaves float32 round-off there (~1e-7 of |dv|)
    grad_scale = max(float(jnp.abs(g).max()) for g in ref_grads)
    checks = [("out", out, ref_out, float(jnp.abs(ref_out).max()))]
    checks += [(f"d{n}", g, r, grad_scale) for n, g, r in zip("qkv", grads, ref_grads, strict=True)]
    for name, got, want, ref_scale in checks:
        err = float(jnp.abs(got.astype(jnp.float32) - want).max())
        assert err <= tol * ref_scale, (name, err, ref_scale)
    assert grad_scale > 0.1  # the gradient is not trivially zero


CASES = [  # b, L, Hq, Hkv, d, block
    (1, 1, 8, 2, 16, 64),  # one token: a single padded block
    (2, 37, 8, 2, 24, 64),  # L not a multiple of the block, head_dim not a power of two, GQA, batch 2
    (1, 130, 4, 4, 16, 64),  # three blocks of 64 with a padded tail, MHA
]
BLOCK_BWD = {1: 16, 37: 32, 130: 64}  # backward tiles: one or several blocks, fewer interpreted programs


@pytest.mark.parametrize("b,L,Hq,Hkv,d,block", CASES)
def test_gpu_kernel_float32(b, L, Hq, Hkv, d, block):
    """The Triton kernel (interpreted) equals the oracle in float32, forward and gradient."""
    kernel = lambda q, k, v: pallas_attention.flash_attention(  # noqa: E731
        q, k, v, scale=d ** -0.5, backend="cpu", block_q=block, block_k=block, block_bwd=BLOCK_BWD[L])
    _check_against_oracle(kernel, b, L, Hq, Hkv, d, "float32")


def test_gpu_kernel_bfloat16():
    """bfloat16 inputs (the kernel accumulates in float32): within 2e-2 of the float32 oracle."""
    kernel = lambda q, k, v: pallas_attention.flash_attention(  # noqa: E731
        q, k, v, scale=24 ** -0.5, backend="cpu", block_q=32, block_k=16, block_bwd=16)
    _check_against_oracle(kernel, 2, 37, 8, 2, 24, "bfloat16")


def test_tpu_kernel_float32():
    """The TPU kernel under the TPU simulator: L=130 over blocks of 128 (two blocks, padded), GQA, head_dim 24."""
    kernel = lambda q, k, v: pallas_attention.flash_attention(  # noqa: E731
        q, k, v, scale=24 ** -0.5, backend="tpu", interpret=True, block_q=128, block_k=128)
    _check_against_oracle(kernel, 1, 130, 8, 2, 24, "float32")


def _segments(b: int, L: int) -> jax.Array:
    """Packed documents: row 0 of lengths 5, 1, 40, rest; row 1 of 30 and rest."""
    ids = np.zeros((b, L), np.int32)
    for row, ends in enumerate(([5, 6, 46, L], [30, L])[:b]):
        for i, (lo, hi) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
            ids[row, lo:hi] = i + 1
    return jnp.asarray(ids)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_kernels_with_segment_ids(backend):
    """Packed documents: both kernels' native segment ids equal the oracle's segment mask, forward and gradient
    (L = 130 with pad positions in segment -1; documents crossing blocks; a one-token document)."""
    segments = _segments(2, 130)
    blocks = dict(block_q=64, block_k=64, block_bwd=64) if backend == "cpu" else dict(block_q=128, block_k=128)
    kernel = lambda q, k, v: pallas_attention.flash_attention(  # noqa: E731
        q, k, v, scale=16 ** -0.5, backend=backend, interpret=True, segment_ids=segments, **blocks)
    _check_against_oracle(kernel, 2, 130, 4, 2, 16, "float32", segments)
    with pytest.raises(ValueError, match="segment_ids.shape=\\(2, 7\\) is invalid"):
        pallas_attention.flash_attention(*_inputs(2, 130, 4, 2, 16, "float32")[:3], scale=0.25, backend=backend,
                                         interpret=True, segment_ids=segments[:, :7])


def test_bad_inputs_raise():
    q, k, v, _ = _inputs(1, 8, 6, 4, 16, "float32")
    with pytest.raises(ValueError, match="kv heads=4 is invalid for q heads=6"):
        pallas_attention.flash_attention(q, k, v, scale=0.25)
    q, k, v, _ = _inputs(1, 8, 4, 2, 16, "float32")
    with pytest.raises(ValueError, match="block_k=48 is invalid on backend 'cpu': must be a power of two >= 16"):
        pallas_attention.flash_attention(q, k, v, scale=0.25, block_k=48)
    with pytest.raises(ValueError, match="block_q=64 is invalid on backend 'tpu': must be a power of two >= 128"):
        pallas_attention.flash_attention(q, k, v, scale=0.25, backend="tpu", block_q=64)
    with pytest.raises(ValueError, match="interpret=False is invalid on backend 'cpu'"):
        pallas_attention.flash_attention(q, k, v, scale=0.25, backend="cpu", interpret=False)
    with pytest.raises(ValueError, match=r"k.shape=\(1, 7, 2, 16\) is invalid"):
        pallas_attention.flash_attention(q, k[:, :7], v[:, :7], scale=0.25)
    with pytest.raises(ValueError, match="backend='metal' is invalid"):
        pallas_attention.flash_attention(q, k, v, scale=0.25, backend="metal")


def test_cudnn_off_gpu_raises():
    """runtime.attention_impl="cudnn" names the field and what is allowed when the backend is not a GPU."""
    q, k, v, _ = _inputs(1, 8, 4, 2, 16, "bfloat16")
    with pytest.raises(ValueError,
                       match=r"runtime.attention_impl='cudnn' is invalid on backend 'cpu'.*'xla', 'pallas'"):
        attn.self_attention(q, k, v, 0.25, "cudnn")


def test_model_pallas_equals_xla(monkeypatch):
    """A tiny NemotronH (GQA 4 on 2 heads, head_dim 16) with runtime.attention_impl="pallas" vs "xla": the same float32
    logits (1e-5 relative), through the model forward and through a fresh prefill (the other caller)."""
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=128, pattern="M*-")
    model = nemojax.Model.init(config, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 128)
    calls = []
    kernel = pallas_attention.flash_attention
    monkeypatch.setattr(pallas_attention, "flash_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    logits = {impl: np.asarray(nemojax.model.forward(config.replace(runtime={"attention_impl": impl}), model.params,
                                                     tokens))
              for impl in ("xla", "pallas")}
    assert calls  # the "pallas" run went through the kernel
    scale = np.abs(logits["xla"]).max()
    np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=1e-5, atol=1e-5 * scale)
    lengths = jnp.array([21, 13])
    last = {}
    for impl in ("xla", "pallas"):
        cfg = config.replace(runtime={"attention_impl": impl})
        last[impl], _ = prefill(cfg, model.params, tokens, lengths, init_cache(cfg, batch=2, max_len=24))
    np.testing.assert_allclose(np.asarray(last["pallas"]), np.asarray(last["xla"]), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(np.asarray(last["xla"])[0], logits["xla"][0, 20], rtol=1e-5, atol=1e-5 * scale)
