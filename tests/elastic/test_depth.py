"""Depth ranking by normalised logit MSE with iterative removal (nemojax.elastic.depth), and the per-layer skip
mask of the forward it runs on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.compress.importance import importance
from nemojax.elastic.depth import layer_ranking
from tests.hf_reference import perturbed

TOKENS = np.random.default_rng(0).integers(0, 512, (2, 16))
ZEROED = (5, 1)  # a Mamba layer's out_proj and a '-' layer's down_proj are zeroed: those blocks are the identity


@pytest.fixture(scope="module")
def model() -> nemojax.Model:
    # nemotron-h-8b-tiny: pattern 'M-M*-MM-'
    config = nemojax.presets.get("nemotron-h-8b-tiny", runtime={"dtype": "float32", "param_dtype": "float32"})
    return perturbed(nemojax.Model.init(config, 0), seed=3)


@pytest.fixture(scope="module")
def zeroed(model) -> nemojax.Model:
    params = jax.tree.map(lambda x: x, model.params)  # a fresh outer structure; leaves are replaced, not edited
    for layer, module in zip(ZEROED, ("out_proj", "down_proj"), strict=True):
        mixer = dict(params[f"layers_{layer}"]["mixer"])
        mixer[module] = {**mixer[module], "kernel": jnp.zeros_like(mixer[module]["kernel"])}
        params[f"layers_{layer}"] = {**params[f"layers_{layer}"], "mixer": mixer}
    return model.replace(params=params)


@jax.jit
def _logits(model: nemojax.Model, skip: jax.Array) -> jax.Array:
    return model.apply(jnp.asarray(TOKENS), skip_layer=skip).logits


def _normalised_mse(model: nemojax.Model, skipped: list[int]) -> float:
    """The oracle: one forward per skipped set, written out."""
    full = np.asarray(model(TOKENS), np.float64)
    mask = np.zeros(model.config.num_layers, bool)
    mask[skipped] = True
    dropped = np.asarray(_logits(model, jnp.asarray(mask)), np.float64)
    return float(np.sum(np.square(full - dropped)) / np.sum(np.square(full)))


def test_skip_mask_equals_skip_index_and_skips_several(model):
    n = model.config.num_layers
    one = np.zeros(n, bool)
    one[3] = True
    np.testing.assert_array_equal(np.asarray(_logits(model, jnp.asarray(one))),
                                  np.asarray(_logits(model, jnp.asarray(3, jnp.int32))))
    assert not np.allclose(np.asarray(_logits(model, jnp.asarray(one))), np.asarray(model(TOKENS)))
    # skipping every layer leaves the embeddings: logits = lm_head(norm_f(embed(tokens)))
    everything = np.asarray(_logits(model, jnp.ones(n, bool)))
    p = model.params
    h = np.asarray(p["embeddings"]["embedding"])[TOKENS]
    h = h / np.sqrt(np.mean(np.square(h), -1, keepdims=True) + model.config.norm_eps) * np.asarray(p["norm_f"]["scale"])
    np.testing.assert_allclose(everything, h @ np.asarray(p["lm_head"]["kernel"]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="skip_layer has shape"):
        model.apply(jnp.asarray(TOKENS), skip_layer=jnp.zeros(n + 1, bool))


def test_identity_layers_are_removed_first(zeroed):
    ranking = layer_ranking(zeroed, [TOKENS])
    # both score exactly 0 in round 0 (ties go to the lower index), the other one again 0 in round 1
    assert ranking.removal_order[:2] == (1, 5)
    assert ranking.round_scores[0, 1] == 0.0 and ranking.round_scores[0, 5] == 0.0
    assert ranking.round_scores[1, 5] == 0.0 and np.isnan(ranking.round_scores[1, 1])
    assert sorted(ranking.removal_order) == list(range(zeroed.config.num_layers))
    assert ranking.round_scores.shape == (zeroed.config.num_layers - 1, zeroed.config.num_layers)


def test_first_round_is_single_shot_logits_mse(model):
    batches = [TOKENS, TOKENS[::-1]]
    single = layer_ranking(model, batches, iterative=False)
    want = importance(model, batches, layer_metrics=("logits_mse",))["layer/logits_mse"]
    np.testing.assert_allclose(single.round_scores[0], want, rtol=1e-5)
    assert single.round_scores.shape == (1, model.config.num_layers)
    assert list(single.removal_order) == np.argsort(single.round_scores[0], kind="stable").tolist()
    iterative = layer_ranking(model, batches, rounds=1)
    np.testing.assert_array_equal(iterative.round_scores[0], single.round_scores[0])
    assert iterative.removal_order == single.removal_order


def test_later_rounds_score_against_the_full_model_with_removed_layers_skipped(model):
    ranking = layer_ranking(model, [TOKENS], rounds=3)
    assert ranking.round_scores.shape == (3, model.config.num_layers)
    removed: list[int] = []
    for r in range(3):
        want = [np.nan if j in removed else _normalised_mse(model, removed + [j])
                for j in range(model.config.num_layers)]
        np.testing.assert_allclose(ranking.round_scores[r], want, rtol=1e-4)
        least = int(np.nanargmin(want))
        assert ranking.removal_order[r] == least
        removed.append(least)
    # the layers never removed follow in ascending last-round score
    rest = ranking.removal_order[3:]
    assert list(rest) == sorted(rest, key=lambda j: ranking.round_scores[2, j])
    assert ranking.kept(2) == tuple(sorted(ranking.removal_order[-2:]))


def test_bad_arguments_are_refused(model):
    with pytest.raises(ValueError, match="rounds=0 is invalid"):
        layer_ranking(model, [TOKENS], rounds=0)
    with pytest.raises(ValueError, match="batches is empty"):
        layer_ranking(model, [])
    ranking = layer_ranking(model, [TOKENS], rounds=1)
    with pytest.raises(ValueError, match="num_layers=9 is invalid"):
        ranking.kept(9)
