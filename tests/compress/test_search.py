"""Candidate enumeration and trial-based search (nemojax.compress.search): exact shape-only costs against `prune`
and `cache_bytes`, budgets, group constraints, the ranking, the stub- and distill-trial searches, errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import nemojax
from nemojax.compress.prune import prune
from nemojax.compress.search import Candidate, default_grid, enumerate_candidates, search
from nemojax.infer.memory import cache_bytes
from nemojax.model import param_count

CONTEXT = 1024


@pytest.fixture(scope="module")
def model() -> nemojax.Model:
    # nemotron-h-8b-tiny: pattern 'M-M*-MM-', hidden 64, ffn 128, attention 4 q / 2 kv heads of 16,
    # mamba 8 heads x 16 channels in 2 groups, state 16; 248,736 params.
    cfg = nemojax.presets.get("nemotron-h-8b-tiny", runtime={"dtype": "float32", "param_dtype": "float32"})
    return nemojax.Model.init(cfg, 0)


@pytest.fixture(scope="module")
def scores(model: nemojax.Model) -> dict[str, np.ndarray]:
    """Random scores on every axis prune reads (depth: layer 3, the attention layer, is the most important)."""
    cfg, rng = model.config, np.random.default_rng(0)
    block = rng.uniform(0, 1, cfg.num_layers)
    block[3] = 10.0
    s = {"hidden": rng.standard_normal(cfg.hidden_size), "layer/block": block}
    for i, kind in enumerate(cfg.pattern):
        if kind == "*":
            s[f"layers_{i}/heads"] = rng.standard_normal(cfg.attention.num_heads)
        elif kind == "-":
            s[f"layers_{i}/mlp"] = rng.standard_normal(cfg.intermediate_size)
        elif kind == "M":
            s[f"layers_{i}/mamba_heads"] = rng.standard_normal(cfg.mamba.num_heads)
            s[f"layers_{i}/mamba_channels"] = rng.standard_normal(cfg.mamba.head_dim)
    return s


@pytest.fixture(scope="module")
def budget(model: nemojax.Model) -> int:
    return int(0.6 * model.num_params)


@pytest.fixture(scope="module")
def candidates(model, scores, budget) -> list[Candidate]:
    return enumerate_candidates(model, budget_params=budget, scores=scores, context=CONTEXT)


def test_default_grid_snaps_to_prunable_values(model, scores):
    grid = default_grid(model, scores)
    assert grid == {"hidden": [64, 56, 48, 40], "ffn": [128, 112, 96, 80], "mamba_heads": [8, 6],
                    "mamba_head_dim": [16, 12], "layers": [8, 7, 6]}
    assert "layers" not in default_grid(model)  # depth needs "layer/block" to know the new pattern


def test_candidates_within_budget_exact_and_ranked(model, scores, budget, candidates):
    cfg = model.config
    assert len(candidates) >= 5
    for i, c in enumerate(candidates):
        assert 0.9 * budget <= c.params <= budget  # within the budget and near it (slack 0.1)
        if i % 4 == 0:
            assert c.params == param_count(c.config)
        heads = c.targets.get("mamba_heads", cfg.mamba.num_heads)
        assert heads % cfg.mamba.n_groups == 0 and c.config.mamba.num_heads == heads
        fulls = {"hidden": 64, "ffn": 128, "mamba_heads": 8, "mamba_head_dim": 16, "layers": 8}
        assert all(0 < v < fulls[k] for k, v in c.targets.items())  # a full size is left out (keep)
    # rank: 1% buckets of the budget, descending; within a bucket, more layers first
    buckets = [int(c.params / budget * 100) for c in candidates]
    assert buckets == sorted(buckets, reverse=True)
    for a, b in zip(candidates, candidates[1:], strict=False):
        if int(a.params / budget * 100) == int(b.params / budget * 100):
            assert a.targets.get("layers", 8) >= b.targets.get("layers", 8)
    # the shape-only config and count equal what prune actually builds
    for c in (candidates[0], candidates[len(candidates) // 2], candidates[-1]):
        small = prune(model, scores, **c.targets)
        assert small.config == c.config
        assert small.num_params == c.params
    deep = [c for c in candidates if "layers" in c.targets]
    assert deep and all("*" in c.config.pattern for c in deep)  # the top-scored attention layer is kept


def test_memory_budget_uses_cache_bytes(model, scores):
    cfg = model.config
    limit = int(0.8 * cache_bytes(cfg, 2, CONTEXT, dtype="bfloat16", weight_dtype="bfloat16").total)
    cands = enumerate_candidates(model, budget_bytes=limit, context=CONTEXT, batch=2, dtype="bfloat16",
                                 scores=scores, slack=0.05)
    assert cands and all(0.95 * limit <= c.memory.total <= limit for c in cands)
    c = cands[0]
    assert c.memory == cache_bytes(c.config, 2, CONTEXT, dtype="bfloat16", weight_dtype="bfloat16")
    # by hand: bf16 weights (no fp32-pinned params here), KV per attention layer, fp32 SSM state, bf16 conv state
    cc, m, a = c.config, c.config.mamba, c.config.attention
    n_m, n_a = cc.pattern.count("M"), cc.pattern.count("*")
    assert c.memory.weights == 2 * c.params
    assert c.memory.kv == n_a * 2 * 2 * CONTEXT * a.num_kv_heads * a.head_dim * 2
    assert c.memory.ssm == n_m * 2 * m.num_heads * m.head_dim * m.state_size * 4
    conv_dim = m.num_heads * m.head_dim + 2 * m.n_groups * m.state_size
    assert c.memory.conv == n_m * 2 * (m.conv_kernel - 1) * conv_dim * 2
    # both budgets: params is primary, bytes a hard cap
    both = enumerate_candidates(model, budget_params=int(0.6 * model.num_params), budget_bytes=limit,
                                context=CONTEXT, batch=2, scores=scores)
    assert both and all(c.memory.total <= limit and c.params <= 0.6 * model.num_params for c in both)


def test_user_grid_and_moe(model):
    cands = enumerate_candidates(model, budget_params=model.num_params, slack=None,
                                 grid={"heads": [4, 2], "mamba_heads": [8, 4]})
    pairs = {(c.targets.get("heads"), c.targets.get("mamba_heads")) for c in cands}
    assert pairs == {(None, None), (2, None), (None, 4), (2, 4)}
    assert cands[0].targets == {}  # the parent itself is closest to a budget equal to its size
    moe = nemojax.presets.get("nemotron-3-nano-30b-a3b-tiny")
    n = param_count(moe)
    mc = enumerate_candidates(moe, budget_params=0.8 * n, grid={"experts": [8, 6, 4], "expert_ffn": [32, 16]},
                              slack=0.3)
    assert mc and all(c.params == param_count(c.config) <= 0.8 * n for c in mc)


def _stub_trial(student, teacher, data, steps):
    """Deterministic: prefers depth, then more Mamba heads; checks what search passes in."""
    assert teacher.config.num_layers == 8 and data == "unused" and steps == 7
    return 100.0 - 10 * student.config.num_layers - student.config.mamba.num_heads


def test_search_with_stub_trial(model, scores, candidates):
    top = 4
    best, report = search(model, scores, candidates=candidates, top=top, trial=_stub_trial, data="unused",
                          trial_steps=7)
    tried = candidates[:top]
    assert [t.candidate for t in report.trials] == tried and [t.rank for t in report.trials] == [0, 1, 2, 3]
    expected = min(range(top), key=lambda i: (100.0 - 10 * tried[i].config.num_layers
                                              - tried[i].config.mamba.num_heads, i))
    assert report.best == expected and report.best_candidate == tried[expected]
    assert best.config == tried[expected].config and best.num_params == tried[expected].params
    rows = report.rows()
    assert len(rows) == top and sum(r["best"] for r in rows) == 1
    assert rows[0]["params"] == tried[0].params and rows[0]["memory"]["total"] == tried[0].memory.total
    assert rows[expected]["loss"] == report.trials[expected].loss
    assert str(tried[expected].targets) in report.table()


def test_search_enumerates_and_returns_trained_model(model, scores, budget):
    calls = []

    def trial(student, teacher, data, steps):
        calls.append(student.config)
        trained = student.replace(params={**student.params, "marker": np.zeros(1)})
        return trained, float(len(calls))  # the first tried wins

    best, report = search(model, scores, budget_params=budget, top=2, trial=trial, context=CONTEXT)
    assert len(calls) == 2 and report.best == 0 and "marker" in best.params


def test_errors_name_the_field(model, scores, candidates):
    with pytest.raises(ValueError, match="budget_params and budget_bytes"):
        enumerate_candidates(model)
    with pytest.raises(ValueError, match="budget_params=-5"):
        enumerate_candidates(model, budget_params=-5)
    with pytest.raises(ValueError, match="budget_bytes"):
        enumerate_candidates(model, budget_bytes=float("nan"))
    with pytest.raises(ValueError, match="no candidate fits"):
        enumerate_candidates(model, budget_params=1000)
    with pytest.raises(ValueError, match="slack"):
        enumerate_candidates(model, budget_params=1e5, slack=1.5)
    with pytest.raises(ValueError, match=r"mamba_heads.*divisible by 2"):
        enumerate_candidates(model, budget_params=1e5, grid={"mamba_heads": [5]})
    with pytest.raises(ValueError, match="experts"):
        enumerate_candidates(model, budget_params=1e5, grid={"experts": [4]})
    with pytest.raises(ValueError, match="layer/block"):
        enumerate_candidates(model, budget_params=1e5, grid={"layers": [6]})
    with pytest.raises(ValueError, match="data is None"):
        search(model, scores, candidates=candidates)
    with pytest.raises(ValueError, match="top=0"):
        search(model, scores, candidates=candidates, top=0, trial=_stub_trial)
    with pytest.raises(ValueError, match="one-shot iterator"):
        search(model, scores, candidates=candidates, data=iter([]))


@pytest.mark.skipif(importlib.util.find_spec("nemojax.compress.distill") is None, reason="no distill module")
def test_search_with_default_distill_trial(model, scores, candidates):
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, model.config.vocab_size, (2, 17))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((2, 16), np.float32)}
    held_out = [rng.integers(3, model.config.vocab_size, (2, 16))]
    # one trial (each candidate compiles its own distill step; the choice among several is tested with stubs)
    best, report = search(model, scores, candidates=candidates, top=1, data=[batch] * 3, trial_steps=3,
                          eval_data=held_out)
    losses = [t.loss for t in report.trials]
    assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0 and report.best == 0
    pruned = prune(model, scores, **report.best_candidate.targets)
    assert best.config == pruned.config
    assert not np.allclose(np.asarray(best.params["lm_head"]["kernel"]), np.asarray(pruned.params["lm_head"]["kernel"]))
