"""Self-speculative greedy decoding with the model's MTP head (Nemotron 3 Super; docs/numerics.md 9).

Each round drafts k tokens with the MTP head, verifies them with one forward of the main model over k + 1
tokens, keeps the longest prefix of drafts that greedy decoding would have produced, plus the main model's own
token after it, and rolls every Mamba conv/SSM state back to the last kept token. The output is plain greedy
decoding's, token for token; a round emits between 1 and k + 1 tokens.

Draft level j (0 <= j < k) runs MTP depth min(j, D - 1) (levels past the trained depths reuse the last one, as
Megatron's repeated MTP layer does) with its own caches. At position t it reads level j-1's output at t (the main
model's final normed hidden for j = 0) and the embedding of token t + j + 1, and predicts token t + j + 2.

Invariants at the start of a round, per sequence: the main cache holds n tokens and token n (`pending`) is
known but not yet fed; drafts d_1..d_k guess tokens n+1..n+k; level j's cache has committed positions < n - j
(those whose input token is known for sure) and `carry[j]` is its output at position n - j - 1. A round with a
accepted drafts commits a + 1 tokens everywhere: level j re-runs positions n - j .. n + k (its uncommitted tail
was computed from drafts) and commits the first a + 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from nemojax import model
from nemojax.config import ModelConfig
from nemojax.infer.cache import Cache, init_cache
from nemojax.infer.decode_config import finished
from nemojax.infer.extend import DECODE_COMPILER_OPTIONS, commit_steps, embed, extend, logits
from nemojax.infer.sampling import argmax
from nemojax.nn.state import Extend, take_rows


def _greedy(config: ModelConfig, params: dict, hidden: jax.Array) -> jax.Array:
    return argmax(logits(config, params, hidden))


def _mtp_extend(config: ModelConfig, params: dict, depth: int, hidden: jax.Array, tokens: jax.Array, cache: Cache,
                commit: jax.Array, *, fresh: bool = False, all_steps: bool = False) -> tuple[jax.Array, Cache]:
    """One draft level over T positions. hidden: [b, T, h], tokens: [b, T] (the tokens whose embeddings it reads)
    -> (outputs [b, T, h], cache). Semantics of commit / fresh / all_steps as `nemojax.infer.extend.extend`."""
    step = Extend(cache.length, commit, fresh=fresh, all_steps=all_steps)
    embedded = embed(config, params, tokens)
    out, layers = model.mtp_extend(config, params, depth, hidden, embedded, cache.layers, step)
    return out, Cache(layers, cache.length if all_steps else cache.length + commit)


def _put_rows(x: jax.Array, first: jax.Array, values: jax.Array) -> jax.Array:
    """x: [b, L, ...] with values [b, m, ...] written at rows first[i] .. first[i] + m - 1 of each sequence."""
    return jax.vmap(lambda row, s, v: jax.lax.dynamic_update_slice_in_dim(row, v, s, axis=0))(x, first, values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    main: Cache
    levels: tuple[Cache, ...]
    carry: tuple[jax.Array, ...]  # per level, [b, hidden]
    pending: jax.Array  # [b] int32
    drafts: jax.Array  # [b, k] int32
    out: jax.Array  # [b, max_new + k + 1] int32
    count: jax.Array  # [b]
    done: jax.Array  # [b] bool
    accepted: jax.Array  # [b] drafts accepted, summed over rounds
    rounds: jax.Array  # [b] rounds the sequence took part in


def _emit(state_out, count, done, tokens, valid, dcfg, stream=None):
    """Appends tokens [b, m] (those with valid [b, m]) one at a time with the plain loop's stopping rules, and
    streams them (stream(step, tokens [b], active [b]) as the plain loop does)."""
    rows = jnp.arange(tokens.shape[0])
    for i in range(tokens.shape[1]):
        active = ~done & valid[:, i]
        if stream is not None:
            jax.debug.callback(stream, jnp.max(count), tokens[:, i], active, ordered=True)
        state_out = state_out.at[rows, count].set(jnp.where(active, tokens[:, i], state_out[rows, count]))
        count = count + active.astype(jnp.int32)
        done = done | (active & finished(tokens[:, i], state_out, count, dcfg))
    return state_out, count, done


def start(config: ModelConfig, params: dict, tokens: jax.Array, lengths: jax.Array, *, dcfg, k: int,
          max_len: int, stream=None) -> SpecState:
    """Prefill: the main model over the prompts (tokens: [b, L] right-padded, lengths[i] > k), greedy's first
    token, then every draft level over positions 0..L-1 and the first k drafts."""
    b, L = tokens.shape
    depths = config.mtp.num_layers
    mtp_pattern = config.mtp.pattern

    # Prefill: the main model over the prompts, then every draft level over positions 0..L-1.
    hidden, main = extend(config, params, tokens, init_cache(config, b, max_len), lengths, fresh=True)
    pending = _greedy(config, params, take_rows(hidden, lengths - 1, 1)[:, 0])
    known = jnp.concatenate([tokens, jnp.zeros((b, k + 1), jnp.int32)], axis=1)
    known = known.at[jnp.arange(b), lengths].set(pending)  # tokens 0..n, then drafts as they come
    drafts, levels, carry, below = [], [], [], hidden
    for j in range(k):
        depth = min(j, depths - 1)
        level_tokens = jax.lax.dynamic_slice_in_dim(known, j + 1, L, axis=1)  # token t + j + 1 at position t
        cache = init_cache(config, b, max_len, pattern=mtp_pattern)
        out, cache = _mtp_extend(config, params, depth, below, level_tokens, cache, lengths - j, fresh=True)
        if j:
            # Positions n-j..n-1 read drafts and are not committed; the fresh pass treated them as padding, so
            # recompute them exactly from the committed state (all_steps: outputs exact, nothing committed).
            tail, _ = _mtp_extend(config, params, depth, take_rows(below, lengths - j, j),
                                  take_rows(known, lengths + 1, j), cache, jnp.full((b,), j), all_steps=True)
            out = _put_rows(out, lengths - j, tail)
        draft = _greedy(config, params, take_rows(out, lengths - 1, 1)[:, 0])
        known = known.at[jnp.arange(b), lengths + j + 1].set(draft)
        drafts.append(draft)
        levels.append(cache)
        carry.append(take_rows(out, lengths - j - 1, 1)[:, 0])
        below = out

    out_buf = jnp.full((b, dcfg.max_new_tokens + k + 1), dcfg.pad_id, jnp.int32)
    out_buf, count, done = _emit(out_buf, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), bool), pending[:, None],
                                 jnp.ones((b, 1), bool), dcfg, stream)
    zeros = jnp.zeros((b,), jnp.int32)
    return SpecState(main, tuple(levels), tuple(carry), pending, jnp.stack(drafts, axis=1), out_buf, count, done,
                     zeros, zeros)


def step(config: ModelConfig, params: dict, s: SpecState, *, dcfg, k: int, stream=None) -> SpecState:
    """One round: verify the drafts, commit the accepted prefix and greedy's next token, draft k more."""
    b = s.pending.shape[0]
    depths = config.mtp.num_layers
    # 1. Verify [pending, d_1..d_k] in one forward, keeping every intermediate Mamba state.
    verify = jnp.concatenate([s.pending[:, None], s.drafts], axis=1)  # [b, k + 1]
    hidden, main = extend(config, params, verify, s.main, jnp.ones_like(s.pending), all_steps=True)
    target = _greedy(config, params, hidden)  # [b, k + 1]: greedy's token after each verified one
    agree = jnp.cumprod((s.drafts == target[:, :k]).astype(jnp.int32), axis=1)
    a = jnp.sum(agree, axis=1)  # accepted drafts, 0..k
    bonus = take_rows(target, a, 1)[:, 0]
    main = commit_steps(main, a + 1)
    # committed tokens after position n: d_1..d_a, then the bonus; later slots take new drafts
    i = jnp.arange(k + 1)[None, :]
    new_tokens = jnp.where(i < a[:, None], s.drafts[:, jnp.minimum(i[0], k - 1)],
                           jnp.where(i == a[:, None], bonus[:, None], 0))  # [b, k + 1]
    seq = jnp.concatenate([new_tokens, jnp.zeros((b, k), jnp.int32)], axis=1)  # [b, 2k + 1]

    # 2. Re-run every draft level over its uncommitted tail plus the a + 1 new positions.
    levels, carry, drafts, below = [], [], [], hidden
    for j in range(k):
        level_hidden = below if j == 0 else jnp.concatenate([s.carry[j - 1][:, None], below], axis=1)
        level_tokens = seq[:, :k + 1 + j]
        # all_steps: the tail past the a + 1 committed positions reads drafts; its outputs must be exact
        out, cache = _mtp_extend(config, params, min(j, depths - 1), level_hidden, level_tokens, s.levels[j],
                                 a + 1, all_steps=True)
        cache = commit_steps(cache, a + 1)
        draft = _greedy(config, params, take_rows(out, a + j, 1)[:, 0])
        seq = seq.at[jnp.arange(b), a + j + 1].set(draft)
        levels.append(cache)
        carry.append(take_rows(out, a, 1)[:, 0])
        drafts.append(draft)
        below = out

    active = ~s.done
    out_buf, count, done = _emit(s.out, s.count, s.done, new_tokens, i <= a[:, None], dcfg, stream)
    return SpecState(main, tuple(levels), tuple(carry), bonus, jnp.stack(drafts, axis=1), out_buf, count,
                     done, s.accepted + jnp.where(active, a, 0), s.rounds + active.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("config", "dcfg", "k", "max_len", "stream"),
                   compiler_options=DECODE_COMPILER_OPTIONS)
def speculative_loop(config: ModelConfig, params: dict, tokens: jax.Array, lengths: jax.Array, *, dcfg, k: int,
                     max_len: int, stream=None) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """tokens: [b, L] right-padded prompts (lengths[i] > k) -> (new tokens [b, max_new], counts [b],
    accepted drafts [b], rounds [b])."""
    state = start(config, params, tokens, lengths, dcfg=dcfg, k=k, max_len=max_len, stream=stream)
    round_ = functools.partial(step, config, params, dcfg=dcfg, k=k, stream=stream)
    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), round_, state)
    return final.out[:, :dcfg.max_new_tokens], final.count, final.accepted, final.rounds


def generate_speculative(model, tokens: np.ndarray, lengths: np.ndarray, dcfg, *, draft: int, stream=None):
    """Host side of `generate(..., speculative=k)`: checks the request, runs the loop, reports acceptance."""
    config = model.config
    if config.mtp is None:
        raise ValueError("speculative: this model has no MTP head (config.mtp is None)")
    if not isinstance(draft, int) or draft < 1:
        raise ValueError(f"speculative={draft!r} is invalid: must be a positive number of draft tokens")
    if not dcfg.sampling.greedy or dcfg.sampling.repetition_penalty != 1.0:
        raise ValueError("speculative decoding is greedy only: temperature must be 0 and repetition_penalty 1")
    if dcfg.budget is not None:
        raise ValueError("speculative decoding does not apply a thinking budget; drop thinking_budget")
    if int(lengths.min()) <= draft:
        raise ValueError(f"speculative={draft} needs every prompt longer than {draft} tokens; the shortest has "
                         f"{int(lengths.min())}")
    max_len = tokens.shape[1] + dcfg.max_new_tokens + 2 * draft + 2
    out, count, accepted, rounds = speculative_loop(config, model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                                    dcfg=dcfg, k=draft, max_len=max_len, stream=stream)
    jax.effects_barrier()
    accepted, rounds = np.asarray(accepted), np.asarray(rounds)
    stats = {"draft_tokens": float(draft), "rounds": float(rounds.sum()),
             "acceptance_rate": float(accepted.sum() / max(draft * rounds.sum(), 1)),
             # the first token of each sequence comes from the prefill, not from a round
             "tokens_per_round": float((np.asarray(count) - 1).clip(0).sum() / max(rounds.sum(), 1))}
    return np.asarray(out), np.asarray(count), stats
