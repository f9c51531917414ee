"""pallas_kernels.ssd_scan (interpret mode) against the sequential recurrence, the XLA chunked SSD and its own
reference: forward, final state and gradients, float32 and bfloat16, odd shapes; and the kernel inside the mixer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.nn import mamba2
from nemojax.nn.ssd import ssd_chunked, ssd_sequential
from pallas_kernels.ssd_scan import ssd_scan, ssd_scan_reference


def _inputs(b, L, H, P, G, N, seed=0, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (b, L, H, P))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, L, H)) - 1.0)
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (H,)))
    B = jax.random.normal(ks[3], (b, L, G, N)).astype(dtype)
    C = jax.random.normal(ks[4], (b, L, G, N)).astype(dtype)
    s0 = jax.random.normal(ks[5], (b, H, P, N))
    return x, dt, A, B, C, s0


# layout -> (backend, algorithm): the GPU's three-kernel chunked algorithm (its default), the fused kernel in the
# GPU (sequence-major) layout, and the fused kernel in the TPU (head-major) layout
LAYOUTS = {"gpu": ("gpu", "chunked"), "gpu-fused": ("gpu", "fused"), "tpu": ("tpu", "fused")}


def _kernel(chunk_size=16, block_heads=1, layout="gpu"):
    """The kernel under jit (interpret mode runs much faster compiled than op by op), in the given layout."""
    backend, algorithm = LAYOUTS[layout]
    return jax.jit(functools.partial(ssd_scan, chunk_size=chunk_size, block_heads=block_heads, interpret=True,
                                     backend=backend, algorithm=algorithm))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (b, L, H, P, G, N, chunk, block_heads, layout): L not a multiple of the chunk, shorter than it, L = 1, batch 1,
# many heads per group, several heads per program, P and N not powers of two (overhanging P block, N padded); the
# GPU chunked algorithm, the fused kernel in the sequence-major layout and in the TPU (head-major) layout.
SHAPES = [
    (2, 37, 4, 8, 2, 16, 16, 1, "gpu"),
    (1, 70, 6, 12, 3, 5, 32, 2, "gpu"),
    (1, 1, 2, 4, 1, 4, 16, 1, "gpu"),
    (1, 70, 4, 12, 2, 5, 16, 2, "gpu-fused"),
    (2, 37, 4, 8, 2, 16, 16, 2, "tpu"),
    (1, 70, 6, 12, 3, 5, 32, 1, "tpu"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}L{}H{}P{}G{}N{}Q{}hb{}-{}".format(*s))
def test_forward_float32_equals_the_recurrence(shape):
    """float32: y and the final state within 1e-6 (relative to the max) of the sequential scan, from an initial
    state (and from none, in the first case of each layout); the kernel equals its own chunked reference to the
    same order."""
    b, L, H, P, G, N, Q, hb, layout = shape
    x, dt, A, B, C, s0 = _inputs(b, L, H, P, G, N)
    for init in (s0, None) if shape in (SHAPES[0], SHAPES[4]) else (s0,):
        y, final = _kernel(Q, hb, layout)(x, dt, A, B, C, initial_state=init)
        y_seq, final_seq = ssd_sequential(x, dt, A, B, C, initial_state=init)
        y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, chunk_size=Q, initial_state=init)
        assert y.dtype == final.dtype == jnp.float32
        assert y.shape == x.shape and final.shape == (b, H, P, N)
        assert _rel(y, y_seq) < 1e-6 and _rel(final, final_seq) < 1e-6
        assert _rel(y, y_ref) < 1e-6 and _rel(final, final_ref) < 1e-6


def test_tpu_simulator():
    """The head-major layout under JAX's TPU interpreter (Mosaic semantics on CPU) at a Nano 2-like P = 80 with
    the real chunk of 128 (float32; the longer chunk's cumsum differences give ~1e-6)."""
    from jax.experimental.pallas import tpu as pltpu

    x, dt, A, B, C, s0 = _inputs(1, 150, 2, 80, 1, 16)
    with pltpu.force_tpu_interpret_mode():
        y, final = jax.jit(functools.partial(ssd_scan, chunk_size=128, backend="tpu"))(x, dt, A, B, C,
                                                                                      initial_state=s0)
    y_seq, final_seq = ssd_sequential(x, dt, A, B, C, initial_state=s0)
    assert _rel(y, y_seq) < 5e-6 and _rel(final, final_seq) < 5e-6


@pytest.mark.parametrize("layout", ["gpu", "gpu-fused"])
def test_gpu_chunk_is_capped(layout):
    """A model chunk of 256 (Nemotron 3 Nano 4B) runs the GPU kernels at a chunk of 128 at most
    (`ssd_chunked.gpu_chunk`, `ssd_scan.fused_launch`): the same sum blocked differently, so the same result as the
    recurrence (float32, with resets crossing the kernel's chunks)."""
    x, dt, A, B, C, s0 = _inputs(1, 300, 2, 16, 1, 16, seed=9)
    reset = jnp.zeros((1, 300), bool).at[0, [100, 130, 256]].set(True)
    y, final = _kernel(256, 1, layout)(x, dt, A, B, C, initial_state=s0, reset=reset)
    y_seq, final_seq = ssd_sequential(x, dt, A, B, C, initial_state=s0, reset=reset)
    assert _rel(y, y_seq) < 5e-6 and _rel(final, final_seq) < 5e-6


def test_bfloat16_operands():
    """B, C in bfloat16 (a bf16 model): the dots take bf16 operands with float32 accumulation; stated tolerance
    2e-2 relative to the float32 recurrence on the same (bf16-rounded) inputs."""
    x, dt, A, B, C, s0 = _inputs(2, 45, 4, 16, 2, 16, dtype=jnp.bfloat16)
    y, final = _kernel()(x, dt, A, B, C, initial_state=s0)
    y_seq, final_seq = ssd_sequential(x, dt, A, B, C, initial_state=s0)
    assert 1e-5 < _rel(y, y_seq) < 2e-2  # bf16 rounding shows, within the bound
    assert _rel(final, final_seq) < 2e-2


@pytest.mark.parametrize("layout", ["gpu-fused", "tpu"])  # the chunked algorithm's backward: the reset test
def test_gradients_equal_the_xla_chunked_ssd(layout):
    """The backward (three more runs of the kernels on reversed / transposed inputs) equals autodiff through
    nemojax's chunked SSD for every input, initial state included, with P and N not powers of two and 2 heads per
    group (float32, 1e-5 relative; dA, a sum over every token, 2e-5)."""
    x, dt, A, B, C, s0 = _inputs(2, 37, 4, 12, 2, 5, seed=3)
    w_y = jax.random.normal(jax.random.key(7), x.shape)
    w_s = jax.random.normal(jax.random.key(8), s0.shape)

    def loss(fn):
        def f(*args):
            y, final = fn(*args)
            return jnp.sum(y * w_y) + jnp.sum(final * w_s)
        return f

    backend, algorithm = LAYOUTS[layout]
    kernel = functools.partial(ssd_scan, chunk_size=16, interpret=True, backend=backend, algorithm=algorithm)
    g_kernel = jax.jit(jax.grad(loss(lambda *a: kernel(*a[:5], initial_state=a[5])), argnums=range(6)))(
        x, dt, A, B, C, s0)
    xla = lambda x, dt, A, B, C, s0: ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=s0)  # noqa: E731
    g_xla = jax.jit(jax.grad(loss(xla), argnums=range(6)))(x, dt, A, B, C, s0)
    for name, a, b in zip("x dt A B C s0".split(), g_kernel, g_xla, strict=True):
        assert _rel(a, b) < (2e-5 if name == "A" else 1e-5), name


def _resets(b: int, L: int) -> jax.Array:
    """Packed documents: row 0 resets at 5, 16 (a chunk start for chunk 16), 17 (so 16 is a one-token document)
    and 40; row 1 at 30 only."""
    reset = np.zeros((b, L), bool)
    reset[0, [5, 16, 17, 40]] = True
    if b > 1:
        reset[1, 30] = True
    return jnp.asarray(reset)


@pytest.mark.parametrize("layout", ["gpu", "gpu-fused", "tpu"])
def test_resets_equal_the_recurrence(layout):
    """Packed-document resets in the kernel (masks on the in-chunk form, the entering state, the end-state weights
    and the chunk decay): y and the final state within 1e-6 of the sequential scan with the same resets, from an
    initial state, in both layouts; and equal to the kernel's own reference."""
    x, dt, A, B, C, s0 = _inputs(2, 45, 4, 8, 2, 16, seed=5)
    reset = _resets(2, 45)
    y, final = _kernel(16, 2, layout)(x, dt, A, B, C, initial_state=s0, reset=reset)
    y_seq, final_seq = ssd_sequential(x, dt, A, B, C, initial_state=s0, reset=reset)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, chunk_size=16, initial_state=s0, reset=reset)
    assert _rel(y, y_seq) < 1e-6 and _rel(final, final_seq) < 1e-6
    assert _rel(y, y_ref) < 1e-6 and _rel(final, final_ref) < 1e-6
    y_plain, _ = _kernel(16, 2, layout)(x, dt, A, B, C, initial_state=s0)
    assert _rel(y_plain, y_seq) > 1e-2  # the resets matter


def test_reset_gradients_equal_the_xla_chunked_ssd():
    """With resets (one at token 0, dropping the initial state), the kernels' backward equals autodiff through the
    XLA chunked SSD, whose resets are -inf log-decays: two different formulations, one gradient (float32, 1e-5;
    dA 2e-5)."""
    x, dt, A, B, C, s0 = _inputs(2, 45, 4, 8, 2, 8, seed=6)
    reset = _resets(2, 45).at[1, 0].set(True)
    w_y = jax.random.normal(jax.random.key(7), x.shape)

    def loss(fn):
        return lambda *args: jnp.sum(fn(*args)[0] * w_y) + jnp.sum(fn(*args)[1] ** 2)

    kernel = lambda x, dt, A, B, C, s0: ssd_scan(x, dt, A, B, C, chunk_size=16, initial_state=s0,  # noqa: E731
                                                 reset=reset, interpret=True, algorithm="chunked")
    xla = lambda x, dt, A, B, C, s0: ssd_chunked(x, dt, A, B, C, chunk_size=16, initial_state=s0,  # noqa: E731
                                                 reset=reset)
    g_kernel = jax.jit(jax.grad(loss(kernel), argnums=range(6)))(x, dt, A, B, C, s0)
    g_xla = jax.jit(jax.grad(loss(xla), argnums=range(6)))(x, dt, A, B, C, s0)
    for name, a, b in zip("x dt A B C s0".split(), g_kernel, g_xla, strict=True):
        assert _rel(a, b) < (2e-5 if name == "A" else 1e-5), name


def test_bad_input_is_named():
    x, dt, A, B, C, s0 = _inputs(1, 8, 4, 4, 2, 4)
    with pytest.raises(ValueError, match="4 heads do not divide into 3 groups"):
        ssd_scan(x, dt, A, *_inputs(1, 8, 4, 4, 3, 4)[3:5], interpret=True)
    with pytest.raises(ValueError, match="initial_state has shape"):
        ssd_scan(x, dt, A, B, C, initial_state=s0[:, :2], interpret=True)
    with pytest.raises(ValueError, match="block_heads=0"):
        ssd_scan(x, dt, A, B, C, block_heads=0, interpret=True)
    with pytest.raises(ValueError, match="reset has shape \\(1, 7\\)"):
        ssd_scan(x, dt, A, B, C, reset=jnp.zeros((1, 7), bool), interpret=True)
    with pytest.raises(ValueError, match="chunk_size=24; allowed on GPU/TPU"):
        ssd_scan(x, dt, A, B, C, chunk_size=24)  # not interpreting: the Triton / TPU tile constraint applies
    with pytest.raises(ValueError, match="algorithm='chunked' is the GPU"):
        ssd_scan(x, dt, A, B, C, algorithm="chunked", backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="algorithm='scan'"):
        ssd_scan(x, dt, A, B, C, algorithm="scan", interpret=True)
    with pytest.raises(ValueError, match="runtime.scan_impl"):
        nemojax.presets.get("nemotron-h-8b-tiny", runtime={"scan_impl": "triton"})


def test_mixer_runs_the_kernel(monkeypatch):
    """runtime.scan_impl="pallas" vs "xla" on a tiny hybrid: the same logits (float32, 1e-5) and the kernel was
    traced for each Mamba layer; gradients of the loss agree too (the kernel's custom_vjp)."""
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*M")
    model = nemojax.Model.init(config, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, 260)
    traced = []
    kernel = mamba2.ssd_scan
    monkeypatch.setattr(mamba2, "ssd_scan", lambda *a, **k: traced.append(1) or kernel(*a, **k))

    def loss(params, cfg):
        logits = nemojax.Model(cfg, params)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    out = {impl: grad(model.params, config.replace(runtime={"scan_impl": impl})) for impl in ("xla", "pallas")}
    (_, logits_x), grads_x = out["xla"]
    (_, logits_p), grads_p = out["pallas"]
    assert len(traced) == 2
    np.testing.assert_allclose(logits_p, logits_x, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
