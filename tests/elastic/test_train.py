"""Elastic training (nemojax.elastic.train): the routers learn to meet every budget within the router loss's 5%
dead zone with the full budget on the full architecture, a stopped run resumes bit-identically, and bad
configs are refused by name."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import nemojax
from nemojax import elastic
from nemojax.elastic.train import ElasticConfig, stage_weights, train
from tests.elastic.test_permute import _f32, _model_and_scores

ROWS, LEN = 4, 32


def _batches(seed: int = 0):
    rng = np.random.default_rng(seed)
    while True:
        t = rng.integers(0, 512, (ROWS, LEN + 1))
        yield {"tokens": t[:, :-1], "targets": t[:, 1:], "loss_mask": np.ones((ROWS, LEN), np.float32)}


@pytest.fixture(scope="module")
def setup():
    model, scores = _model_and_scores(_f32("nemotron-h-8b-tiny", pattern="M-*M"), 3)  # 4 layers: fast compiles
    return model, elastic.elastify(model, scores, removal_order=(1,), router_hidden=32, key=0)


def test_the_routers_learn_every_budget(setup):
    teacher, em = setup
    config = ElasticConfig(steps=60, batch_size=ROWS, seq_len=LEN, budgets_per_step=2, router_lr=3e-2)
    trained, history = train(em, teacher, _batches(), config)
    assert history[-1]["router"] < history[0]["router"] / 10
    full = nemojax.param_count(em.config)
    assert trained.sizes(1.0) == {axis: sizes[0] for axis, sizes in em.choices.items()}
    for budget in (0.75, 0.5):
        fraction = elastic.count_exact(em.config, trained.sizes(budget), removal_order=em.removal_order) / full
        assert abs(fraction / budget - 1) < 0.05, (budget, fraction)
    assert np.isfinite(np.asarray(trained(next(_batches(9))["tokens"], 0.5))).all()


def test_a_stopped_run_resumes_bit_identically(setup, tmp_path):
    teacher, em = setup
    config = ElasticConfig(steps=2, batch_size=ROWS, seq_len=LEN, budgets_per_step=2, stage1_fraction=0.5)
    straight, _ = train(em, teacher, _batches(), config)
    train(em, teacher, _batches(), config, workdir=tmp_path, stop_after=1)
    resumed, history = train(em, teacher, _batches(), config, workdir=tmp_path)
    assert [h["step"] for h in history][-1] == 2
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), (straight.model.params, straight.routers),
                        (resumed.model.params, resumed.routers))
    assert all(jax.tree.leaves(same))


def test_stage_weights_and_bad_configs():
    first, second = stage_weights(ElasticConfig(), 3)
    np.testing.assert_allclose(first, [1 / 3] * 3)
    np.testing.assert_allclose(second, [0.5, 0.3, 0.2])
    with pytest.raises(ValueError, match=r"stage2_weights=\(1.0, 2.0\) is invalid: one non-negative weight per"):
        stage_weights(ElasticConfig(stage2_weights=(1.0, 2.0)), 3)
    for field, value, match in [("steps", 0, "positive integer"), ("stage1_fraction", 0.0, r"in \(0, 1\]"),
                                ("budgets_per_step", 3, "must divide batch_size"), ("router_lr", -1.0, "> 0")]:
        with pytest.raises(ValueError, match=f"ElasticConfig.{field}=.* is invalid: .*{match}"):
            ElasticConfig(**{field: value})
