"""The ElasticModel value: a budget's submodel runs masked and extracts to a plain Model with the same logits, whose
parameter count is the router loss's counter and whose save_hf output transformers loads; one checkpoint holds
every nested model; bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import NemotronHForCausalLM

import nemojax
from nemojax import elastic
from nemojax.errors import CheckpointError
from tests.elastic.test_permute import TOKENS, _f32, _model_and_scores, _rel_err
from tests.hf_reference import neutralise_dt_floor

RTOL = 1e-5


@pytest.fixture(scope="module")
def em():
    model, scores = _model_and_scores(_f32("nemotron-h-8b-tiny"), 3)  # 'M-M*-MM-'
    return elastic.elastify(model, scores, budgets=(1.0, 0.75, 0.5), removal_order=(5, 2), key=1)


@pytest.mark.parametrize("budget", [1.0, 0.75, 0.5])
def test_each_budget_extracts_to_its_masked_forward_and_to_the_counter(em, budget):
    sizes = em.sizes(budget)
    small = em.extract(budget)
    assert _rel_err(em(TOKENS, budget), small(TOKENS)) < RTOL
    counted = elastic.count_exact(em.config, sizes, removal_order=em.removal_order)
    assert nemojax.param_count(small.config) == counted
    assert float(elastic.count(em.config, sizes, removal_order=em.removal_order)) == pytest.approx(counted, rel=1e-6)


def test_explicit_sizes_extract_and_transformers_loads_the_result(em, tmp_path):
    sizes = {"hidden": 48, "ffn": 96, "heads": 2, "mamba_heads": 4, "mamba_head_dim": 12, "depth": 1}
    small = em.extract(sizes=sizes)
    assert small.config.hidden_size == 48 and small.config.num_layers == 7
    assert _rel_err(em(TOKENS, sizes=sizes), small(TOKENS)) < RTOL
    nemojax.save_hf(small, tmp_path / "small")
    theirs = NemotronHForCausalLM.from_pretrained(tmp_path / "small", attn_implementation="eager").float().eval()
    neutralise_dt_floor(theirs)
    with torch.no_grad():
        logits = theirs(torch.from_numpy(np.asarray(TOKENS, np.int64))).logits.numpy()
    assert _rel_err(logits, small(TOKENS)) < 1e-4


def test_per_layer_sizes_extract_to_a_heterogeneous_model(em, tmp_path):
    """Per-layer (heterogeneous) widths: the extracted model keeps each layer's widths in config.layer_configs;
    its logits equal the masked forward's, its param_count the counter's; its generation and cache sizes follow
    each layer; save_hf / load_hf round-trip it exactly. transformers' NemotronH has one width per kind, so it
    cannot hold this model: it refuses the checkpoint (size mismatches) rather than loading something else."""
    # 'M-M*-MM-': 4 Mamba layers, 3 MLPs, 1 attention layer
    sizes = {"hidden": 48, "ffn": [96, 128, 64], "heads": [2], "mamba_heads": [8, 4, 6, 2],
             "mamba_head_dim": [16, 12, 8, 16], "depth": 1}
    small = em.extract(sizes=sizes)
    config = small.config
    assert config.num_layers == 7 and config.layer_configs  # layer 5 dropped (removal_order[0])
    kept = [0, 1, 2, 3, 4, 6, 7]
    want_ffn = dict(zip([1, 4, 7], [96, 128, 64], strict=True))
    want_mamba = dict(zip([0, 2, 5, 6], zip([8, 4, 6, 2], [16, 12, 8, 16], strict=True), strict=True))
    for j, i in enumerate(kept):
        layer = config.layer(j)
        if i in want_ffn:
            assert layer.intermediate_size == want_ffn[i]
        if i in want_mamba:
            assert (layer.mamba.num_heads, layer.mamba.head_dim) == want_mamba[i]
    assert config.layer(kept.index(3)).attention.num_heads == 2
    assert _rel_err(em(TOKENS, sizes=sizes), small(TOKENS)) < RTOL
    counted = elastic.count_exact(em.config, sizes, removal_order=em.removal_order)
    assert nemojax.param_count(config) == counted
    assert float(elastic.count(em.config, sizes, removal_order=em.removal_order)) == pytest.approx(counted, rel=1e-6)
    # the cache is allocated per layer, and cached decoding continues the uncached forward
    cache = nemojax.infer.init_cache(config, 1, 16)
    assert cache.layers[kept.index(2)].ssm.shape[1:3] == (4, 12)
    out = nemojax.generate(small, [list(np.asarray(TOKENS[0, :5]))], max_new_tokens=3)
    extended = np.asarray(TOKENS[:1, :5].tolist()[0] + list(out.tokens[0]))[None]
    greedy = np.argmax(np.asarray(small(extended))[0, 4:-1], axis=-1)
    assert list(greedy) == list(out.tokens[0])

    nemojax.save_hf(small, tmp_path / "het")
    back = nemojax.load_hf(tmp_path / "het")
    assert back.config.architecture() == config.architecture()
    np.testing.assert_array_equal(np.asarray(back(TOKENS)), np.asarray(small(TOKENS)))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        NemotronHForCausalLM.from_pretrained(tmp_path / "het")


def test_one_checkpoint_holds_every_nested_model(em, tmp_path):
    elastic.save(em, tmp_path / "em")
    back = elastic.load(tmp_path / "em")
    assert back.choices == em.choices and back.budgets == em.budgets and back.removal_order == em.removal_order
    for budget in em.budgets:
        assert back.sizes(budget) == em.sizes(budget)
        np.testing.assert_array_equal(back(TOKENS, budget), em(TOKENS, budget))
    weights = sum(f.stat().st_size for f in (tmp_path / "em").glob("model*.safetensors"))
    nemojax.save_hf(em.model, tmp_path / "full")
    assert weights == sum(f.stat().st_size for f in (tmp_path / "full").glob("model*.safetensors"))
    assert nemojax.load_hf(tmp_path / "em").config == em.config  # the full model loads as a plain checkpoint
    (tmp_path / "em" / "elastic.json").write_text("{}")
    with pytest.raises(CheckpointError, match="elastic.json is invalid"):
        elastic.load(tmp_path / "em")
    with pytest.raises(CheckpointError, match="not an elastic checkpoint"):
        elastic.load(tmp_path / "full")


@pytest.mark.parametrize("kwargs, match", [
    ({"budgets": (1.0, 1.2)}, r"budgets=.* must be fractions of the full cost in \(0, 1\]"),
    ({"budgets": (0.5, 0.75)}, "strictly descending"),
    ({"axes": ("experts",)}, "experts.*lacks"),
    ({"axes": ("ffn", "depth")}, "removal_order is empty"),
    ({"choices": {"heads": (4, 3)}}, r"choices\['heads'\]=3 is invalid"),
    ({"target": "flops"}, "target='flops' is invalid"),
])
def test_bad_elastify_input_is_refused_by_name(em, kwargs, match):
    model = em.model
    with pytest.raises(ValueError, match=match):
        elastic.elastify(model, {}, **kwargs)


def test_a_budget_outside_the_unit_interval_is_refused(em):
    with pytest.raises(ValueError, match=r"budget=1.5 is invalid"):
        em(TOKENS, 1.5)
    with pytest.raises(ValueError, match="a budget or sizes"):
        em.extract()
