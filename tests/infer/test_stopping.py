"""Tests for nemojax.infer.stopping: ends_with_stop against a plain-Python oracle on random buffers (stale tokens
after count, sequences longer than count, overlapping sequences), under jit; StopSequences validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nemojax.infer.stopping import StopSequences, ends_with_stop

ends_with_stop_jit = jax.jit(ends_with_stop, static_argnames="stops")


def _oracle(buffer: np.ndarray, count: np.ndarray, stops: StopSequences) -> np.ndarray:
    out = []
    for row, n in zip(buffer.tolist(), count.tolist(), strict=True):
        prefix = row[:n]
        out.append(any(len(s) <= len(prefix) and tuple(prefix[len(prefix) - len(s) :]) == s for s in stops.sequences))
    return np.array(out, bool)


STOP_SETS = [
    StopSequences([[3]]),
    StopSequences([[1, 2], [2, 2, 2], [0]]),
    StopSequences([[4, 4, 1, 2], [1], [2, 3, 1, 2, 3]]),  # overlapping and a prefix of one another
]


@pytest.mark.parametrize("stops", STOP_SETS, ids=str)
def test_matches_python_oracle_on_random_buffers(stops):
    rng = np.random.default_rng(0)
    b, T = 512, 9
    buffer = rng.integers(0, 5, size=(b, T)).astype(np.int32)  # small alphabet: many matches
    count = rng.integers(0, T + 1, size=b).astype(np.int32)
    # Plant a stop sequence right before count in a third of the rows, and one right after count (stale) in another.
    for i in range(b):
        seq = stops.sequences[rng.integers(len(stops))]
        if i % 3 == 0 and count[i] >= len(seq):
            buffer[i, count[i] - len(seq) : count[i]] = seq
        elif i % 3 == 1 and count[i] + len(seq) <= T:
            buffer[i, count[i] : count[i] + len(seq)] = seq
    want = _oracle(buffer, count, stops)
    got = np.asarray(ends_with_stop_jit(jnp.asarray(buffer), jnp.asarray(count), stops=stops))
    assert got.dtype == np.bool_ and got.shape == (b,)
    np.testing.assert_array_equal(got, want)
    assert 0.1 < want.mean() < 0.9  # both outcomes are exercised


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), min_size=1, max_size=3),
    # A fixed [4, 6] buffer keeps eager op shapes (and so their compilations) few.
    rows=st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=6, max_size=6), st.integers(0, 6)), min_size=4, max_size=4
    ),
)
def test_matches_python_oracle_hypothesis(seqs, rows):
    stops = StopSequences(seqs)
    buffer = np.array([r for r, _ in rows], np.int32)
    count = np.array([c for _, c in rows], np.int32)
    got = np.asarray(ends_with_stop(jnp.asarray(buffer), jnp.asarray(count), stops))
    np.testing.assert_array_equal(got, _oracle(buffer, count, stops))


def test_explicit_cases():
    stops = StopSequences([[7, 8], [9]])
    buffer = jnp.array([[1, 7, 8, 0], [7, 8, 5, 5], [8, 0, 0, 0], [9, 9, 9, 9], [7, 8, 9, 1]])
    count = jnp.array([3, 3, 1, 0, 4])
    # row 0 ends "7 8"; row 1 has "7 8" but it ends "5"; row 2 has only "8" of "7 8"; row 3 has nothing counted;
    # row 4 has "9" but then "1".
    got = ends_with_stop_jit(buffer, count, stops=stops)
    np.testing.assert_array_equal(np.asarray(got), [True, False, False, False, False])
    np.testing.assert_array_equal(
        np.asarray(ends_with_stop(buffer, jnp.array([2, 2, 2, 4, 3]), stops)), [False, True, False, True, True]
    )


def test_no_sequences_never_match():
    stops = StopSequences([])
    assert len(stops) == 0 and stops.max_len == 0
    got = ends_with_stop_jit(jnp.zeros((2, 3), jnp.int32), jnp.array([1, 3]), stops=stops)
    np.testing.assert_array_equal(np.asarray(got), [False, False])


def test_as_array_and_hashable():
    stops = StopSequences([[5, 6, 7], (1,), np.array([2, 3])])
    ids, lengths = stops.as_array()
    np.testing.assert_array_equal(ids, [[5, 6, 7], [1, -1, -1], [2, 3, -1]])
    np.testing.assert_array_equal(lengths, [3, 1, 2])
    assert ids.dtype == np.int32 and lengths.dtype == np.int32
    assert stops.sequences == ((5, 6, 7), (1,), (2, 3))
    assert hash(stops) == hash(StopSequences(((5, 6, 7), [1], [2, 3])))


@pytest.mark.parametrize(
    "seqs, match",
    [
        ([[1], []], r"sequences\[1\]=\[\] is invalid: must be non-empty"),
        ([[1, -2]], r"sequences\[0\]=\(1, -2\) is invalid: token ids must be ints >= 0"),
        ([[1.5]], r"sequences\[0\]=\(1.5,\) is invalid"),
        ([5], r"sequences\[0\]=5 is invalid: must be a sequence of token ids"),
        ("ab", r"sequences='ab' is invalid"),
    ],
)
def test_invalid_sequences_raise(seqs, match):
    with pytest.raises(ValueError, match=match):
        StopSequences(seqs)
