"""Distillation (nemojax.compress.distill): numpy oracles of ModelOpt's losses, teacher correction, and a pruned
tiny student distilled toward its teacher."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.compress.distill import (
    DistillConfig,
    distill,
    distillation_loss,
    init_maps,
    kd_logits,
    teacher_correction,
)
from nemojax.compress.importance import importance
from nemojax.compress.prune import prune
from nemojax.data import DataConfig, make_dataset
from nemojax.train.optim import OptimizerConfig
from nemojax.train.step import lm_loss

DATA = DataConfig(kind="stdlib", tokenizer="byte")
B, L = 4, 32
FAST = OptimizerConfig(lr=3e-3, total_steps=100, warmup_steps=0, schedule="constant", weight_decay=0.0)


def _config(**changes) -> nemojax.ModelConfig:
    # nemotron-h-8b-tiny: pattern 'M-M*-MM-', hidden 64; byte vocabulary (260) for the stdlib data.
    changes = {"runtime": {"dtype": "float32", "param_dtype": "float32"}, "vocab_size": 260, **changes}
    return nemojax.presets.get("nemotron-h-8b-tiny", **changes)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_kl(s: np.ndarray, t: np.ndarray, mask: np.ndarray, T: float, k: int) -> float:
    """Spec 5.1 by loops: forward KL(p_t || p_s) at temperature T, over the teacher's top-k ids when k > 0."""
    s, t = s.astype(np.float64) / T, t.astype(np.float64) / T
    total = 0.0
    for b, l in itertools.product(range(s.shape[0]), range(s.shape[1])):
        sv, tv = s[b, l], t[b, l]
        if k:
            ids = np.argsort(-tv)[:k]
            sv, tv = sv[ids], tv[ids]
        lpt, lps = _np_log_softmax(tv), _np_log_softmax(sv)
        total += mask[b, l] * np.sum(np.exp(lpt) * (lpt - lps))
    return total / mask.sum()


@pytest.fixture(scope="module")
def batches() -> list[dict[str, np.ndarray]]:
    it = make_dataset(DATA, "train", seq_len=L, batch_size=B, seed=0)
    return [next(it) for _ in range(40)]


@pytest.fixture(scope="module")
def held_out() -> dict[str, np.ndarray]:
    return next(iter(make_dataset(DATA, "validation", seq_len=L, batch_size=B, seed=1)))


@pytest.fixture(scope="module")
def corrected(batches, held_out):
    """A random teacher after a short teacher correction on the stdlib bytes (also gives the teacher some skill,
    so its distribution is worth distilling)."""
    teacher = nemojax.Model.init(_config(pattern="M-M*-"), 0)
    fixed = teacher_correction(teacher, batches[:30], steps=30, optimizer=FAST, return_history=True)
    return teacher, fixed


@pytest.mark.parametrize("T,k", [(1.0, 0), (2.0, 0), (0.5, 5), (1.0, 1)])
def test_kd_logits_matches_numpy(T, k):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(2, 3, 11)).astype(np.float32) * 3
    t = rng.normal(size=(2, 3, 11)).astype(np.float32) * 3
    mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
    want = _np_kl(s, t, mask, T, k)
    got = kd_logits(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), T, k, scale_by_temperature=False)
    np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-7)
    got_t2 = kd_logits(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask), T, k)  # Hinton's T^2 (default)
    np.testing.assert_allclose(float(got_t2), want * T * T, rtol=1e-5, atol=1e-7)
    assert float(kd_logits(jnp.asarray(t), jnp.asarray(t), jnp.asarray(mask), T, k)) == pytest.approx(0, abs=1e-6)
    if k == 1:  # one renormalised entry: p = 1 on both sides, whatever the logits
        assert float(got) == pytest.approx(0, abs=1e-6)


def test_self_distillation_is_zero(batches):
    teacher = nemojax.Model.init(_config(pattern="M*-"), 1)
    dcfg = DistillConfig(lm_weight=0.5, intermediate=((0, 0), (2, 2)), intermediate_loss="mse")
    loss_fn = distillation_loss(teacher.config, teacher.config, teacher.params, dcfg)
    params = {"student": teacher.params, "maps": init_maps(teacher.config, teacher.config, dcfg)}
    assert params["maps"] == {}  # equal widths: the identity (as ModelOpt)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(0)), has_aux=True))
    (loss, aux), grads = grad_fn(params)
    m = aux.metrics
    assert float(m["kl"]) == pytest.approx(0, abs=1e-6)
    assert float(m["intermediate"]) == pytest.approx(0, abs=1e-10)
    # only the LM term is left in the total, and the gradient is exactly its gradient
    np.testing.assert_allclose(float(loss), 0.5 * float(m["lm_nll"]), rtol=1e-6)
    # ... so the KD and intermediate terms add no gradient: it is exactly half the LM gradient
    lm_grad_fn = jax.jit(jax.grad(lambda p: lm_loss(teacher.config)(p, batch, jax.random.key(0))[0]))
    lm_grads = lm_grad_fn(teacher.params)
    for g, h in zip(jax.tree.leaves(grads["student"]), jax.tree.leaves(lm_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), 0.5 * np.asarray(h), atol=1e-6)


def test_intermediate_loss_matches_hand_computation(batches):
    teacher = nemojax.Model.init(_config(pattern="M-M*-"), 2)
    student = nemojax.Model.init(_config(hidden_size=48, pattern="M-*-"), 3)
    pairs = ((1, 2), (3, 4))
    batch = {k: jnp.asarray(v) for k, v in batches[1].items()}
    mask = np.asarray(batch["loss_mask"], np.float64)
    mask[0, :5] = 0  # a masked prefix must not count
    batch["loss_mask"] = jnp.asarray(mask, jnp.float32)
    rng = np.random.default_rng(0)
    maps = {"kernel": jnp.asarray(rng.normal(size=(48, 64)) / 7, jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}

    # the block outputs by hand: run the stack block by block
    def block_outputs(model):
        outs = []

        def body(net):
            h = net.embeddings(batch["tokens"])
            for layer in net.layers:
                h, _ = layer(h)  # a block returns (output, state)
                outs.append(np.asarray(h, np.float64))
            return net.logits(net.norm_f(h))

        logits = nemojax.model.module(model.config).apply({"params": model.params}, method=body)
        return np.asarray(logits, np.float64), outs

    t_logits, t_h = block_outputs(teacher)
    s_logits, s_h = block_outputs(student)
    K, b = np.asarray(maps["kernel"], np.float64), np.asarray(maps["bias"], np.float64)
    for kind, weight in (("cosine", 0.7), ("mse", 2.0)):
        dcfg = DistillConfig(kl_weight=0.3, intermediate=pairs, intermediate_loss=kind, intermediate_weight=weight)
        loss, aux = distillation_loss(student.config, teacher.config, teacher.params, dcfg)(
            {"student": student.params, "maps": maps}, batch, jax.random.key(0))
        terms = []
        for i, j in pairs:
            p, t = s_h[i] @ K + b, t_h[j]
            if kind == "cosine":
                per = 1 - (p * t).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(t, axis=-1))
            else:
                per = ((p - t) ** 2).mean(-1)
            terms.append((per * mask).sum() / mask.sum())
            np.testing.assert_allclose(float(aux.metrics[f"intermediate_{i}_{j}"]), terms[-1], rtol=1e-4)
        kl = _np_kl(s_logits, t_logits, mask, 1.0, 0)
        np.testing.assert_allclose(float(aux.metrics["kl"]), kl, rtol=1e-4)
        np.testing.assert_allclose(float(loss), 0.3 * kl + weight * np.mean(terms), rtol=1e-4)
        assert float(aux.metrics["total"]) == pytest.approx(float(loss))


def test_teacher_correction_lowers_lm_loss(corrected, held_out):
    (teacher, (fixed, history)) = corrected
    batch = {k: jnp.asarray(v) for k, v in held_out.items()}
    loss = jax.jit(lambda p: lm_loss(teacher.config)(p, batch, jax.random.key(0))[0])
    before, after = float(loss(teacher.params)), float(loss(fixed.params))
    assert after < before - 0.5, (before, after)
    assert len(history) == 30 and history[-1]["nll"] < history[0]["nll"]
    # the input Model is not changed
    assert float(loss(teacher.params)) == before


def test_distill_pruned_student_lowers_kl(corrected, batches, held_out):
    _, (teacher, _) = corrected
    scores = importance(teacher, [b["tokens"] for b in batches[:2]])
    student = prune(teacher, scores, hidden=48, ffn=64, mamba_heads=4, layers=4)
    batch = {k: jnp.asarray(v) for k, v in held_out.items()}

    def held_kl(model):
        return float(kd_logits(model(batch["tokens"]), teacher(batch["tokens"]), batch["loss_mask"]))

    dcfg = DistillConfig(optimizer=FAST, intermediate=((3, 4),), intermediate_weight=0.1)
    new, history = distill(student, teacher, iter(batches), steps=12, config=dcfg)
    before, after = held_kl(student), held_kl(new)
    assert after < 0.8 * before, (before, after)
    assert new.config == student.config
    assert jax.tree.structure(new.params) == jax.tree.structure(student.params)
    assert len(history) == 12 and {"kl", "lm_nll", "intermediate", "intermediate_3_4", "total", "loss",
                                   "grad_norm"} <= set(history[0])
    assert history[-1]["kl"] < history[0]["kl"]


def test_invalid_configs_raise():
    for kwargs, field in [({"kl_weight": -1.0}, "kl_weight"), ({"temperature": 0.0}, "temperature"),
                          ({"top_k": -3}, "top_k"), ({"lm_weight": float("nan")}, "lm_weight"),
                          ({"intermediate_loss": "l1"}, "intermediate_loss"),
                          ({"intermediate": ((1,),)}, "intermediate"), ({"intermediate": ((1, -2),)}, "intermediate"),
                          ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"),
                          ({"kl_weight": 0.0}, "no loss")]:
        with pytest.raises(ValueError, match=field):
            DistillConfig(**kwargs)
    teacher = nemojax.Model.init(_config(pattern="M*-M-"), 0)
    small_vocab = _config(vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(small_vocab, teacher.config, teacher.params)
    with pytest.raises(ValueError, match="top_k"):
        distillation_loss(teacher.config, teacher.config, teacher.params, DistillConfig(top_k=1000))
    with pytest.raises(ValueError, match="intermediate pair"):
        distillation_loss(teacher.config, teacher.config, teacher.params, DistillConfig(intermediate=((5, 0),)))
    with pytest.raises(ValueError, match="data"):
        distill(teacher, teacher, 42, steps=1)
    with pytest.raises(ValueError, match="ran out"):
        distill(teacher, teacher, [], steps=1)
