"""Importance-ordered permutation (nemojax.elastic.permute) and the ordered keep helpers it is built on: the
function is preserved, and after permuting, the first k of every axis (per group) are exactly what prune keeps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.compress.importance import importance
from nemojax.compress.prune import prune
from nemojax.elastic.permute import full_widths, permute, permute_with_orders
from nemojax.kinds import moe as moe_kind
from nemojax.kinds.pruning import keep_top, keep_top_grouped
from nemojax.nn.moe import route
from tests.hf_reference import perturbed

RTOL = 1e-5
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 19))
CALIB = [np.random.default_rng(1).integers(0, 512, (2, 17)), np.random.default_rng(2).integers(0, 512, (2, 17))]


def _f32(name: str, **overrides) -> nemojax.ModelConfig:
    return nemojax.presets.get(name, runtime={"dtype": "float32", "param_dtype": "float32"}, **overrides)


def _model_and_scores(config: nemojax.ModelConfig, seed: int):
    model = perturbed(nemojax.Model.init(config, 0), seed=seed)
    return model, dict(importance(model, CALIB))


@pytest.fixture(scope="module")
def dense():
    # 'M-M*-MM-': hidden 64, ffn 128, attention 4 q / 2 kv heads, Mamba 8 heads x 16 channels in 2 groups
    return _model_and_scores(_f32("nemotron-h-8b-tiny"), 3)


@pytest.fixture(scope="module")
def moe():
    # 'MEM*EMEM': 8 experts of 32 in 2 routing groups (top-1 group), top-2, shared expert 64
    return _model_and_scores(_f32("nemotron-3-nano-30b-a3b-tiny", moe={"n_group": 2, "topk_group": 1}), 4)


@pytest.fixture(scope="module")
def latent():
    # 'MEM*EMEM' with latent 32 experts and an MTP head '*E'
    return _model_and_scores(_f32("nemotron-3-super-120b-a12b-tiny"), 5)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _mtp_scores(config: nemojax.ModelConfig) -> dict[str, np.ndarray]:
    """Equal scores for the MTP layers' axes (importance does not score them): prune keeps their first k."""
    if config.mtp is None:
        return {}
    out, e, a = {}, config.moe, config.attention
    for k, char in enumerate(config.mtp.pattern * config.mtp.num_layers):
        name = f"mtp/layers_{k}"
        if char == "*":
            out[f"{name}/heads"] = np.zeros(a.num_heads)
        if char == "E":
            out[f"{name}/experts"] = np.zeros(e.num_experts)
            out[f"{name}/expert_ffn"] = np.zeros((e.num_experts, e.intermediate_size))
            out[f"{name}/shared_mlp"] = np.zeros(e.shared_intermediate_size)
    return out


def _groups(config: nemojax.ModelConfig, key: str) -> int:
    """How many groups an axis is ranked in (KV groups, SSM groups, routing groups; 1 elsewhere)."""
    axis = key.rpartition("/")[2]
    if axis == "heads":
        return config.attention.num_kv_heads
    if axis == "mamba_heads":
        return config.mamba.n_groups
    return config.moe.n_group if axis == "experts" else 1


def _prefix_scores(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """score = -index on every axis of a permuted model: prune then keeps the first k (per group)."""
    out = {}
    for key, value in scores.items():
        if key.endswith("/mamba_x"):
            continue  # heads are ranked by mamba_heads alone
        n = value.shape[-1]
        out[key] = np.broadcast_to(-np.arange(n, dtype=float), value.shape).copy()
    return out


# ----------------------------------------------------------------------------------------- ordered helpers


def test_keep_top_ordered_is_descending_with_ties_to_lower_index():
    score = np.array([0.5, 2.0, 2.0, 3.0, 1.0])
    assert keep_top(score, 3, ordered=True).tolist() == [3, 1, 2]
    assert keep_top(score, 3).tolist() == [1, 2, 3]  # the pruning default: ascending
    assert keep_top(score, 5, ordered=True).tolist() == [3, 1, 2, 4, 0]
    assert keep_top(np.zeros(4), 4, ordered=True).tolist() == [0, 1, 2, 3]


def test_keep_top_grouped_ordered_keeps_groups_contiguous_in_their_order():
    score = np.array([1.0, 5.0, 5.0, 2.0, 7.0, 0.0, 7.0, 9.0])  # groups [0..3], [4..7]
    assert keep_top_grouped(score, 2, 4, ordered=True).tolist() == [1, 2, 7, 4]
    assert keep_top_grouped(score, 2, 4).tolist() == [1, 2, 4, 7]
    assert keep_top_grouped(score, 2, 8, ordered=True).tolist() == [1, 2, 3, 0, 7, 4, 6, 5]


def test_prune_order_and_mamba_ablation_are_checked(dense):
    model, scores = dense
    with pytest.raises(ValueError, match="order='sideways' is invalid"):
        prune(model, scores, ffn=96, order="sideways")
    with pytest.raises(ValueError, match="group_aware must be True"):
        prune(model, scores, mamba_heads=4, group_aware=False, order="importance")


# ------------------------------------------------------------------------------------ function preserved


@pytest.mark.parametrize("fixture", ["dense", "moe", "latent"])
def test_permute_preserves_logits_and_config(fixture, request):
    model, scores = request.getfixturevalue(fixture)
    permuted, orders = permute_with_orders(model, scores)
    assert permuted.config == model.config
    assert jax.tree.map(jnp.shape, permuted.params) == jax.tree.map(jnp.shape, model.params)
    # the permutation is not the identity (else this test could not fail)
    assert orders["hidden"].tolist() != list(range(model.config.hidden_size))
    assert _rel_err(permuted(TOKENS), model(TOKENS)) < RTOL
    if model.config.mtp is not None:
        tokens = np.random.default_rng(7).integers(0, 512, (2, 20))
        for got, want in zip(permuted.with_mtp(tokens)[1], model.with_mtp(tokens)[1], strict=True):
            assert _rel_err(got, want) < RTOL


def test_permute_gathers_the_parent_by_descending_scores(moe):
    """The recorded orders sort every axis by descending score per group, and the params are the parent's taken
    in that order."""
    model, scores = moe
    cfg = model.config
    permuted, orders = permute_with_orders(model, scores)

    def descending_per_group(values: np.ndarray, groups: int) -> bool:
        return all(np.all(np.diff(part) <= 0) for part in np.split(values, groups))

    assert descending_per_group(scores["hidden"][orders["hidden"]], 1)
    for key, order in orders.items():
        if key == "hidden" or key.startswith("mtp/"):
            continue
        groups = _groups(cfg, key)
        if key.endswith("/expert_ffn"):  # row r: the hidden units of new expert r
            experts = orders[key.replace("expert_ffn", "experts")]
            assert all(descending_per_group(scores[key][e][row], 1) for e, row in zip(experts, order, strict=True))
        else:
            assert descending_per_group(scores[key][order], groups), key
            # grouped axes keep every unit in its own group
            size = len(order) // groups
            assert np.array_equal(order // size, np.arange(len(order)) // size), key
    np.testing.assert_array_equal(permuted.params["embeddings"]["embedding"],
                                  np.asarray(model.params["embeddings"]["embedding"])[:, orders["hidden"]])
    k_E = orders["layers_1/experts"]
    np.testing.assert_array_equal(permuted.params["layers_1"]["mixer"]["gate"]["kernel"],
                                  np.asarray(model.params["layers_1"]["mixer"]["gate"]["kernel"])[orders["hidden"]][:,
                                                                                                                    k_E])


# --------------------------------------------------------------------------------------- prefix == top-k

TARGETS = {
    "dense": [dict(hidden=48, ffn=96, heads=2, mamba_heads=4), dict(mamba_head_dim=8, ffn=64)],
    "moe": [dict(hidden=40, heads=2, mamba_heads=4, experts=4, expert_ffn=16, shared_ffn=32)],
    "latent": [dict(hidden=48, mamba_heads=6, experts=6, expert_ffn=24, shared_ffn=48, heads=2)],
}


@pytest.mark.parametrize("fixture,case", [(f, i) for f, cases in TARGETS.items() for i in range(len(cases))])
def test_prefix_of_permuted_equals_pruned_parent(fixture, case, request):
    """prune(permuted, first-k scores) == prune(parent, scores): the prefix is the top k on every axis, per group.
    A wrong order (e.g. ascending) would keep other rows and change the logits."""
    model, scores = request.getfixturevalue(fixture)
    targets = TARGETS[fixture][case]
    mtp = _mtp_scores(model.config)
    permuted, orders = permute_with_orders(model, scores)
    want = prune(model, {**scores, **mtp}, **targets)
    got = prune(permuted, {**_prefix_scores(scores), **mtp}, **targets)
    assert got.config == want.config
    assert _rel_err(got(TOKENS), want(TOKENS)) < RTOL
    # the same statement on the index sets: each group's first k/groups are the rows prune keeps
    kept: dict[str, np.ndarray] = {}
    prune(model, {**scores, **mtp}, kept=kept, **targets)
    checked = [key for key in kept if kept[key].ndim == 1 and not key.startswith("mtp/")]
    assert "layers_0/mamba_heads" in checked
    for key in checked:
        groups = _groups(model.config, key)
        per = len(kept[key]) // groups
        prefix = np.concatenate([part[:per] for part in np.split(orders[key], groups)])
        assert set(prefix.tolist()) == set(kept[key].tolist()), key


def test_prefix_check_fails_for_the_unpermuted_parent(dense):
    """The oracle above can fail: the parent's own first k are not its top k."""
    model, scores = dense
    targets = TARGETS["dense"][0]
    want = prune(model, scores, **targets)
    got = prune(model, _prefix_scores(scores), **targets)
    assert _rel_err(got(TOKENS), want(TOKENS)) > 1e-3


# ------------------------------------------------------------------------------------------------- REAP


def test_reap_score_matches_a_hand_computed_oracle(moe):
    """experts_reap = mean over the tokens routed to an expert of (routing weight x ||expert output||_2)."""
    model, scores = moe
    cfg, e = model.config, model.config.moe
    i = cfg.pattern.index("E")
    mixer = jax.tree.map(np.asarray, model.params[f"layers_{i}"]["mixer"])
    up, down = mixer["experts"]["up_proj"], mixer["experts"]["down_proj"]  # [E, D, F], [E, F, D]
    normed = jax.jit(lambda params, tokens: model.replace(params=params).apply(
        tokens, collect=("taps",), logits=False).collected["taps"][f"layers_{i}"]["normed"][0])
    sums, counts = np.zeros(e.num_experts), np.zeros(e.num_experts)
    for tokens in CALIB:
        x = np.asarray(normed(model.params, jnp.asarray(tokens)), np.float64).reshape(-1, cfg.hidden_size)
        weights, ids = route(jnp.asarray(x @ mixer["gate"]["kernel"], jnp.float32),
                             mixer["gate"]["e_score_correction_bias"], top_k=e.top_k, n_group=e.n_group,
                             topk_group=e.topk_group, norm_topk_prob=e.norm_topk_prob, scaling=e.routed_scaling_factor)
        weights, ids = np.asarray(weights), np.asarray(ids)
        for expert in range(e.num_experts):
            y_td = np.square(np.maximum(x @ up[expert], 0.0)) @ down[expert]  # relu^2 expert on every token
            w_t = np.sum(np.where(ids == expert, weights, 0.0), axis=1)
            routed = np.any(ids == expert, axis=1)
            sums[expert] += np.sum(w_t[routed] * np.linalg.norm(y_td[routed], axis=1))
            counts[expert] += routed.sum()
    want = sums / (counts + 1e-8)
    np.testing.assert_allclose(scores[f"layers_{i}/experts_reap"], want, rtol=1e-4, atol=1e-7)
    # permute(expert_score="reap") orders the experts by it, per routing group
    _, orders = permute_with_orders(model, scores, expert_score="reap")
    assert orders[f"layers_{i}/experts"].tolist() == keep_top_grouped(want, e.n_group, e.num_experts,
                                                                      ordered=True).tolist()


def test_expert_score_choice_is_checked(moe):
    model, scores = moe
    with pytest.raises(ValueError, match="expert_score='gate' is invalid"):
        permute(model, scores, expert_score="gate")
    no_reap = {k: v for k, v in scores.items() if not k.endswith("/experts_reap")}
    with pytest.raises(ValueError, match=r"scores\['layers_1/experts_reap'\] is missing"):
        permute(model, no_reap, expert_score="reap")
    with pytest.raises(ValueError, match=r"scores\['layers_3/heads'\] is missing"):
        permute(model, {k: v for k, v in scores.items() if k != "layers_3/heads"})


def test_full_widths_lists_every_target_at_full_size(moe):
    cfg = moe[0].config
    assert full_widths(cfg) == {"mamba_heads": 8, "mamba_head_dim": 16, "heads": 4, "experts": 8, "expert_ffn": 32,
                                "shared_ffn": 64}


def test_reap_reads_sown_routing_weights_as_it_recomputes_them(moe):
    """With an "expert_weights" tap (the routing weights [T, k], when the mixer sows them; needed for LatentMoE,
    whose router input is not among the mixer's taps) the REAP sums equal the ones recomputed from the router."""
    model, _ = moe
    cfg, e = model.config, model.config.moe
    i = cfg.pattern.index("E")
    mixer = model.params[f"layers_{i}"]["mixer"]
    out = jax.jit(lambda params: model.replace(params=params).apply(jnp.asarray(TOKENS), collect=("taps",),
                                                                      logits=False).collected["taps"])(model.params)
    layer = jax.tree.map(lambda v: v[0] if isinstance(v, tuple) else v, out[f"layers_{i}"],
                         is_leaf=lambda v: isinstance(v, tuple))
    x = layer["normed"].reshape(-1, cfg.hidden_size)
    weights, _ = route(x @ mixer["gate"]["kernel"], mixer["gate"]["e_score_correction_bias"], top_k=e.top_k,
                       n_group=e.n_group, topk_group=e.topk_group, norm_topk_prob=e.norm_topk_prob,
                       scaling=e.routed_scaling_factor)
    taps = {**layer["mixer"], "batch": TOKENS.shape[0]}
    stat = lambda a, mask=None: jnp.sum(jnp.abs(a), axis=1)  # noqa: E731
    recomputed = moe_kind.importance(cfg, taps, mixer, stat)["expert_reapsum"]
    sown = moe_kind.importance(cfg, {**taps, "expert_weights": weights}, mixer, stat)["expert_reapsum"]
    np.testing.assert_allclose(np.asarray(sown), np.asarray(recomputed), rtol=1e-5)
    assert np.all(np.asarray(recomputed) >= 0) and np.any(np.asarray(recomputed) > 0)
    halved = moe_kind.importance(cfg, {**taps, "expert_weights": weights / 2}, mixer, stat)["expert_reapsum"]
    np.testing.assert_allclose(np.asarray(halved), np.asarray(recomputed) / 2, rtol=1e-5)
