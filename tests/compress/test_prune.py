"""Width/depth pruning (nemojax.compress.prune): identity, hand-sliced oracles, group constraints, HF parity."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import nemojax
from nemojax.compress.prune import keep_top, keep_top_grouped, prune
from tests.hf_reference import perturbed, reference_logits, reference_model

RTOL = 1e-4


def _f32(name: str) -> nemojax.ModelConfig:
    return nemojax.presets.get(name, runtime={"dtype": "float32", "param_dtype": "float32"})


@pytest.fixture(scope="module")
def dense_model() -> nemojax.Model:
    # nemotron-h-8b-tiny: pattern 'M-M*-MM-', hidden 64, ffn 128, attention 4 q / 2 kv heads of 16,
    # mamba 8 heads x 16 channels in 2 groups, state 16.
    return perturbed(nemojax.Model.init(_f32("nemotron-h-8b-tiny"), 0), seed=3)


@pytest.fixture(scope="module")
def moe_model() -> nemojax.Model:
    # nemotron-3-nano-30b-a3b-tiny: pattern 'MEM*EMEM', 8 experts of 32, top-2, shared expert 64.
    return perturbed(nemojax.Model.init(_f32("nemotron-3-nano-30b-a3b-tiny"), 0), seed=4)


def _index_scores(model: nemojax.Model) -> dict[str, np.ndarray]:
    """score = -index on every axis, so keeping the top k keeps the first k (per group where group-aware)."""
    cfg = model.config
    s: dict[str, np.ndarray] = {"hidden": -np.arange(cfg.hidden_size, dtype=float),
                                "layer/block": -np.arange(cfg.num_layers, dtype=float)}
    for i, kind in enumerate(cfg.pattern):
        if kind == "*":
            s[f"layers_{i}/heads"] = -np.arange(cfg.attention.num_heads, dtype=float)
        elif kind == "-":
            s[f"layers_{i}/mlp"] = -np.arange(cfg.intermediate_size, dtype=float)
        elif kind == "M":
            s[f"layers_{i}/mamba_heads"] = -np.arange(cfg.mamba.num_heads, dtype=float)
            s[f"layers_{i}/mamba_channels"] = -np.arange(cfg.mamba.head_dim, dtype=float)
        elif kind == "E":
            E, F = cfg.moe.num_experts, cfg.moe.intermediate_size
            s[f"layers_{i}/experts"] = -np.arange(E, dtype=float)
            s[f"layers_{i}/expert_ffn"] = -np.tile(np.arange(F, dtype=float), (E, 1))
            s[f"layers_{i}/shared_mlp"] = -np.arange(cfg.moe.shared_intermediate_size, dtype=float)
    return s


def _random_scores(model: nemojax.Model, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape) for k, v in _index_scores(model).items()}


def _leaves(model: nemojax.Model) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.flatten_with_path(model.params)[0]}


def _assert_shapes_match_config(model: nemojax.Model) -> None:
    want = {jax.tree_util.keystr(p): x.shape
            for p, x in jax.tree.flatten_with_path(nemojax.abstract_params(model.config))[0]}
    got = {k: v.shape for k, v in _leaves(model).items()}
    assert got == want
    assert model.num_params == nemojax.param_count(model.config)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


TOKENS = np.random.default_rng(0).integers(0, 512, (2, 21))


# ------------------------------------------------------------------------------------------- keep vectors


def test_keep_top_is_sorted_top_k_with_ties_to_lower_index():
    assert keep_top(np.array([0.1, 5.0, 3.0, 5.0, -1.0]), 3).tolist() == [1, 2, 3]
    assert keep_top(np.zeros(4), 2).tolist() == [0, 1]


def test_keep_top_grouped_keeps_equal_count_per_group():
    score = np.array([0.0, 9.0, 1.0, 2.0, 7.0, 8.0, 0.5, 6.0])  # groups [0..3], [4..7]
    assert keep_top_grouped(score, 2, 4).tolist() == [1, 3, 4, 5]  # not the global top-4 (1, 5, 4, 7)


# ------------------------------------------------------------------------------------------------ identity


def test_full_size_targets_are_identity(dense_model):
    cfg, m, a = dense_model.config, dense_model.config.mamba, dense_model.config.attention
    out = prune(dense_model, _random_scores(dense_model, 1), hidden=cfg.hidden_size, ffn=cfg.intermediate_size,
                heads=a.num_heads, mamba_heads=m.num_heads, mamba_head_dim=m.head_dim, layers=cfg.num_layers)
    assert out.config == cfg
    before, after = _leaves(dense_model), _leaves(out)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])
    np.testing.assert_array_equal(np.asarray(out(TOKENS)), np.asarray(dense_model(TOKENS)))


# ---------------------------------------------------------------------------------------- hand-sliced oracle


def test_first_k_scores_equal_hand_slicing(dense_model):
    """score = -index: the pruned params equal slices taken by hand with reshapes (an independent formula)."""
    cfg = dense_model.config
    m = cfg.mamba
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.state_size
    I = H * P
    h2, p2, d2 = 4, 8, 48  # 2 of 4 heads per group, half the channels, 48 of 64 hidden
    out = prune(dense_model, _index_scores(dense_model), hidden=d2, ffn=96, heads=2, mamba_heads=h2,
                mamba_head_dim=p2)
    assert out.config.mamba.num_heads == h2 and out.config.mamba.head_dim == p2
    assert out.config.mamba.n_groups == G and out.config.mamba.state_size == N
    src, dst = dense_model.params, out.params

    np.testing.assert_array_equal(dst["embeddings"]["embedding"], np.asarray(src["embeddings"]["embedding"])[:, :d2])
    np.testing.assert_array_equal(dst["lm_head"]["kernel"], np.asarray(src["lm_head"]["kernel"])[:d2])
    np.testing.assert_array_equal(dst["norm_f"]["scale"], np.asarray(src["norm_f"]["scale"])[:d2])

    # Mamba layer 0: in_proj [D, z | x | B C | dt] (the checkpoint's fused layout of the per-part kernels)
    def fused(mixer: dict, module: str, parts: str) -> np.ndarray:
        return np.concatenate([np.asarray(mixer[f"{module}_{q}"]["kernel"]) for q in parts.split()], axis=1)

    w = fused(src["layers_0"]["mixer"], "in_proj", "z x B C dt")[:d2]
    per_head = lambda block: block.reshape(d2, G, H // G, P)[:, :, :h2 // G, :p2].reshape(d2, -1)  # noqa: E731
    want = np.concatenate([per_head(w[:, :I]), per_head(w[:, I:2 * I]), w[:, 2 * I:2 * I + 2 * G * N],
                           w[:, 2 * I + 2 * G * N:].reshape(d2, G, H // G)[:, :, :h2 // G].reshape(d2, -1)], axis=1)
    mixer = dst["layers_0"]["mixer"]
    np.testing.assert_array_equal(fused(mixer, "in_proj", "z x B C dt"), want)
    conv = fused(src["layers_0"]["mixer"], "conv1d", "x B C")
    K = conv.shape[0]
    want_conv = np.concatenate([conv[:, :I].reshape(K, G, H // G, P)[:, :, :h2 // G, :p2].reshape(K, -1),
                                conv[:, I:]], axis=1)
    np.testing.assert_array_equal(fused(mixer, "conv1d", "x B C"), want_conv)
    for name in ("A_log", "D", "dt_bias"):
        np.testing.assert_array_equal(
            mixer[name], np.asarray(src["layers_0"]["mixer"][name]).reshape(G, H // G)[:, :h2 // G].ravel())
    np.testing.assert_array_equal(
        mixer["norm"]["scale"],
        np.asarray(src["layers_0"]["mixer"]["norm"]["scale"]).reshape(G, H // G, P)[:, :h2 // G, :p2].ravel())
    np.testing.assert_array_equal(
        mixer["out_proj"]["kernel"],
        np.asarray(src["layers_0"]["mixer"]["out_proj"]["kernel"])[:, :d2].reshape(G, H // G, P, d2)[
            :, :h2 // G, :p2].reshape(-1, d2))

    # MLP layer 1, attention layer 3 (4 q heads in 2 KV groups -> first head of each group: heads 0 and 2)
    up = np.asarray(src["layers_1"]["mixer"]["up_proj"]["kernel"])
    np.testing.assert_array_equal(dst["layers_1"]["mixer"]["up_proj"]["kernel"], up[:d2, :96])
    q = np.asarray(src["layers_3"]["mixer"]["q_proj"]["kernel"])[:d2]
    np.testing.assert_array_equal(dst["layers_3"]["mixer"]["q_proj"]["kernel"],
                                  q.reshape(d2, 2, 2, 16)[:, :, 0].reshape(d2, 32))
    np.testing.assert_array_equal(dst["layers_3"]["mixer"]["k_proj"]["kernel"],
                                  np.asarray(src["layers_3"]["mixer"]["k_proj"]["kernel"])[:d2])
    _assert_shapes_match_config(out)


def test_moe_hand_slicing(moe_model):
    cfg = moe_model.config
    out = prune(moe_model, _index_scores(moe_model), experts=6, expert_ffn=24, hidden=56, shared_ffn=40)
    assert (out.config.moe.num_experts, out.config.moe.intermediate_size, out.config.hidden_size,
            out.config.moe.shared_intermediate_size) == (6, 24, 56, 40)
    src, dst = moe_model.params["layers_1"]["mixer"], out.params["layers_1"]["mixer"]
    np.testing.assert_array_equal(dst["experts"]["up_proj"], np.asarray(src["experts"]["up_proj"])[:6, :56, :24])
    np.testing.assert_array_equal(dst["experts"]["down_proj"], np.asarray(src["experts"]["down_proj"])[:6, :24, :56])
    np.testing.assert_array_equal(dst["gate"]["kernel"], np.asarray(src["gate"]["kernel"])[:56, :6])
    np.testing.assert_array_equal(dst["gate"]["e_score_correction_bias"],
                                  np.asarray(src["gate"]["e_score_correction_bias"])[:6])
    assert cfg.moe.shared_intermediate_size == 64
    np.testing.assert_array_equal(dst["shared_experts"]["up_proj"]["kernel"],
                                  np.asarray(src["shared_experts"]["up_proj"]["kernel"])[:56, :40])
    np.testing.assert_array_equal(dst["shared_experts"]["down_proj"]["kernel"],
                                  np.asarray(src["shared_experts"]["down_proj"]["kernel"])[:40, :56])
    _assert_shapes_match_config(out)


def test_expert_ffn_keeps_each_experts_own_units(moe_model):
    scores = _index_scores(moe_model)
    E, F = 8, 32
    scores["layers_1/expert_ffn"] = np.random.default_rng(0).standard_normal((E, F))
    scores["layers_1/experts"] = np.arange(E, dtype=float)  # keep the last 4: experts 4..7
    out = prune(moe_model, scores, experts=4, expert_ffn=8)
    up = np.asarray(moe_model.params["layers_1"]["mixer"]["experts"]["up_proj"])
    for j, e in enumerate(range(4, 8)):
        kept = np.sort(np.argsort(-scores["layers_1/expert_ffn"][e])[:8])
        np.testing.assert_array_equal(out.params["layers_1"]["mixer"]["experts"]["up_proj"][j], up[e][:, kept])


def test_depth_pruning_renumbers_and_updates_pattern(dense_model):
    scores = {"layer/block": np.array([5.0, 1.0, 4.0, 3.0, 0.0, 2.0, 6.0, 7.0])}  # drop layers 1 and 4
    out = prune(dense_model, scores, layers=6)
    by_list = prune(dense_model, {}, drop_layers=[4, 1])
    assert out.config.pattern == by_list.config.pattern == "MM*MM-"  # 'M-M*-MM-' without 1 and 4
    for j, i in enumerate([0, 2, 3, 5, 6, 7]):
        a = jax.tree.leaves(out.params[f"layers_{j}"])
        b = jax.tree.leaves(dense_model.params[f"layers_{i}"])
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert "layers_6" not in out.params
    np.testing.assert_array_equal(np.asarray(out(TOKENS)), np.asarray(by_list(TOKENS)))


# ----------------------------------------------------------------------------------------------- HF parity


def _check_hf_roundtrip(pruned: nemojax.Model, tmp_path) -> None:
    nemojax.save_hf(pruned, tmp_path / "ckpt")
    loaded = nemojax.load_hf(tmp_path / "ckpt")
    assert loaded.config.to_hf() == pruned.config.to_hf()
    ours = np.asarray(pruned(TOKENS))
    np.testing.assert_array_equal(np.asarray(loaded(TOKENS)), ours)
    ref = reference_logits(reference_model(loaded), TOKENS)
    assert ref.shape == ours.shape
    assert _rel_err(ours, ref) < RTOL


def test_pruned_dense_hybrid_matches_transformers(dense_model, tmp_path):
    out = prune(dense_model, _random_scores(dense_model, 5), hidden=48, ffn=80, heads=2, mamba_heads=4,
                mamba_head_dim=8, layers=6)
    c = out.config
    assert (c.hidden_size, c.intermediate_size, c.attention.num_heads, c.mamba.num_heads, c.mamba.head_dim,
            c.num_layers) == (48, 80, 2, 4, 8, 6)
    _assert_shapes_match_config(out)
    _check_hf_roundtrip(out, tmp_path)


def test_pruned_moe_matches_transformers(moe_model, tmp_path):
    out = prune(moe_model, _random_scores(moe_model, 6), experts=6, expert_ffn=24, hidden=56, shared_ffn=48)
    _assert_shapes_match_config(out)
    _check_hf_roundtrip(out, tmp_path)


def test_latent_moe_with_mtp_prunes_consistently():
    """Nemotron 3 Super tiny (latent MoE + MTP head): hidden pruning reaches the MTP fusion and latent projections."""
    model = nemojax.Model.init(_f32("nemotron-3-super-120b-a12b-tiny"), 0)
    scores = _random_scores(model, 7)
    for k in range(len(model.config.mtp.pattern)):
        kind = model.config.mtp.pattern[k]
        if kind == "*":
            scores[f"mtp/layers_{k}/heads"] = scores["layers_3/heads"]
        if kind == "E":
            scores[f"mtp/layers_{k}/experts"] = scores["layers_1/experts"]
    out = prune(model, scores, hidden=48, heads=2, experts=4)
    _assert_shapes_match_config(out)
    eh = np.asarray(out.params["mtp"]["layers_0"]["eh_proj"]["kernel"])
    k_H = keep_top(scores["hidden"], 48)
    src = np.asarray(model.params["mtp"]["layers_0"]["eh_proj"]["kernel"])
    np.testing.assert_array_equal(eh, src[np.concatenate([k_H, 64 + k_H])][:, k_H])


# ------------------------------------------------------------------------------------ constraints and purity


def test_mamba_heads_are_kept_per_group(dense_model):
    scores = _index_scores(dense_model)
    scores["layers_0/mamba_heads"] = np.array([9.0, 8.0, 7.0, 6.0, 0.0, 1.0, 2.0, 3.0])  # group 0 globally best
    out = prune(dense_model, scores, mamba_heads=4)
    A = np.asarray(dense_model.params["layers_0"]["mixer"]["A_log"])
    np.testing.assert_array_equal(out.params["layers_0"]["mixer"]["A_log"], A[[0, 1, 6, 7]])  # 2 per group
    assert out.params["layers_0"]["mixer"]["norm"]["scale"].shape == (4 * 16,)  # group size 32 = I'/G


def test_mamba_heads_scored_on_kept_channels_when_the_map_is_given(dense_model):
    """Minitron-SSM (arXiv 2504.11409): with S_x [H, P], head scores use only the kept channels (here that flips
    the choice)."""
    s_x = np.zeros((8, 16))
    s_x[0, 8:] = 100.0  # head 0 is big only on channels that get pruned
    s_x[1, :8] = 1.0
    s_x[4:, :8] = 1.0
    scores = {"layers_0/mamba_x": s_x, "layers_0/mamba_channels": -np.arange(16.0),
              "layers_0/mamba_heads": np.sqrt(np.sum(s_x**2, axis=1))}
    for i in (2, 5, 6):
        scores.update({f"layers_{i}/mamba_heads": np.zeros(8), f"layers_{i}/mamba_channels": np.zeros(16)})
    out = prune(dense_model, scores, mamba_heads=2, mamba_head_dim=8)
    A = np.asarray(dense_model.params["layers_0"]["mixer"]["A_log"])
    np.testing.assert_array_equal(out.params["layers_0"]["mixer"]["A_log"], A[[1, 4]])  # not head 0
    del scores["layers_0/mamba_x"]
    out = prune(dense_model, scores, mamba_heads=2, mamba_head_dim=8)
    np.testing.assert_array_equal(out.params["layers_0"]["mixer"]["A_log"], A[[0, 4]])


@pytest.mark.parametrize("kwargs, field, allowed", [
    (dict(mamba_heads=3), "mamba_heads=3", "[2, 4, 6, 8]"),
    (dict(mamba_heads=10), "mamba_heads=10", "[2, 4, 6, 8]"),
    (dict(heads=3), "heads=3", "[2, 4]"),
    (dict(mamba_head_dim=0), "mamba_head_dim=0", "allowed values"),
    (dict(hidden=65), "hidden=65", "allowed values"),
    (dict(ffn=1.5), "ffn=1.5", "allowed values"),
    (dict(experts=2), "experts", "no MoE layers"),
    (dict(layers=0), "layers=0", "allowed values"),
    (dict(drop_layers=[8]), "drop_layers", "[0, 7]"),
    (dict(layers=4, drop_layers=[1]), "exclusive", "exclusive"),
])
def test_invalid_targets_raise_naming_the_field(dense_model, kwargs, field, allowed):
    with pytest.raises(ValueError) as err:
        prune(dense_model, _index_scores(dense_model), **kwargs)
    assert field in str(err.value) and allowed in str(err.value)


def test_moe_expert_constraints(moe_model):
    with pytest.raises(ValueError, match=r"experts=1 is invalid.*top_k=2"):
        prune(moe_model, _index_scores(moe_model), experts=1)
    with pytest.raises(ValueError, match=r"shared_ffn=65 is invalid.*\[1, 64\]"):
        prune(moe_model, _index_scores(moe_model), shared_ffn=65)
    with pytest.raises(ValueError, match=r"expert_ffn=33"):
        prune(moe_model, _index_scores(moe_model), expert_ffn=33)


def test_missing_or_misshaped_scores_raise(dense_model):
    with pytest.raises(ValueError, match=r"scores\['layers_1/mlp'\] is missing"):
        prune(dense_model, {}, ffn=64)
    with pytest.raises(ValueError, match=r"scores\['hidden'\] has shape \[3\], expected \[64\]"):
        prune(dense_model, {"hidden": np.zeros(3)}, hidden=32)


def test_scores_can_be_any_getitem_object(dense_model):
    class Bag:
        def __init__(self, d):
            self.d = d

        def __getitem__(self, key):
            return self.d[key]

    a = prune(dense_model, Bag(_index_scores(dense_model)), ffn=64)
    b = prune(dense_model, _index_scores(dense_model), ffn=64)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params),
                                                    strict=True))


def test_input_model_is_unchanged(dense_model):
    before = {k: v.copy() for k, v in _leaves(dense_model).items()}
    config = dense_model.config
    prune(dense_model, _random_scores(dense_model, 9), hidden=32, ffn=64, heads=2, mamba_heads=2,
          mamba_head_dim=4, layers=4)
    assert dense_model.config == config
    after = _leaves(dense_model)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def _edit(model: nemojax.Model, path: str, fn) -> nemojax.Model:
    """A copy of `model` with the leaf at `path` ('a/b/c') replaced by fn(leaf)."""
    def go(tree, keys):
        tree = dict(tree)
        tree[keys[0]] = fn(np.asarray(tree[keys[0]])) if len(keys) == 1 else go(tree[keys[0]], keys[1:])
        return tree
    return model.replace(params=go(model.params, path.split("/")))


def test_pruned_units_are_the_ones_that_stop_mattering(dense_model, moe_model):
    """Functional oracle: silencing the dropped MLP units and attention heads (zero output rows) in the parent
    gives the pruned model's logits, so the kept indices reach every consumer on the right axis."""
    scores = _random_scores(dense_model, 11)
    k_h = keep_top_grouped(scores["layers_3/heads"], 2, 2)
    silenced = dense_model
    for i in (1, 4, 7):
        k = keep_top(scores[f"layers_{i}/mlp"], 64)
        silenced = _edit(silenced, f"layers_{i}/mixer/down_proj/kernel",
                         lambda w, k=k: w * np.isin(np.arange(w.shape[0]), k)[:, None])
    rows = (k_h[:, None] * 16 + np.arange(16)).ravel()
    silenced = _edit(silenced, "layers_3/mixer/o_proj/kernel",
                     lambda w: w * np.isin(np.arange(w.shape[0]), rows)[:, None])
    out = prune(dense_model, scores, ffn=64, heads=2)
    assert _rel_err(np.asarray(out(TOKENS)), np.asarray(silenced(TOKENS))) < 1e-5

    scores = _random_scores(moe_model, 12)
    silenced = moe_model
    for i, kind in enumerate(moe_model.config.pattern):
        if kind == "E":
            k_E = keep_top(scores[f"layers_{i}/experts"], 6)
            silenced = _edit(silenced, f"layers_{i}/mixer/gate/e_score_correction_bias",
                             lambda b, k=k_E: np.where(np.isin(np.arange(8), k), b, -1e9).astype(b.dtype))
    out = prune(moe_model, scores, experts=6)
    assert _rel_err(np.asarray(out(TOKENS)), np.asarray(silenced(TOKENS))) < 1e-5


def test_mamba_heads_unconstrained_ranking_ignores_groups(dense_model):
    scores = _index_scores(dense_model)
    scores["layers_0/mamba_heads"] = np.array([9.0, 8.0, 7.0, 6.0, 0.0, 1.0, 2.0, 3.0])  # group 0 globally best
    out = prune(dense_model, scores, mamba_heads=4, group_aware=False)
    A = np.asarray(dense_model.params["layers_0"]["mixer"]["A_log"])
    # the global top 4 all come from group 0; re-packed, heads 2 and 3 now sit in group 1 (they read its B/C)
    np.testing.assert_array_equal(out.params["layers_0"]["mixer"]["A_log"], A[[0, 1, 2, 3]])
    assert out.config.mamba.num_heads == 4 and out.config.mamba.n_groups == 2
    _assert_shapes_match_config(out)
    # when the global top-k is already 2 per group, both modes keep the same heads
    balanced = _index_scores(dense_model)
    for key in [k for k in balanced if k.endswith("/mamba_heads")]:
        balanced[key] = np.array([9.0, 8.0, 0.0, 1.0, 7.0, 6.0, 2.0, 3.0])  # top 4 = 2 per group
    a = prune(dense_model, balanced, mamba_heads=4, group_aware=False)
    b = prune(dense_model, balanced, mamba_heads=4)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(x, y)
