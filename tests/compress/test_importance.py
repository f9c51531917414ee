"""compress.importance against numpy oracles built from independently captured activations.

The oracle reads each block's input and output with flax's `capture_intermediates` (the implementation reads
what the modules sow) and recomputes every tapped activation by hand in numpy from the params.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import presets
from nemojax.compress import AGGS, Scores, importance
from nemojax.compress.importance import batch_stat, seq_stat
from nemojax.model import Model, module

DENSE = "nemotron-h-8b-tiny"  # pattern M-M*-MM-
MOE = "nemotron-3-nano-30b-a3b-tiny"  # pattern MEM*EMEM


def _model(name: str) -> Model:
    cfg = presets.get(name).replace(runtime={"dtype": "float32", "param_dtype": "float32"})
    return Model.init(cfg, 0)


def _tokens(seed: int, b: int = 2, L: int = 8) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (b, L), 0, 512), np.int32)


# ---------------------------------------------------------------------------------------------- numpy oracle


def np_agg(a: np.ndarray, agg: str, mask: np.ndarray | None = None) -> np.ndarray:
    """a: [rows, L, C] -> [C], written out from the definitions (mask: [rows, L] of tokens that count)."""
    seq, batch = agg.split("_")
    rows = []
    for r in range(a.shape[0]):
        keep = np.ones(a.shape[1], bool) if mask is None else mask[r].astype(bool)
        x = a[r][keep].astype(np.float64)
        if x.shape[0] == 0:
            rows.append(np.zeros(a.shape[2]))
        elif seq == "mean":
            rows.append(np.mean(np.abs(x), axis=0))
        elif seq == "l2":
            rows.append(np.linalg.norm(x, axis=0))
        else:
            rows.append(np.var(x, axis=0))
    r = np.stack(rows)
    if batch == "mean":
        return r.mean(axis=0)
    if batch == "l2":
        return np.linalg.norm(r, axis=0)
    return r.var(axis=0)


def np_rmsnorm(h: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * scale


def relu2(x: np.ndarray) -> np.ndarray:
    return np.square(np.maximum(x, 0.0))


def block_io(model: Model, tokens: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """(inputs, outputs) of every block [b, L, hidden], and the captured intermediates tree."""
    _, state = module(model.config).apply({"params": model.params}, jnp.asarray(tokens),
                                          capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    # a block returns (output, state)
    outs = [np.asarray(inter[f"layers_{i}"]["__call__"][0][0], np.float64) for i in range(model.config.num_layers)]
    emb = np.asarray(model.params["embeddings"]["embedding"], np.float64)[tokens]
    return [emb] + outs[:-1], outs, inter


def np_attention_context(model: Model, n: np.ndarray, i: int) -> np.ndarray:
    """o_proj input [b, L, n_h * d_h]: causal softmax attention, no RoPE, written with plain loops."""
    a, p = model.config.attention, model.params[f"layers_{i}"]["mixer"]
    b, L, _ = n.shape
    q = (n @ np.asarray(p["q_proj"]["kernel"], np.float64)).reshape(b, L, a.num_heads, a.head_dim)
    k = (n @ np.asarray(p["k_proj"]["kernel"], np.float64)).reshape(b, L, a.num_kv_heads, a.head_dim)
    v = (n @ np.asarray(p["v_proj"]["kernel"], np.float64)).reshape(b, L, a.num_kv_heads, a.head_dim)
    out = np.zeros((b, L, a.num_heads, a.head_dim))
    rep = a.num_heads // a.num_kv_heads
    for h in range(a.num_heads):
        kv = h // rep
        s = np.einsum("bld,bsd->bls", q[:, :, h], k[:, :, kv]) / np.sqrt(a.head_dim)
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bls,bsd->bld", w, v[:, :, kv])
    return out.reshape(b, L, -1)


def oracle(model: Model, tokens: np.ndarray, agg: str = "mean_l2") -> dict[str, np.ndarray]:
    cfg, params = model.config, model.params
    ins, outs, inter = block_io(model, tokens)
    b, L = tokens.shape
    res: dict[str, np.ndarray] = {"hidden": 0.0}
    cos = []
    for i, kind in enumerate(cfg.pattern):
        p = params[f"layers_{i}"]
        n = np_rmsnorm(ins[i], np.asarray(p["norm"]["scale"], np.float64), cfg.norm_eps)
        res["hidden"] = res["hidden"] + np_agg(n, agg)
        u = ins[i] / np.linalg.norm(ins[i], axis=-1, keepdims=True)
        w = outs[i] / np.linalg.norm(outs[i], axis=-1, keepdims=True)
        cos.append(np.mean(np.sum(u * w, axis=-1)))
        mix = p["mixer"]
        if kind == "-":
            res[f"layers_{i}/mlp"] = np_agg(relu2(n @ np.asarray(mix["up_proj"]["kernel"], np.float64)), agg)
        elif kind == "*":
            a = cfg.attention
            per_c = np_agg(np_attention_context(model, n, i), agg).reshape(a.num_heads, a.head_dim)
            res[f"layers_{i}/heads"] = np.sqrt(np.sum(per_c ** 2, axis=1))
        elif kind == "M":
            m = cfg.mamba
            x = n @ np.asarray(mix["in_proj_x"]["kernel"], np.float64)
            s_x = np_agg(x, agg).reshape(m.num_heads, m.head_dim)
            res[f"layers_{i}/mamba_x"] = s_x
            res[f"layers_{i}/mamba_heads"] = np.sqrt((s_x ** 2).sum(1))
            res[f"layers_{i}/mamba_channels"] = np.sqrt((s_x ** 2).sum(0))
        elif kind == "E":
            e = cfg.moe
            _, ids = inter[f"layers_{i}"]["mixer"]["gate"]["__call__"][0]
            ids = np.asarray(ids).reshape(b, L, e.top_k)
            up = np.asarray(mix["experts"]["up_proj"], np.float64)
            down = np.asarray(mix["experts"]["down_proj"], np.float64)
            ffn, score = [], []
            for ex in range(e.num_experts):
                routed = np.any(ids == ex, axis=-1)  # [b, L]
                h = relu2(n @ up[ex])
                ffn.append(np_agg(h, agg, routed))
                y = np.linalg.norm(h @ down[ex], axis=-1)
                score.append(y[routed].sum() / (routed.sum() + 1e-8))
            res[f"layers_{i}/expert_ffn"] = np.stack(ffn)
            res[f"layers_{i}/experts"] = np.array(score)
            sh = mix["shared_experts"]
            res[f"layers_{i}/shared_mlp"] = np_agg(relu2(n @ np.asarray(sh["up_proj"]["kernel"], np.float64)), agg)
    res["layer/block"] = 1.0 - np.array(cos)
    return res


def assert_scores_match(scores: Scores, expected: dict[str, np.ndarray], rtol=2e-4, atol=1e-6) -> None:
    assert set(expected) <= set(scores), sorted(set(expected) - set(scores))
    for key, want in expected.items():
        got = scores[key]
        assert got.dtype == np.float32, key
        assert got.shape == np.shape(want), (key, got.shape, np.shape(want))
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=key)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dense():
    return _model(DENSE)


@pytest.fixture(scope="module")
def dense_scores(dense):
    return importance(dense, [_tokens(1)])


# ---------------------------------------------------------------------------------------------- tests


def test_dense_scores_match_numpy_oracle(dense, dense_scores):
    expected = oracle(dense, _tokens(1))
    assert_scores_match(dense_scores, expected, atol=2e-5)
    kinds = dense.config.pattern
    assert {k for k in dense_scores if k.startswith("layers_1/")} == {"layers_1/mlp"}
    assert dense_scores["layers_3/heads"].shape == (dense.config.attention.num_heads,)
    assert dense_scores["layer/block"].shape == (len(kinds),)
    assert "layer/lm_loss" not in dense_scores  # only when requested


def test_final_norm_is_opt_in(dense, dense_scores):
    tokens = _tokens(1)
    with_f = importance(dense, [tokens], include_final_norm=True)
    _, outs, _ = block_io(dense, tokens)
    n_f = np_rmsnorm(outs[-1], np.asarray(dense.params["norm_f"]["scale"], np.float64), dense.config.norm_eps)
    np.testing.assert_allclose(with_f["hidden"] - dense_scores["hidden"], np_agg(n_f, "mean_l2"),
                               rtol=1e-3, atol=1e-5)


def test_moe_scores_match_numpy_oracle():
    model = _model(MOE)
    tokens = _tokens(2, b=2, L=8)
    scores = importance(model, [tokens])
    expected = oracle(model, tokens)
    assert_scores_match(scores, expected, atol=2e-5)
    # some expert saw no token in some row -> its channels count as 0 in that row, and the expert score is finite
    assert np.all(np.isfinite(scores["layers_1/experts"]))


def test_two_batches_equal_one_batch_holding_both(dense):
    a, b = _tokens(3), _tokens(4)
    # mean_var reuses mean_l2's compiled forward (only the sequence reduction is traced); batch var checks S1/S2
    for agg in ("mean_l2", "mean_var"):
        split = importance(dense, [a, b], agg=agg)
        joined = importance(dense, [np.concatenate([a, b])], agg=agg)
        assert set(split) == set(joined)
        for key in split:
            np.testing.assert_allclose(split[key], joined[key], rtol=2e-5, atol=1e-7, err_msg=f"{agg} {key}")


def test_agg_variant_against_oracle_and_differs(dense, dense_scores):
    tokens = _tokens(1)
    l2_mean = importance(dense, [tokens], agg="l2_mean")
    assert_scores_match(l2_mean, oracle(dense, tokens, agg="l2_mean"), atol=2e-5)
    # mean over seq then L2 over 2 rows vs L2 over 8 tokens then mean over rows: genuinely different numbers
    assert not np.allclose(l2_mean["layers_1/mlp"], dense_scores["layers_1/mlp"], rtol=0.1)


@pytest.mark.parametrize("agg", AGGS)
def test_seq_and_batch_reductions_match_definitions(agg):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    seq, batch = agg.split("_")
    for m in (None, mask):
        r = np.asarray(seq_stat(jnp.asarray(a), None if m is None else jnp.asarray(m), seq), np.float64)
        got = batch_stat(r.sum(0), (r ** 2).sum(0), r.shape[0], batch)
        np.testing.assert_allclose(got, np_agg(a, agg, m), rtol=1e-5, atol=1e-7)


def test_aggs_are_the_seq_batch_grid():
    assert set(AGGS) == {f"{s}_{b}" for s, b in itertools.product(("mean", "l2", "var"), repeat=2)}
    assert AGGS.count("mean_l2") == 1


def test_save_load_round_trip(dense_scores, tmp_path):
    path = tmp_path / "scores.npz"
    dense_scores.save(path)
    loaded = Scores.load(path)
    assert list(loaded) == list(dense_scores)
    for key in dense_scores:
        assert loaded[key].dtype == np.float32
        np.testing.assert_array_equal(loaded[key], dense_scores[key])
    with pytest.raises(ValueError):  # read-only arrays
        loaded["hidden"][0] = 1.0


def _zero_output(params: dict, i: int, names: tuple[str, ...]) -> dict:
    p = jax.tree.map(lambda x: x, params)  # new containers, same leaves
    layer = dict(p[f"layers_{i}"])
    mixer = dict(layer["mixer"])
    for name in names:
        mixer[name] = {k: jnp.zeros_like(v) for k, v in mixer[name].items()}
    layer["mixer"] = mixer
    p[f"layers_{i}"] = layer
    return p


def test_layer_metrics_and_zeroed_layer(dense):
    # layer 1 (MLP) has its output projection zeroed: it is an identity block
    model = dense.replace(params=_zero_output(dense.params, 1, ("down_proj",)))
    tokens = _tokens(5)
    s = importance(model, [tokens], layer_metrics=("block", "lm_loss", "logits_mse"))
    assert s["layer/block"][1] == 0.0
    assert s["layer/logits_mse"][1] == 0.0
    assert np.all(s["layer/block"][[0, 2, 3, 4, 5, 6, 7]] > 0)

    def ce(logits):
        logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
        return -np.mean(np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1))

    full = np.asarray(model(tokens), np.float64)
    np.testing.assert_allclose(s["layer/lm_loss"][1], ce(full), rtol=1e-5)
    # dropping a layer == zeroing its output projection (params copy), checked for a Mamba and an attention layer
    for i, names in ((0, ("out_proj",)), (3, ("o_proj",))):
        dropped = np.asarray(model.replace(params=_zero_output(model.params, i, names))(tokens), np.float64)
        np.testing.assert_allclose(s["layer/lm_loss"][i], ce(dropped), rtol=1e-5)
        want = np.sum((dropped - full) ** 2) / np.sum(full ** 2)
        np.testing.assert_allclose(s["layer/logits_mse"][i], want, rtol=1e-4)
        assert want > 0


def test_invalid_arguments_raise(dense):
    with pytest.raises(ValueError, match=r"agg='l2'.*mean_l2"):
        importance(dense, [_tokens(1)], agg="l2")
    with pytest.raises(ValueError, match="layer_metrics"):
        importance(dense, [_tokens(1)], layer_metrics=("ppl",))
    with pytest.raises(ValueError, match="batches is empty"):
        importance(dense, [])
    with pytest.raises(ValueError, match="batch of shape"):
        importance(dense, [np.zeros((8,), np.int32)])
