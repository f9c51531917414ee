"""Nemotron Nano 2's thinking budget as a per-step state machine for a jitted generation loop (model card:
https://huggingface.co/nvidia/NVIDIA-Nemotron-Nano-9B-v2; arXiv 2508.14444).

The server-side rule of the NIM logits processor: count the tokens generated inside the thinking block; once the
count reaches the budget N, end the trace at the next newline, or at N + grace tokens if no newline comes (grace
defaults to 10% of N); then force-emit the end-of-thinking tokens (e.g. the ids of "</think>") one per step and turn
the processor off for that row.

Per step of the loop (the state is a pytree of [b] arrays; the config is static):

    force, forced = forced_tokens(state, cfg)           # before sampling
    token = jnp.where(force, forced, sampled)           # a forced row must emit `forced`
    state = update_budget(state, token, cfg)            # after, with the token actually emitted

Semantics, per row:

- Thinking opens when the prompt already ends inside "<think>" (`prompt_open`) or when the generated tokens end with
  `start_ids`. The start tag itself is not a thinking token.
- Thinking tokens (`count`) are the tokens emitted while thinking that are not forced: every token the model emits
  itself inside the open block counts, including its own end-tag tokens (they are not known to be a tag until the
  tag is complete); the token that completes a natural end tag also ends thinking.
- The model emitting `end_ids` by itself ends thinking: the row is done and never touched.
- Forcing begins, before a step, when count >= N and either the last emitted thinking token was one of
  `newline_ids` or count >= N + grace. It emits the rest of `end_ids`: if the model's latest tokens already form the
  first k tokens of the tag, forcing continues from end_ids[k], so the text holds one contiguous, complete tag.
  Hence at most N + grace thinking tokens precede the first token of the end tag.
- After the tag is complete (natural or forced) the row is done: later tokens, a second "<think>" included, are
  ignored.

Multi-token tags are matched exactly: `start_match` / `end_match` hold the length of the longest prefix of the tag
that is a suffix of the tokens seen so far (Knuth-Morris-Pratt), updated by a static table of the tag's borders, so
overlapping tokens like "a a b" inside "a a a b" are found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _ids(name: str, value, *, non_empty: bool) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | np.ndarray):
        raise ValueError(f"{name}={value!r} is invalid: must be a sequence of token ids (ints >= 0)")
    ids = tuple(value)
    if non_empty and not ids:
        raise ValueError(f"{name}={value!r} is invalid: must be a non-empty sequence of token ids")
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
            raise ValueError(f"{name}={value!r} is invalid: token ids must be ints >= 0")
    return tuple(int(t) for t in ids)


@dataclasses.dataclass(frozen=True)
class ThinkingBudget:
    """Thinking-budget settings. Hashable: pass it as a static argument to `jax.jit`.

    budget:      N >= 0, the thinking tokens allowed before the trace is ended (0: end it at once).
    end_ids:     token ids of the end-of-thinking text, e.g. the ids of "</think>" or "</think>\\n"; both forced and
                 used to detect a natural end.
    start_ids:   token ids of "<think>".
    newline_ids: token ids whose text contains a newline (may be empty: then only the hard cut at N + grace).
    grace:       extra thinking tokens allowed while waiting for a newline; None means ceil(N / 10).
    """

    budget: int
    end_ids: tuple[int, ...]
    start_ids: tuple[int, ...]
    newline_ids: tuple[int, ...] = ()
    grace: int | None = None

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | np.integer) or self.budget < 0:
            raise ValueError(f"budget={self.budget!r} is invalid: must be an int >= 0")
        if self.grace is not None and (
            isinstance(self.grace, bool) or not isinstance(self.grace, int | np.integer) or self.grace < 0
        ):
            raise ValueError(f"grace={self.grace!r} is invalid: must be None (10% of budget) or an int >= 0")
        object.__setattr__(self, "budget", int(self.budget))
        object.__setattr__(self, "grace", None if self.grace is None else int(self.grace))
        object.__setattr__(self, "end_ids", _ids("end_ids", self.end_ids, non_empty=True))
        object.__setattr__(self, "start_ids", _ids("start_ids", self.start_ids, non_empty=True))
        object.__setattr__(self, "newline_ids", _ids("newline_ids", self.newline_ids, non_empty=False))

    @property
    def grace_tokens(self) -> int:
        """The grace window: `grace`, or ceil(0.1 * budget) computed in integers when grace is None."""
        return (self.budget + 9) // 10 if self.grace is None else self.grace


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BudgetState:
    """Per-row state of the thinking budget; every field is [b]."""

    thinking: jax.Array  # bool: inside an open thinking block (False again once the block is closed)
    count: jax.Array  # int32: thinking tokens emitted so far (not counting forced tokens)
    forcing: jax.Array  # int32: index into end_ids of the next token to force; -1 when not forcing
    start_match: jax.Array  # int32: longest prefix of start_ids that the latest generated tokens end with
    end_match: jax.Array  # int32: longest prefix of end_ids that the latest thinking tokens end with
    last_newline: jax.Array  # bool: the last thinking token emitted was one of newline_ids
    done: jax.Array  # bool: thinking ended (naturally or forced); the budget no longer acts on the row

    def replace(self, **changes) -> BudgetState:
        return dataclasses.replace(self, **changes)


def init_budget_state(cfg: ThinkingBudget, batch: int, prompt_open: jax.Array | bool) -> BudgetState:
    """Fresh state for `batch` rows. prompt_open: [b] bool (or a scalar for all rows), True where the prompt already
    ends inside an open thinking block (the chat template emitted "<think>"); other rows start thinking when the
    model emits `cfg.start_ids`."""
    del cfg  # the state's shape does not depend on the config
    thinking = jnp.broadcast_to(jnp.asarray(prompt_open, bool), (batch,))
    zeros = jnp.zeros((batch,), jnp.int32)
    return BudgetState(
        thinking=thinking,
        count=zeros,
        forcing=jnp.full((batch,), -1, jnp.int32),
        start_match=zeros,
        end_match=zeros,
        last_newline=jnp.zeros((batch,), bool),
        done=jnp.zeros((batch,), bool),
    )


def _borders(pattern: tuple[int, ...]) -> np.ndarray:
    """[L, L] bool: table[m, j] is True when pattern[:j] is a suffix of pattern[:m] (j <= m). Having matched m tokens,
    the candidates for the match length after one more token t are j + 1 for every such j with pattern[j] == t."""
    L = len(pattern)
    table = np.zeros((L, L), bool)
    for m in range(L):
        for j in range(m + 1):
            table[m, j] = pattern[:j] == pattern[m - j : m]
    return table


def _advance(match: jax.Array, token: jax.Array, pattern: tuple[int, ...]) -> jax.Array:
    """New match length [b] int32 (0..L) of `pattern` after `token` [b], from match lengths [b] in 0..L-1."""
    L = len(pattern)
    cand = jnp.asarray(_borders(pattern))[jnp.clip(match, 0, L - 1)]  # [b, L]
    hit = cand & (jnp.asarray(pattern, jnp.int32)[None, :] == token[:, None])  # [b, L]
    return jnp.max(jnp.where(hit, jnp.arange(1, L + 1, dtype=jnp.int32), 0), axis=-1)


def forced_tokens(state: BudgetState, cfg: ThinkingBudget) -> tuple[jax.Array, jax.Array]:
    """(force [b] bool, token [b] int32): the rows that must emit `token` this step instead of sampling.

    `token` is the next id of `cfg.end_ids` where force is True, -1 elsewhere. Call before sampling; pure.
    """
    N, g = cfg.budget, cfg.grace_tokens
    active = state.thinking & ~state.done
    ongoing = active & (state.forcing >= 0)
    begin = active & (state.forcing < 0) & (state.count >= N) & (state.last_newline | (state.count >= N + g))
    force = ongoing | begin
    idx = jnp.where(state.forcing >= 0, state.forcing, state.end_match)
    end = jnp.asarray(cfg.end_ids, jnp.int32)
    token = jnp.where(force, end[jnp.clip(idx, 0, len(cfg.end_ids) - 1)], -1)
    return force, token


def update_budget(state: BudgetState, token: jax.Array, cfg: ThinkingBudget) -> BudgetState:
    """State after the rows emitted `token` [b] int (sampled, or forced where `forced_tokens(state, cfg)` said so).

    Counts thinking tokens, detects a natural end tag, advances forcing, and detects `start_ids` in rows that are not
    yet thinking. Done rows are left unchanged.
    """
    token = jnp.asarray(token, jnp.int32)
    E, S = len(cfg.end_ids), len(cfg.start_ids)
    force, _ = forced_tokens(state, cfg)
    active = ~state.done

    # A forced step emits end_ids[idx].
    idx = jnp.where(state.forcing >= 0, state.forcing, state.end_match)
    forced_next = idx + 1
    forced_end = force & (forced_next >= E)

    # A free step inside the thinking block: a thinking token, maybe the last of a natural end tag.
    free = state.thinking & active & ~force
    end_match = _advance(state.end_match, token, cfg.end_ids)
    natural_end = free & (end_match == E)
    newline = (token[:, None] == jnp.asarray(np.array(cfg.newline_ids, np.int32))[None, :]).any(axis=-1)

    # A step before thinking: watch for the start tag.
    before = active & ~state.thinking
    start_match = _advance(state.start_match, token, cfg.start_ids)
    opened = before & (start_match == S)

    ended = forced_end | natural_end
    return BudgetState(
        thinking=jnp.where(ended, False, state.thinking | opened),
        count=state.count + free.astype(jnp.int32),
        forcing=jnp.where(force, jnp.where(forced_end, -1, forced_next), state.forcing),
        start_match=jnp.where(before, jnp.where(opened, 0, start_match), state.start_match),
        end_match=jnp.where(force, forced_next, jnp.where(free, end_match, state.end_match)),
        last_newline=jnp.where(free, newline, state.last_newline),
        done=state.done | ended,
    )
