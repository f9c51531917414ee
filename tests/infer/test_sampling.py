"""Tests for nemojax.infer.sampling: process_logits against transformers' own logits processors (same order, ties,
top_p near 0 and 1), greedy = argmax, sampling frequencies against the processed softmax, seen-mask helpers,
config validation."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nemojax.infer import sampling
from nemojax.infer.sampling import SamplingConfig


def _hf_process(logits: np.ndarray, seen: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """transformers' processors in generate()'s order: penalty, then (when sampling) temperature, top-k, top-p.

    generate() skips a warper at its neutral value (temperature 1, top_k 0, top_p 1); so do we here.
    """
    scores = torch.from_numpy(logits.astype(np.float32))
    b, V = seen.shape
    # input_ids: every seen id once per row, padded with an id that is seen anyway (or the row's own first id).
    ids = [np.flatnonzero(row) for row in seen]
    width = max(1, max(len(r) for r in ids))
    input_ids = torch.full((b, width), V, dtype=torch.long)  # V is clamped and dropped by the processor
    for i, r in enumerate(ids):
        input_ids[i, : len(r)] = torch.from_numpy(r)
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.temperature > 0:
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))
    for proc in procs:
        scores = proc(input_ids, scores)
    return scores.numpy()


CONFIGS = [
    SamplingConfig(),
    SamplingConfig(repetition_penalty=1.3),
    SamplingConfig(repetition_penalty=0.7),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=1.3, top_k=1),
    SamplingConfig(temperature=0.9, top_k=100),  # k > V: clipped, a no-op
    SamplingConfig(temperature=1.0, top_p=0.9),
    SamplingConfig(temperature=0.8, top_p=1e-6),  # near 0: only the top token survives
    SamplingConfig(temperature=1.2, top_p=0.999999),  # near 1: only the tiniest tail is cut
    SamplingConfig(temperature=0.6, top_k=7, top_p=0.8, repetition_penalty=1.2),
    SamplingConfig(temperature=2.0, top_k=3, top_p=0.5, repetition_penalty=0.9),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_process_logits_matches_transformers(cfg, ties, monkeypatch):
    # TopPLogitsWarper sorts with torch.sort's default (unstable) algorithm, whose order among equal logits is
    # unspecified (on CPU it differs from index order once V > 16). nemojax breaks such ties by token id (stable
    # ascending sort: of two equal logits the lower id is cut first); the reference gets the same tie order here.
    monkeypatch.setattr(torch, "sort", functools.partial(torch.sort, stable=True))
    rng = np.random.default_rng(0)
    b, V = 6, 32
    if ties:  # few distinct values: ties at the top-k boundary and inside the top-p sort
        logits = rng.integers(-3, 4, size=(b, V)).astype(np.float32) * 0.75
    else:
        logits = rng.normal(scale=3.0, size=(b, V)).astype(np.float32)
    seen = rng.random((b, V)) < 0.3
    seen[0] = False  # a row with nothing seen
    want = _hf_process(logits, seen, cfg)
    got = np.asarray(sampling.process_logits(jnp.asarray(logits), jnp.asarray(seen), cfg))
    assert got.dtype == np.float32 and got.shape == (b, V)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=0)
    assert (np.isfinite(got).sum(-1) >= 1).all()


def test_process_logits_under_jit_and_semantics():
    cfg = SamplingConfig(temperature=0.5, top_k=2, repetition_penalty=2.0)
    logits = jnp.array([[4.0, -2.0, 1.0, 3.0]])
    seen = jnp.array([[True, True, False, False]])
    got = jax.jit(sampling.process_logits, static_argnames="cfg")(logits, seen, cfg=cfg)
    # penalty: 4 -> 2, -2 -> -4; temperature 0.5: [4, -8, 2, 6]; top-2 keeps 6 and 4.
    np.testing.assert_array_equal(np.asarray(got), [[4.0, -np.inf, -np.inf, 6.0]])


def test_top_p_breaks_ties_by_token_id():
    # Four equal logits: ascending cumulative probabilities 0.25, 0.5, 0.75, 1.0; with top_p = 0.3 those <= 0.7 go,
    # and of equal logits the lower ids are cut first.
    got = sampling.process_logits(jnp.zeros((1, 4)), jnp.zeros((1, 4), bool), SamplingConfig(1.0, top_p=0.3))
    np.testing.assert_array_equal(np.asarray(got), [[-np.inf, -np.inf, 0.0, 0.0]])


def test_greedy_is_argmax_of_penalised_logits():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(5, 50)).astype(np.float32))
    seen = jnp.zeros((5, 50), bool)
    cfg = SamplingConfig(top_k=3, top_p=0.1)  # ignored when greedy
    sample = jax.jit(sampling.sample, static_argnames="cfg")
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(sample(logits, seen, cfg=cfg, key=key)), np.argmax(logits, -1))
    # Penalising every row's argmax hard moves greedy to the runner-up.
    top = jnp.argmax(logits, -1)
    seen = sampling.mark_seen(seen, top)
    pen = SamplingConfig(repetition_penalty=1e6)
    got = sample(logits, seen, cfg=pen, key=key)
    assert got.dtype == jnp.int32
    want = np.argmax(np.where(np.asarray(seen), -np.inf, np.asarray(logits)), -1)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_argmax_equals_jnp_argmax_on_ties_nans_and_infinities(dtype):
    nan, inf = np.nan, np.inf
    rows = [[1, 3, 3, 2], [nan, 1, nan, 0], [1, nan, 5, 5], [-inf, -inf, -inf, -inf], [inf, 1, inf, 2],
            [-0.0, 0.0, -1, -2], [0.0, -0.0, -1, -2], [-3, -1, -1, -2]]
    rng = np.random.default_rng(0)
    random = rng.normal(size=(64, 1000)).round(1)  # rounded: many ties for the maximum
    for x in (np.array(rows), random, random[:, None, :]):
        x = jnp.asarray(x, dtype)
        got = jax.jit(sampling.argmax)(x)
        assert got.dtype == jnp.int32 and got.shape == x.shape[:-1]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))
    np.testing.assert_array_equal(np.asarray(sampling.argmax(jnp.asarray(rows, dtype))), [1, 0, 1, 0, 0, 0, 0, 1])


DRAWS = 4000
# Each frequency is a mean of DRAWS Bernoulli draws: its standard deviation is at most sqrt(0.25 / 4000) = 0.0079.
# The tolerance is about 4 sigma at the worst case p = 0.5, for every token of every row at once.
FREQ_TOL = 0.032


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.7, top_k=4, repetition_penalty=1.5),
        SamplingConfig(temperature=1.5, top_p=0.6),
    ],
    ids=str,
)
def test_sampling_frequencies_match_processed_softmax(cfg):
    rng = np.random.default_rng(2)
    b, V = 3, 10
    logits = jnp.asarray(rng.normal(scale=1.5, size=(b, V)).astype(np.float32))
    seen = jnp.asarray(rng.random((b, V)) < 0.3)
    keys = jax.random.split(jax.random.key(1234), DRAWS)
    draw = functools.partial(sampling.sample, logits, seen, cfg)
    tokens = np.asarray(jax.jit(jax.vmap(draw))(keys))  # [DRAWS, b]
    assert tokens.shape == (DRAWS, b) and tokens.dtype == np.int32
    processed = np.asarray(sampling.process_logits(logits, seen, cfg), np.float64)
    probs = np.exp(processed - processed.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    freq = np.stack([np.bincount(tokens[:, i], minlength=V) / DRAWS for i in range(b)])
    np.testing.assert_allclose(freq, probs, atol=FREQ_TOL, rtol=0)
    # Tokens removed by top-k / top-p never appear.
    assert (freq[np.isneginf(processed)] == 0).all()
    if cfg.top_k or cfg.top_p < 1:
        assert np.isneginf(processed).any()  # the filter did remove something, so the check above has teeth


def test_categorical_draws_rows_independently_with_one_key():
    logits = jnp.zeros((64, 16))
    tokens = sampling.sample(logits, jnp.zeros((64, 16), bool), SamplingConfig(temperature=1.0), jax.random.key(0))
    assert len(set(np.asarray(tokens).tolist())) > 4


def test_mark_seen_and_seen_from_prompts():
    seen = jnp.zeros((3, 6), bool)
    seen = sampling.mark_seen(seen, jnp.array([2, -1, 5]))  # -1 (padding) is ignored
    want = np.zeros((3, 6), bool)
    want[0, 2] = want[2, 5] = True
    np.testing.assert_array_equal(np.asarray(seen), want)

    tokens = jnp.array([[1, 1, 4, 0], [3, 2, 9, 9], [5, 5, 5, 5]])
    lengths = jnp.array([3, 1, 0])
    got = jax.jit(sampling.seen_from_prompts, static_argnames="vocab")(tokens, lengths, vocab=6)
    want = np.zeros((3, 6), bool)
    want[0, [1, 4]] = True
    want[1, 3] = True
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.1), "temperature=-0.1"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_k=2.0), "top_k=2.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_p=0.0), "top_p=0.0"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty=-1.0"),
    ],
)
def test_invalid_configs_raise(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")) as err:
        SamplingConfig(**kwargs)
    assert "must be" in str(err.value)


def test_config_is_hashable_and_normalised():
    assert hash(SamplingConfig(temperature=1)) == hash(SamplingConfig(temperature=1.0))
    assert SamplingConfig(temperature=1) == SamplingConfig(temperature=1.0)
    assert isinstance(SamplingConfig(temperature=1).temperature, float)
    with pytest.raises(ValueError, match="vocab=0"):
        sampling.seen_from_prompts(jnp.zeros((1, 2), jnp.int32), jnp.array([1]), 0)
