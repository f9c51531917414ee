"""The masked forward (nemojax.elastic.masked): under prefix masks the full-size params compute exactly the
submodel that prefix slicing (nemojax.elastic.extract) cuts out, for a dense, an MoE and a LatentMoE hybrid, and one
compiled function serves every size."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import nemojax
from nemojax.elastic.choices import default_choices
from nemojax.elastic.extract import slice_sizes
from nemojax.elastic.masked import forward
from nemojax.elastic.permute import permute
from tests.elastic.test_permute import TOKENS, _f32, _model_and_scores, _mtp_scores, _rel_err

RTOL = 1e-5
REMOVAL = (5, 2)  # depth: the first `depth` of these layers are dropped


def _permuted(name: str, seed: int, **overrides):
    model, scores = _model_and_scores(_f32(name, **overrides), seed)
    return model, permute(model, {**scores, **_mtp_scores(model.config)})


@pytest.fixture(scope="module", params=["dense", "moe", "latent"])
def models(request):
    if request.param == "dense":  # 'M-M*-MM-'
        return _permuted("nemotron-h-8b-tiny", 3)
    if request.param == "moe":  # 'MEM*EMEM', 8 experts in 2 routing groups
        return _permuted("nemotron-3-nano-30b-a3b-tiny", 4, moe={"n_group": 2, "topk_group": 1})
    return _permuted("nemotron-3-super-120b-a12b-tiny", 5)  # LatentMoE experts and an MTP head


def _choice(config, index: int, depth: int = 0) -> dict:
    """The index-th size of every axis of the default choices (clamped to the last), and `depth` dropped layers."""
    choices = default_choices(config)
    sizes = {axis: sizes[min(index, len(sizes) - 1)] for axis, sizes in choices.items()}
    return {**sizes, "depth": depth} if depth else sizes


def test_masked_forward_at_full_size_equals_the_parent(models):
    parent, permuted = models
    want = parent(TOKENS)
    assert _rel_err(forward(permuted.config, permuted.params, TOKENS, {}).logits, want) < RTOL
    full = _choice(permuted.config, 0)
    assert _rel_err(forward(permuted.config, permuted.params, TOKENS, full).logits, want) < RTOL


@pytest.mark.parametrize("index, depth", [(2, 1), (4, 2)])
def test_masked_forward_equals_the_sliced_submodel(models, index, depth):
    _, permuted = models
    sizes = _choice(permuted.config, index, depth)
    sliced = slice_sizes(permuted, sizes, removal_order=REMOVAL)
    assert sliced.config.num_layers == permuted.config.num_layers - depth
    assert nemojax.param_count(sliced.config) < nemojax.param_count(permuted.config)
    got = forward(permuted.config, permuted.params, TOKENS, sizes, removal_order=REMOVAL).logits
    assert _rel_err(got, sliced(TOKENS)) < RTOL


def test_one_compiled_step_serves_every_size(models):
    _, permuted = models
    config = permuted.config

    @jax.jit
    def run(params, sizes):
        return forward(config, params, TOKENS, sizes, removal_order=REMOVAL).logits

    for index, depth in ((0, 0), (4, 2)):
        sizes = {axis: np.int32(v) for axis, v in {**_choice(config, index), "depth": depth}.items()}
        eager = forward(config, permuted.params, TOKENS, _choice(config, index, depth), removal_order=REMOVAL)
        assert _rel_err(run(permuted.params, sizes), eager.logits) < RTOL
    assert run._cache_size() == 1
