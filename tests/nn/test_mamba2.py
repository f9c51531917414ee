"""Tests for nemojax.nn.mamba2 and the gated norm: causal conv vs torch, per-group gated RMSNorm vs numpy, and the
whole mixer (with and without a time_step_limit clamp) vs a float64 numpy recomputation (docs/numerics.md
1, 3, 5)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import MambaConfig, ModelConfig, Runtime
from nemojax.nn.mamba2 import Mamba2Mixer, causal_conv1d
from nemojax.nn.norms import GatedRMSNorm


@pytest.mark.parametrize("L", [1, 3, 11])
@pytest.mark.parametrize("use_bias", [True, False])
def test_causal_conv1d_matches_torch(L: int, use_bias: bool) -> None:
    """causal_conv1d == torch conv1d(groups=C, padding=K-1)[..., :L] with torch weight [C, 1, K] = kernel.T."""
    import torch

    rng = np.random.default_rng(L)
    Bsz, C, K = 2, 6, 4
    x = rng.standard_normal((Bsz, L, C)).astype(np.float32)
    kernel = rng.standard_normal((K, C)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32) if use_bias else None
    out = causal_conv1d(jnp.asarray(x), jnp.asarray(kernel), None if bias is None else jnp.asarray(bias))
    ref = torch.nn.functional.conv1d(
        torch.from_numpy(x).transpose(1, 2), torch.from_numpy(np.ascontiguousarray(kernel.T[:, None, :])),
        None if bias is None else torch.from_numpy(bias), padding=K - 1, groups=C)[..., :L].transpose(1, 2)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_causal_conv1d_tap_order() -> None:
    """Tap K-1 multiplies the current token and tap 0 the token K-1 steps back (a unit impulse shows the kernel
    reversed in time)."""
    K = 4
    kernel = jnp.array([[1.0], [10.0], [100.0], [1000.0]])
    x = jnp.zeros((1, 6, 1)).at[0, 1, 0].set(1.0)
    out = causal_conv1d(x, kernel, None)
    np.testing.assert_array_equal(np.asarray(out)[0, :, 0], [0.0, 1000.0, 100.0, 10.0, 1.0, 0.0])
    assert K == kernel.shape[0]


def _np_gated_norm(y, z, scale, G, eps):
    """mamba_ssm RMSNormGated(norm_before_gate=False, group_size=I/G) in float64."""
    v = np.asarray(y, np.float64) * (np.asarray(z, np.float64) / (1.0 + np.exp(-np.asarray(z, np.float64))))
    v = v.reshape(*v.shape[:-1], G, -1)
    v = v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps)
    return v.reshape(*v.shape[:-2], -1) * np.asarray(scale, np.float64)


def test_gated_rmsnorm_is_per_group() -> None:
    """GatedRMSNorm == numpy per-group reference, and differs from whole-vector RMS when G > 1 (docs/numerics.md 5)."""
    rng = np.random.default_rng(0)
    I, G, eps = 12, 3, 1e-5
    y = rng.standard_normal((2, 5, I)).astype(np.float32) * np.repeat([0.1, 1.0, 10.0], I // G)  # unequal groups
    z = rng.standard_normal((2, 5, I)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, I).astype(np.float32)
    norm = GatedRMSNorm(n_groups=G, eps=eps)
    out = norm.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(y), jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(out), _np_gated_norm(y, z, scale, G, eps), rtol=1e-5, atol=1e-6)
    whole = _np_gated_norm(y, z, scale, 1, eps)
    assert np.max(np.abs(np.asarray(out) - whole)) > 0.1
    one_group = GatedRMSNorm(n_groups=1, eps=eps).apply({"params": {"scale": jnp.asarray(scale)}}, y, z)
    np.testing.assert_allclose(np.asarray(one_group), whole, rtol=1e-5, atol=1e-6)


def test_gated_rmsnorm_gates_before_norm() -> None:
    """The gate is applied before normalising: scaling z's positive part changes the output's direction."""
    y = jnp.ones((1, 4))
    z = jnp.array([[1.0, 2.0, 3.0, 4.0]])
    out = GatedRMSNorm(n_groups=1, eps=0.0).apply({"params": {"scale": jnp.ones(4)}}, y, z)
    silu = np.array([1.0, 2.0, 3.0, 4.0]) / (1 + np.exp(-np.array([1.0, 2.0, 3.0, 4.0])))
    np.testing.assert_allclose(np.asarray(out)[0], silu / np.sqrt(np.mean(silu ** 2)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------- the mixer
# (a mixer returns (y, state); the state is None without a cache)

H, P, N, G, Q = 4, 4, 3, 2, 8


def _config(limit=(0.0, math.inf), impl="chunked") -> ModelConfig:
    return ModelConfig(vocab_size=32, hidden_size=16, pattern="M",
                       mamba=MambaConfig(num_heads=H, head_dim=P, state_size=N, n_groups=G, chunk_size=Q,
                                         time_step_limit=limit),
                       initializer_range=0.3, runtime=Runtime(ssd_impl=impl))


def _fused(p) -> tuple[dict, dict]:
    """The checkpoint's fused in_proj (columns [z | x | B | C | dt]) and conv1d (channels [x | B | C]) from the
    per-part params."""
    in_proj = {"kernel": np.concatenate([p[f"in_proj_{q}"]["kernel"] for q in ("z", "x", "B", "C", "dt")], axis=1)}
    conv1d = {leaf: np.concatenate([p[f"conv1d_{q}"][leaf] for q in ("x", "B", "C")], axis=-1)
              for leaf in ("kernel", "bias")}
    return in_proj, conv1d


def _np_mixer(p, u, cfg: ModelConfig) -> np.ndarray:
    """Spec 1.2 in float64 from the params: in_proj, causal conv, silu, softplus/clip dt, sequential scan with
    h -> group h // (H/G), + D x, per-group gated norm, out_proj."""
    m = cfg.mamba
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    u = np.asarray(u, np.float64)
    Bsz, L, _ = u.shape
    I, K = m.inner_size, m.conv_kernel
    in_proj, conv1d = _fused(p)
    zxbcdt = u @ in_proj["kernel"]
    z, xBC, dt = zxbcdt[..., :I], zxbcdt[..., I:I + m.conv_dim], zxbcdt[..., I + m.conv_dim:]
    padded = np.concatenate([np.zeros((Bsz, K - 1, m.conv_dim)), xBC], axis=1)
    conv = conv1d["bias"] + sum(padded[:, k:k + L] * conv1d["kernel"][k] for k in range(K))
    xBC = conv / (1 + np.exp(-conv))
    x = xBC[..., :I].reshape(Bsz, L, H, P)
    Bm = xBC[..., I:I + G * N].reshape(Bsz, L, G, N)
    Cm = xBC[..., I + G * N:].reshape(Bsz, L, G, N)
    dt = np.log1p(np.exp(dt + p["dt_bias"]))
    dt = np.clip(dt, *m.time_step_limit)
    A = -np.exp(p["A_log"])
    S = np.zeros((Bsz, H, P, N))
    y = np.zeros((Bsz, L, H, P))
    for t in range(L):
        for h in range(H):
            g = h // (H // G)
            S[:, h] = (np.exp(dt[:, t, h] * A[h])[:, None, None] * S[:, h]
                       + (dt[:, t, h][:, None] * x[:, t, h])[:, :, None] * Bm[:, t, g][:, None, :])
            y[:, t, h] = np.einsum("bpn,bn->bp", S[:, h], Cm[:, t, g]) + p["D"][h] * x[:, t, h]
    v = _np_gated_norm(y.reshape(Bsz, L, I), z, p["norm"]["scale"], G, cfg.norm_eps)
    return v @ p["out_proj"]["kernel"]


def _init(cfg: ModelConfig, u: jax.Array):
    params = nn.meta.unbox(jax.jit(Mamba2Mixer(cfg).init)(jax.random.key(0), u)["params"])
    # dt ranges from ~1e-5 (head 0, below time_step_min) to ~1 (head 3), so both clamp ends matter.
    params["dt_bias"] = jnp.array([-11.0, -3.0, -1.0, 0.5])
    for i, part in enumerate(("x", "B", "C")):
        bias = params[f"conv1d_{part}"]["bias"]
        params[f"conv1d_{part}"]["bias"] = jax.random.normal(jax.random.key(3 + i), bias.shape) * 0.1
    params["D"] = jnp.array([1.0, 0.5, -0.5, 2.0])
    return params


@pytest.mark.parametrize("impl", ["chunked", "sequential"])
def test_mixer_matches_numpy_without_clamp(impl: str) -> None:
    """With the default time_step_limit (0, inf) the mixer equals numpy with NO dt clamp — in particular no floor
    at time_step_min = 0.001 (docs/numerics.md 3) — over L = 19 (> 2 chunks)."""
    cfg = _config(impl=impl)
    u = jax.random.normal(jax.random.key(1), (2, 19, 16))
    params = _init(cfg, u)
    out = jax.jit(Mamba2Mixer(cfg).apply)({"params": params}, u)[0]
    np.testing.assert_allclose(np.asarray(out), _np_mixer(params, u, cfg), rtol=1e-4, atol=1e-5)


def test_mixer_clamps_dt_to_time_step_limit() -> None:
    """time_step_limit=(0.001, 0.05) clips dt: the mixer equals numpy with that clip and differs from the unclamped
    mixer on the same params."""
    limited, free = _config(limit=(0.001, 0.05)), _config()
    u = jax.random.normal(jax.random.key(1), (2, 19, 16))
    params = _init(limited, u)
    out = jax.jit(Mamba2Mixer(limited).apply)({"params": params}, u)[0]
    np.testing.assert_allclose(np.asarray(out), _np_mixer(params, u, limited), rtol=1e-4, atol=1e-5)
    unclamped = jax.jit(Mamba2Mixer(free).apply)({"params": params}, u)[0]
    assert np.max(np.abs(np.asarray(out) - np.asarray(unclamped))) > 1e-3


def test_mixer_limit_above_all_dt_is_a_no_op() -> None:
    """A limit that no dt reaches gives bit-identical output to the unclamped mixer."""
    loose, free = _config(limit=(0.0, 100.0)), _config()
    u = jax.random.normal(jax.random.key(1), (1, 9, 16))
    params = _init(loose, u)
    np.testing.assert_array_equal(np.asarray(jax.jit(Mamba2Mixer(loose).apply)({"params": params}, u)[0]),
                                  np.asarray(jax.jit(Mamba2Mixer(free).apply)({"params": params}, u)[0]))


def test_mixer_param_shapes_follow_the_checkpoint() -> None:
    """Params are named like the checkpoint with its shapes transposed ([in, out] kernels, conv kernel [K, conv_dim]),
    in_proj and conv1d split into their parts (z, x, B, C, dt; x, B, C) in the checkpoint's order."""
    cfg = _config()
    m = cfg.mamba
    params = nn.meta.unbox(jax.eval_shape(Mamba2Mixer(cfg).init, jax.random.key(0), jnp.zeros((1, 2, 16))))
    shapes = jax.tree.map(lambda a: a.shape, params["params"])
    assert H * P + 2 * G * N == m.conv_dim and 2 * H * P + 2 * G * N + H == m.in_proj_size
    assert shapes == {
        "in_proj_z": {"kernel": (16, H * P)}, "in_proj_x": {"kernel": (16, H * P)},
        "in_proj_B": {"kernel": (16, G * N)}, "in_proj_C": {"kernel": (16, G * N)}, "in_proj_dt": {"kernel": (16, H)},
        "conv1d_x": {"kernel": (4, H * P), "bias": (H * P,)},
        "conv1d_B": {"kernel": (4, G * N), "bias": (G * N,)}, "conv1d_C": {"kernel": (4, G * N), "bias": (G * N,)},
        "dt_bias": (H,), "A_log": (H,), "D": (H,),
        "norm": {"scale": (H * P,)},
        "out_proj": {"kernel": (H * P, 16)},
    }
    a_log = _init(cfg, jnp.zeros((1, 2, 16)))["A_log"]
    np.testing.assert_allclose(np.asarray(a_log), np.log(np.arange(1, H + 1)), rtol=1e-6)  # docs/numerics.md 1
