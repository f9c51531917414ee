"""Tests for nemojax.infer.budget: the thinking-budget state machine driven in a jitted lax.scan by adversarial
"model" token streams, against exact positions worked out by hand, a plain-Python reference of the same rule, and
the invariant (at most N + grace thinking tokens before the end tag, which follows complete and contiguous)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.infer.budget import BudgetState, ThinkingBudget, forced_tokens, init_budget_state, update_budget


@functools.partial(jax.jit, static_argnames="cfg")
def _drive(model_tokens: jax.Array, prompt_open: jax.Array, cfg: ThinkingBudget):
    """Run the budget over a "model" that proposes model_tokens[:, t] at step t: [b, T] -> (state, out, forced)."""
    state = init_budget_state(cfg, model_tokens.shape[0], prompt_open)

    def step(state, proposed):
        force, forced = forced_tokens(state, cfg)
        token = jnp.where(force, forced, proposed)
        return update_budget(state, token, cfg), (token, force)

    state, (out, forced) = jax.lax.scan(step, state, model_tokens.T)
    return state, out.T, forced.T


def _run(model: np.ndarray, prompt_open: np.ndarray, cfg: ThinkingBudget):
    state, out, forced = _drive(jnp.asarray(model, jnp.int32), jnp.asarray(prompt_open), cfg=cfg)
    assert out.dtype == jnp.int32 and out.shape == model.shape
    return jax.tree.map(np.asarray, state), np.asarray(out), np.asarray(forced)


def _ends_with(seq, suffix) -> bool:
    return len(suffix) <= len(seq) and tuple(seq[len(seq) - len(suffix) :]) == tuple(suffix)


def _reference(cfg: ThinkingBudget, prompt_open: bool, model) -> dict:
    """The budget rule on plain lists, with brute-force suffix matching instead of the state machine's tables."""
    N, g, E, S = cfg.budget, cfg.grace_tokens, cfg.end_ids, cfg.start_ids
    out, forced = [], []
    thinking, done, count, last_newline = prompt_open, False, 0, False
    opened = 0 if prompt_open else None
    queue = []
    for proposed in model:
        if thinking and not done and not queue and count >= N and (last_newline or count >= N + g):
            text = out[opened:]
            k = max(k for k in range(len(E)) if _ends_with(text, E[:k]))  # the model may have begun the tag
            queue = list(E[k:])
        if queue:
            out.append(queue.pop(0))
            forced.append(True)
            if not queue:
                thinking, done = False, True
            continue
        out.append(int(proposed))
        forced.append(False)
        if done:
            continue
        if thinking:
            count += 1
            last_newline = int(proposed) in cfg.newline_ids
            if _ends_with(out[opened:], E):
                thinking, done = False, True
        elif _ends_with(out, S):
            thinking, opened = True, len(out)
    return dict(out=out, forced=forced, thinking=thinking, done=done, count=count)


def _check_invariant(out, prompt_open: bool, cfg: ThinkingBudget) -> None:
    """From the emitted stream alone: at most N + g thinking tokens precede the first end tag, which is complete."""
    N, g, E, S = cfg.budget, cfg.grace_tokens, cfg.end_ids, cfg.start_ids
    out = list(out)
    if prompt_open:
        opened = 0
    else:
        opened = next((i + 1 for i in range(len(out)) if _ends_with(out[: i + 1], S)), None)
        if opened is None:
            return
    think = out[opened:]
    end = next((i + 1 for i in range(len(think)) if _ends_with(think[: i + 1], E)), None)  # first complete tag
    if end is None:
        assert len(think) < N + g + len(E), "the stream had room for the end tag but it never came"
    else:
        assert end - len(E) <= N + g, f"{end - len(E)} thinking tokens before the end tag, budget {N} + grace {g}"


E3, S2, NL = (7, 8, 9), (3, 4), (5, 6)
CONFIGS = [
    ThinkingBudget(10, end_ids=E3, start_ids=S2, newline_ids=NL),  # grace None -> 1
    ThinkingBudget(12, end_ids=E3, start_ids=(3,), newline_ids=(5,), grace=6),
    ThinkingBudget(0, end_ids=(9,), start_ids=S2, newline_ids=NL),  # budget 0, grace 0: end at once
    ThinkingBudget(0, end_ids=E3, start_ids=S2, newline_ids=(5,), grace=4),  # budget 0: first newline or 4 tokens
    ThinkingBudget(6, end_ids=E3, start_ids=S2, grace=3),  # no newline ids: hard cut at N + g
    ThinkingBudget(25, end_ids=(7, 8), start_ids=S2, newline_ids=NL),  # grace None -> 3
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_forced_end_at_exact_positions(cfg):
    """Streams that never emit the tag's tokens: the tag starts exactly at min(first newline with count >= N, N + g)."""
    N, g, E, S = cfg.budget, cfg.grace_tokens, cfg.end_ids, cfg.start_ids
    rng = np.random.default_rng(N * 7 + g)
    b, T = 10, 48
    plain = np.array([0, 1, 2, 10, 11], np.int32)  # neither tag's tokens nor newlines
    model = rng.choice(plain, size=(b, T))
    prompt_open = np.array([True, True, True, True, False, False, False, True, True, False])
    newline = NL[0]
    model[1, max(N - 1, 0)] = newline  # the N-th thinking token is a newline: end right after it
    model[2, [max(N - 3, 0), N + 1]] = newline  # a newline before the budget is ignored
    model[3, rng.random(T) < 0.15] = newline
    model[4, 5 : 5 + len(S)] = S  # opens at step 5 + len(S)
    model[4, rng.random(T) < 0.1] = newline
    model[4, 5 : 5 + len(S)] = S
    model[5, : len(S)] = S  # opens at once
    # row 6: never opens, so it must pass through untouched
    model[7, N + g - 1] = newline  # newline as the last grace token
    model[8, N + g] = newline  # too late: the hard cut comes first
    model[9, 2 : 2 + len(S)] = S
    model[9, 2 + len(S) + N : 2 + len(S) + N + 3] = newline  # newlines in a row, the first is at count N + 1

    state, out, forced = _run(model, prompt_open, cfg)
    for i in range(b):
        row = list(model[i])
        if prompt_open[i]:
            o = 0
        else:
            starts = [j + len(S) for j in range(T) if tuple(row[j : j + len(S)]) == S]
            if not starts:
                np.testing.assert_array_equal(out[i], model[i])
                assert not forced[i].any() and not state.thinking[i] and not state.done[i]
                continue
            o = starts[0]
        newlines = [j + 1 for j in range(T - o) if row[o + j] in cfg.newline_ids and j + 1 >= N]
        p = min(newlines + [N + g])  # thinking tokens before the tag
        want = row[: o + p] + list(E) + row[o + p + len(E) :]
        np.testing.assert_array_equal(out[i], want, err_msg=f"row {i}")
        np.testing.assert_array_equal(np.flatnonzero(forced[i]), np.arange(o + p, o + p + len(E)))
        assert state.done[i] and not state.thinking[i] and state.count[i] == p and state.forcing[i] == -1
        ref = _reference(cfg, bool(prompt_open[i]), row)
        assert ref["out"] == list(out[i])
        _check_invariant(out[i], bool(prompt_open[i]), cfg)


def test_natural_end_is_left_alone():
    cfg = ThinkingBudget(12, end_ids=E3, start_ids=S2, newline_ids=(5,), grace=6)
    b, T = 4, 40
    model = np.zeros((b, T), np.int32)
    prompt_open = np.array([True, True, False, True])
    model[0, 3:6] = E3  # ends itself after 3 thinking tokens, far below the budget
    model[0, 10:12] = S2  # a second "<think>" after the end is not budgeted
    model[1, 14:17] = E3  # ends itself inside the grace window (count 14 >= N = 12, no newline yet)
    model[1, 20] = 5
    model[2, 0:2] = S2
    model[2, 2:5] = [7, 8, 9]  # opens, then closes at once
    model[3, 11] = 5  # control row: a newline as the 12th thinking token forces the end right after it
    state, out, forced = _run(model, prompt_open, cfg)
    for i in range(3):
        np.testing.assert_array_equal(out[i], model[i])
        assert not forced[i].any() and state.done[i] and not state.thinking[i]
    np.testing.assert_array_equal(state.count[:3], [6, 17, 3])  # the model's own tag tokens count as thinking
    np.testing.assert_array_equal(out[3, 12:15], E3)
    np.testing.assert_array_equal(np.flatnonzero(forced[3]), [12, 13, 14])


@pytest.mark.parametrize(
    "cfg",
    [
        ThinkingBudget(8, end_ids=E3, start_ids=S2, newline_ids=(5,)),
        ThinkingBudget(5, end_ids=(7, 7, 8), start_ids=(3, 3, 4), newline_ids=(5, 7), grace=4),  # overlapping tags
        ThinkingBudget(0, end_ids=(7, 8), start_ids=(3,), newline_ids=(5,), grace=2),
        ThinkingBudget(3, end_ids=(5, 7), start_ids=(4, 3), newline_ids=(5,), grace=0),  # the tag begins with "\n"
    ],
    ids=str,
)
def test_matches_reference_on_adversarial_streams(cfg):
    """Random streams over a tiny alphabet full of partial tags, newlines and tag look-alikes: exact equality with
    the reference (outputs, forced steps, final state), and the invariant."""
    rng = np.random.default_rng(sum(cfg.end_ids) + cfg.budget)
    b, T = 96, 40
    alphabet = np.array([0, 3, 4, 5, 7, 8, 9], np.int32)
    weights = np.array([4, 2, 2, 1, 2, 2, 1], float)
    model = rng.choice(alphabet, size=(b, T), p=weights / weights.sum())
    model[b // 2 :, :6] = rng.choice(np.array([0, 5], np.int32), size=(b - b // 2, 6))  # rows that start quietly
    prompt_open = rng.random(b) < 0.5
    state, out, forced = _run(model, prompt_open, cfg)
    n_forced = 0
    for i in range(b):
        ref = _reference(cfg, bool(prompt_open[i]), model[i].tolist())
        assert ref["out"] == out[i].tolist(), f"row {i}"
        assert ref["forced"] == forced[i].tolist(), f"row {i}"
        assert (ref["done"], ref["thinking"], ref["count"]) == (state.done[i], state.thinking[i], state.count[i])
        _check_invariant(out[i], bool(prompt_open[i]), cfg)
        n_forced += forced[i].any()
    assert 0 < n_forced < b  # both forced and natural/unopened rows occur


def test_continues_a_partial_end_tag():
    """The model has begun the tag when the hard cut comes: only the rest is forced, so the text holds one tag."""
    cfg = ThinkingBudget(4, end_ids=E3, start_ids=S2, grace=0)
    model = np.array([[0, 1, 7, 8, 2, 2, 2, 2], [0, 1, 2, 7, 8, 2, 2, 2]], np.int32)
    state, out, forced = _run(model, np.array([True, True]), cfg)
    np.testing.assert_array_equal(out, [[0, 1, 7, 8, 9, 2, 2, 2], [0, 1, 2, 7, 8, 9, 2, 2]])
    np.testing.assert_array_equal(forced.sum(-1), [1, 2])
    assert state.done.all()


def test_single_steps_and_state():
    cfg = ThinkingBudget(0, end_ids=(7, 8), start_ids=(3,))
    state = init_budget_state(cfg, 3, jnp.array([True, False, True]))
    assert isinstance(state, BudgetState)
    assert all(leaf.shape == (3,) for leaf in jax.tree.leaves(state))
    assert state.count.dtype == jnp.int32 and state.forcing.dtype == jnp.int32 and state.done.dtype == jnp.bool_
    force, token = jax.jit(forced_tokens, static_argnames="cfg")(state, cfg=cfg)
    np.testing.assert_array_equal(np.asarray(force), [True, False, True])
    np.testing.assert_array_equal(np.asarray(token), [7, -1, 7])
    assert token.dtype == jnp.int32
    state = update_budget(state, jnp.where(force, token, 3), cfg)  # row 1 emits "<think>"
    np.testing.assert_array_equal(np.asarray(state.forcing), [1, -1, 1])
    np.testing.assert_array_equal(np.asarray(state.thinking), [True, True, True])
    force, token = forced_tokens(state, cfg)
    np.testing.assert_array_equal(np.asarray(token), [8, 7, 8])
    state = update_budget(state, token, cfg)
    np.testing.assert_array_equal(np.asarray(state.done), [True, False, True])
    np.testing.assert_array_equal(np.asarray(state.thinking), [False, True, False])
    # A scalar prompt_open broadcasts.
    assert bool(init_budget_state(cfg, 2, True).thinking.all())


def test_grace_default_is_integer_ceil_of_ten_percent():
    for budget, grace in [(0, 0), (1, 1), (10, 1), (11, 2), (30, 3), (31, 4), (512, 52), (1000, 100)]:
        assert ThinkingBudget(budget, end_ids=(1,), start_ids=(2,)).grace_tokens == grace
    assert ThinkingBudget(100, end_ids=(1,), start_ids=(2,), grace=0).grace_tokens == 0


def test_config_is_hashable_and_normalised():
    a = ThinkingBudget(8, end_ids=[7, 8], start_ids=np.array([3]), newline_ids=[5])
    b = ThinkingBudget(8, end_ids=(7, 8), start_ids=(3,), newline_ids=(5,))
    assert a == b and hash(a) == hash(b)
    assert a.end_ids == (7, 8) and type(a.start_ids[0]) is int


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(budget=-1), r"budget=-1 is invalid: must be an int >= 0"),
        (dict(budget=2.5), r"budget=2.5 is invalid"),
        (dict(end_ids=()), r"end_ids=\(\) is invalid: must be a non-empty"),
        (dict(start_ids=[]), r"start_ids=\[\] is invalid: must be a non-empty"),
        (dict(end_ids=(7, -1)), r"end_ids=\(7, -1\) is invalid: token ids must be ints >= 0"),
        (dict(end_ids="</think>"), r"end_ids='</think>' is invalid: must be a sequence of token ids"),
        (dict(newline_ids=(1.0,)), r"newline_ids=\(1.0,\) is invalid"),
        (dict(grace=-2), r"grace=-2 is invalid: must be None \(10% of budget\) or an int >= 0"),
    ],
)
def test_invalid_configs_raise(kwargs, match):
    args = dict(budget=4, end_ids=(7,), start_ids=(3,)) | kwargs
    with pytest.raises(ValueError, match=match):
        ThinkingBudget(**args)
