"""The train step: gradient accumulation equals one big batch, the MoE bias update moves by exactly the rate, the
loss falls, the loss function is a parameter, and eval does not train."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nemojax
from nemojax.config import MTPConfig
from nemojax.models.hybrid import NemotronH
from nemojax.train import moe_balance
from nemojax.train.losses import cross_entropy
from nemojax.train.optim import OptimizerConfig, make_optimizer
from nemojax.train.step import LossAux, eval_step, init_state, lm_loss, make_train_step

VOCAB, B, L = 64, 4, 8
DENSE = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=VOCAB, pattern="M*-")
MOE = nemojax.presets.get("nemotron-3-super-120b-a12b-tiny", vocab_size=VOCAB, pattern="*E")


def _batch(seed: int = 0, mask: np.ndarray | None = None) -> dict[str, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (B, L + 1)).astype(np.int32)
    mask = np.ones((B, L), np.float32) if mask is None else mask
    return {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.asarray(mask)}


@pytest.fixture(scope="module")
def dense():
    return nemojax.Model.init(DENSE, 0)


def _max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _step(optimizer, loss_fn, model, batch, **kwargs):
    step = jax.jit(make_train_step(optimizer, loss_fn, **kwargs))
    return step(init_state(model, optimizer, jax.random.key(0)), batch)


# ------------------------------------------------------------------ gradient accumulation


UNEVEN = np.ones((B, L), np.float32)
UNEVEN[:2, 2:] = 0  # micro-batch 0 (rows 0-1) keeps 4 tokens, micro-batch 1 (rows 2-3) keeps 16


@pytest.fixture(scope="module")
def sgd_steps(dense):
    """One plain SGD step (lr 1, so the change in params is minus the gradient) with grad_accum 1 and 2, on a full
    mask and on the UNEVEN mask, plus grad_accum 1 on UNEVEN reweighted (see below)."""
    optimizer, loss_fn = optax.sgd(1.0), lm_loss(DENSE)
    state = init_state(dense, optimizer, jax.random.key(0))
    # The mean of the micro-batch means, (S0 / 4 + S1 / 16) / 2, is the token mean under mask weights 4 on
    # micro-batch 0 and 1 on micro-batch 1: (4 S0 + S1) / (4 * 4 + 16) = S0 / 8 + S1 / 32.
    weighted = UNEVEN * np.array([[4.0], [4.0], [1.0], [1.0]], np.float32)
    out = {}
    for accum in (1, 2):
        step = jax.jit(make_train_step(optimizer, loss_fn, grad_accum=accum))
        for name, mask in (("full", None), ("uneven", UNEVEN), ("weighted", weighted)):
            if accum == 1 or name != "weighted":
                out[name, accum] = step(state, _batch(mask=mask))
    return out


def test_grad_accum_equals_one_big_batch_on_a_full_mask(dense, sgd_steps):
    (state1, m1), (state2, m2) = sgd_steps["full", 1], sgd_steps["full", 2]
    assert _max_abs_diff(state1.params, dense.params) > 1e-3  # the step did move the params
    assert _max_abs_diff(state2.params, state1.params) < 1e-6
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    assert float(m2["tokens"]) == float(m1["tokens"]) == B * L  # token counts add up over micro-batches
    assert int(state2.step) == int(state1.step) == 1


def test_grad_accum_averages_micro_batch_means(sgd_steps):
    """With uneven token counts accumulation is the mean of the micro-batches' mean-loss gradients, which is not the
    full batch's token mean; it equals one full-batch step under the equivalent mask weights."""
    state1, _ = sgd_steps["uneven", 1]
    state2, metrics2 = sgd_steps["uneven", 2]
    weighted, _ = sgd_steps["weighted", 1]
    assert _max_abs_diff(state2.params, weighted.params) < 1e-6
    assert _max_abs_diff(state1.params, state2.params) > 1e-4  # the token mean differs from the mean of means
    assert float(metrics2["tokens"]) == 20


def test_grad_accum_must_divide_the_batch(dense):
    step = make_train_step(optax.sgd(1.0), lm_loss(DENSE), grad_accum=3)
    state = init_state(dense, optax.sgd(1.0), jax.random.key(0))
    with pytest.raises(ValueError, match="not divisible by grad_accum=3"):
        step(state, _batch())
    with pytest.raises(ValueError, match="grad_accum=0"):
        make_train_step(optax.sgd(1.0), lm_loss(DENSE), grad_accum=0)


# ------------------------------------------------------------------ MoE bias update


def test_moe_bias_moves_by_exactly_rate():
    """The correction bias gets no gradient (it only steers top-k), so after one AdamW step it has moved by
    exactly rate * sign(mean(load) - load), where load is summed over both micro-batches; the MTP head's router
    (not run by the LM loss) stays put."""
    model = nemojax.Model.init(MOE, 0)
    rate = 0.125
    optimizer = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0))
    loss_fn = lm_loss(MOE, moe_aux_loss=1e-2)
    batch = _batch(1)
    state, metrics = _step(optimizer, loss_fn, model, batch, grad_accum=2, moe_bias_rate=rate)
    _, aux = jax.jit(loss_fn)(model.params, batch, jax.random.key(0))
    assert set(aux.expert_load) == {("layers_1", "mixer", "gate")}
    load = np.asarray(aux.expert_load["layers_1", "mixer", "gate"])
    assert load.sum() == B * L * MOE.moe.top_k
    old = model.params["layers_1"]["mixer"]["gate"]["e_score_correction_bias"]
    new = state.params["layers_1"]["mixer"]["gate"]["e_score_correction_bias"]
    change = np.asarray(new - old)
    np.testing.assert_array_equal(change, rate * np.sign(load.mean() - load))
    assert np.any(change > 0) and np.any(change < 0)
    np.testing.assert_array_equal(state.params["mtp"]["layers_1"]["mixer"]["gate"]["e_score_correction_bias"],
                                  model.params["mtp"]["layers_1"]["mixer"]["gate"]["e_score_correction_bias"])
    assert float(metrics["moe_balance"]) > 0.5


def test_lm_loss_adds_weighted_balance_loss():
    model = nemojax.Model.init(MOE, 0)
    batch = _batch(2)

    @jax.jit
    def run(params):
        plain = lm_loss(MOE)(params, batch, jax.random.key(0))
        weighted = lm_loss(MOE, z_loss=1e-2, moe_aux_loss=0.5)(params, batch, jax.random.key(0))
        logits, state = nemojax.model.module(MOE).apply({"params": params}, batch["tokens"], mutable=["intermediates"])
        balance = moe_balance.load_balancing_loss(state["intermediates"])
        return plain, weighted, cross_entropy(logits, batch["targets"], batch["loss_mask"]), balance

    (plain, plain_aux), (loss, aux), (ce, ce_aux), balance = run(model.params)
    assert float(plain) == pytest.approx(float(ce), rel=1e-5)
    assert "moe_balance" not in plain_aux.metrics
    assert float(aux.metrics["moe_balance"]) == pytest.approx(float(balance), rel=1e-5)
    assert float(balance) > 0.5
    assert float(loss) == pytest.approx(float(ce) + 1e-2 * float(ce_aux["z_loss"]) + 0.5 * float(balance), rel=1e-5)


# ------------------------------------------------------------------ training, custom losses, eval


def test_loss_decreases_on_a_repeated_batch(dense):
    optimizer = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=20))
    step = jax.jit(make_train_step(optimizer, lm_loss(DENSE)))
    state = init_state(dense, optimizer, jax.random.key(0))
    batch = _batch(4)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(np.log(VOCAB), rel=0.05)  # a fresh model is near uniform
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # every step helps
    assert losses[-1] < 0.6 * losses[0], losses  # about 4.18 -> 2.23 (lr 1e-3, decaying over the last 4 steps)
    assert int(state.step) == 20


def test_custom_loss_fn_is_honoured(dense):
    """A quadratic loss on lm_head only: with SGD(lr) the step gives lm_head * (1 - lr) and leaves every other
    param unchanged; the step reports the custom loss and its metrics, and passes extra batch keys through."""
    def loss_fn(params, batch, rng):
        loss = 0.5 * jnp.sum(jnp.square(params["lm_head"]["kernel"])) * jnp.mean(batch["weight"])
        return loss, LossAux({"custom": loss * 2}, {})

    batch = {"weight": jnp.ones((B, 1))}
    state, metrics = _step(optax.sgd(0.25), loss_fn, dense, batch, grad_accum=2)
    kernel = np.asarray(dense.params["lm_head"]["kernel"])
    np.testing.assert_allclose(state.params["lm_head"]["kernel"], 0.75 * kernel, rtol=1e-6)
    rest = lambda p: {k: v for k, v in p.items() if k != "lm_head"}  # noqa: E731
    assert _max_abs_diff(rest(state.params), rest(dense.params)) == 0.0
    assert float(metrics["loss"]) == pytest.approx(0.5 * float(np.sum(kernel ** 2)), rel=1e-5)
    assert float(metrics["custom"]) == pytest.approx(2 * float(metrics["loss"]), rel=1e-6)


def test_custom_loss_on_a_different_target(dense):
    """A copy-task loss (targets = the input tokens) trains that objective, not the next-token one."""
    base = lm_loss(DENSE)

    def copy_loss(params, batch, rng):
        return base(params, {**batch, "targets": batch["tokens"]}, rng)

    optimizer = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    step = jax.jit(make_train_step(optimizer, copy_loss))
    both = jax.jit(lambda p, b: (eval_step(copy_loss)(p, b)["loss"], eval_step(base)(p, b)["loss"]))
    state = init_state(dense, optimizer, jax.random.key(0))
    batch = _batch(5)
    first = None
    for _ in range(10):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    copy_before, _ = both(dense.params, batch)
    copy_after, next_after = both(state.params, batch)
    assert first == pytest.approx(float(copy_before), rel=1e-6)
    assert float(copy_after) < 0.5 * first
    # the next-token loss on the same batch did not fall the same way
    assert float(next_after) > float(copy_after) + 1.0


def test_eval_step_returns_loss_without_changing_params(dense):
    batch = _batch(6, mask=np.tile(np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32), (B, 1)))
    before = jax.tree.map(np.array, dense.params)
    metrics = jax.jit(eval_step(lm_loss(DENSE, z_loss=1e-2)))(dense.params, batch)
    logits = np.asarray(dense(batch["tokens"]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    keep = np.asarray(batch["loss_mask"]).astype(bool)
    assert float(metrics["nll"]) == pytest.approx(nll[keep].mean(), rel=1e-5)
    assert float(metrics["loss"]) == pytest.approx(nll[keep].mean() + 1e-2 * (lse[keep] ** 2).mean(), rel=1e-5)
    assert float(metrics["tokens"]) == keep.sum() == 24
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, dense.params), before)


# ------------------------------------------------------------------ multi-token prediction loss


MTP2 = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=VOCAB, pattern="M*-",
                           mtp=MTPConfig(num_layers=2, pattern="*-"))


def _np_nll(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> float:
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return float((nll * mask).sum() / mask.sum())


def test_mtp_loss_equals_a_hand_computation():
    """Depth d's logits at position t are scored against token t + d + 2 = targets[:, t + d + 1], under the same
    shifted slice of the loss mask; the loss adds w times the mean over depths."""
    model = nemojax.Model.init(MTP2, 0)
    mask = np.ones((B, L), np.float32)
    mask[0, 5:] = 0  # a short row
    mask[2, 3] = 0  # a hole that each depth meets at a different position
    batch = _batch(7, mask=mask)
    w = 0.3

    @jax.jit
    def run(params):
        with_mtp = lm_loss(MTP2, z_loss=1e-2, mtp_weight=w)(params, batch, jax.random.key(0))
        plain = lm_loss(MTP2, z_loss=1e-2)(params, batch, jax.random.key(0))
        outputs = nemojax.model.module(MTP2).apply({"params": params}, batch["tokens"],
                                                   method=NemotronH.forward_with_mtp)
        return with_mtp, plain, outputs

    (loss, aux), (plain, plain_aux), (logits, mtp_logits) = run(model.params)
    targets = np.asarray(batch["targets"])
    D = MTP2.mtp.num_layers
    assert len(mtp_logits) == D and mtp_logits[0].shape == (B, L - D, VOCAB)
    main = _np_nll(logits, targets, mask)
    depths = [_np_nll(mtp_logits[d], targets[:, d + 1:d + 1 + L - D], mask[:, d + 1:d + 1 + L - D])
              for d in range(D)]
    assert depths[0] != pytest.approx(depths[1], rel=1e-3)  # the depths differ, so the slicing is tested
    assert float(aux.metrics["nll"]) == pytest.approx(main, rel=1e-5)
    assert float(aux.metrics["mtp_nll"]) == pytest.approx(np.mean(depths), rel=1e-5)
    assert [float(aux.metrics[f"mtp_nll_{d}"]) for d in range(D)] == pytest.approx(depths, rel=1e-5)
    z = float(aux.metrics["z_loss"])
    assert float(loss) == pytest.approx(main + 1e-2 * z + w * np.mean(depths), rel=1e-5)
    assert float(plain) == pytest.approx(main + 1e-2 * z, rel=1e-5) and "mtp_nll" not in plain_aux.metrics
    # a wrong alignment (depth d against targets[:, d:]) would give a different number
    shifted = np.mean([_np_nll(mtp_logits[d], targets[:, d:d + L - D], mask[:, d:d + L - D]) for d in range(D)])
    assert float(aux.metrics["mtp_nll"]) != pytest.approx(shifted, rel=1e-3)


def test_mtp_loss_trains_the_head_and_its_router():
    """On the MoE preset (MTP "*E", one depth) a few AdamW steps on a fixed batch lower mtp_nll, the gradient
    reaches the head, and the MTP router's load feeds the correction-bias update (each entry moves by +-rate, or 0
    for an exactly mean-loaded expert)."""
    model = nemojax.Model.init(MOE, 0)
    optimizer = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
    rate = 0.125
    step = jax.jit(make_train_step(optimizer, lm_loss(MOE, moe_aux_loss=1e-2, mtp_weight=0.5), moe_bias_rate=rate))
    state = init_state(model, optimizer, jax.random.key(0))
    batch = _batch(8)
    bias = lambda p: np.asarray(p["mtp"]["layers_1"]["mixer"]["gate"]["e_score_correction_bias"])  # noqa: E731
    nlls = []
    for i in range(6):
        state, metrics = step(state, batch)
        nlls.append(float(metrics["mtp_nll"]))
        if i == 0:
            change = bias(state.params) - bias(model.params)
            assert set(np.round(change / rate, 6)) <= {-1.0, 0.0, 1.0} and np.any(change > 0) and np.any(change < 0)
    assert nlls[-1] < 0.8 * nlls[0], nlls
    moved = np.abs(np.asarray(state.params["mtp"]["layers_0"]["eh_proj"]["kernel"])
                   - np.asarray(model.params["mtp"]["layers_0"]["eh_proj"]["kernel"])).max()
    assert moved > 1e-3


def test_mtp_loss_weight_is_validated():
    with pytest.raises(ValueError, match="train.mtp_loss_weight=0.3 needs a model with an MTP head"):
        lm_loss(DENSE, mtp_weight=0.3)
    with pytest.raises(ValueError, match="train.mtp_loss_weight=-1"):
        lm_loss(MTP2, mtp_weight=-1.0)
    lm_loss(DENSE, mtp_weight=0.0)  # zero is fine without a head
    short = {k: v[:, :2] for k, v in _batch().items()}
    with pytest.raises(ValueError, match="must exceed mtp.num_layers=2"):
        lm_loss(MTP2, mtp_weight=0.1)({}, short, jax.random.key(0))
