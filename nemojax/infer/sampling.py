"""Next-token sampling with Hugging Face's logits processing, pure and jit-friendly.

`process_logits` applies, in transformers' order and with its exact semantics,

    repetition penalty (RepetitionPenaltyLogitsProcessor) -> temperature (TemperatureLogitsWarper)
    -> top-k (TopKLogitsWarper) -> top-p (TopPLogitsWarper)

and `sample` draws from the result (argmax when `temperature == 0`). Removed tokens get `-inf`. The config is a
frozen, hashable dataclass meant to be a static jit argument; every step function takes batch-shaped arrays.

Which token ids a row has "seen" (for the repetition penalty) is a `[b, V]` bool mask, built from the prompts with
`seen_from_prompts` and extended after every step with `mark_seen`, so no growing token history is needed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _number(name: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} is invalid: must be {allowed}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Hashable: pass it as a static argument to `jax.jit`.

    temperature:        0 means greedy (argmax after the repetition penalty); > 0 divides the logits.
    top_k:              keep the tokens whose logit is >= the k-th largest (ties kept); 0 turns it off.
    top_p:              nucleus sampling, in (0, 1]; 1 turns it off.
    repetition_penalty: > 0; 1 turns it off. Seen tokens' logits are divided by it when >= 0, multiplied when < 0.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        temperature = _number("temperature", self.temperature, "a finite float >= 0 (0 means greedy)")
        if temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} is invalid: must be >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} is invalid: must be an int >= 0 (0 turns top-k off)")
        top_p = _number("top_p", self.top_p, "in (0, 1]")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p!r} is invalid: must be in (0, 1]")
        penalty = _number("repetition_penalty", self.repetition_penalty, "a finite float > 0 (1 turns it off)")
        if penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} is invalid: must be > 0 (1 turns it off)")
        # Store plain floats so that SamplingConfig(1) and SamplingConfig(1.0) are the same static argument.
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "repetition_penalty", penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: jax.Array, seen: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Processed next-token logits, Hugging Face order and semantics; removed tokens are `-inf`.

    logits: [b, V] (computed in float32); seen: [b, V] bool, the token ids the repetition penalty applies to.
    Returns [b, V] float32. With `cfg.temperature == 0` only the repetition penalty is applied.
    """
    if logits.ndim != 2 or seen.shape != logits.shape:
        raise ValueError(f"logits {logits.shape} and seen {seen.shape} must both be [b, V]")
    x = logits.astype(jnp.float32)
    V = x.shape[-1]

    if cfg.repetition_penalty != 1.0:
        p = cfg.repetition_penalty
        x = jnp.where(seen, jnp.where(x < 0, x * p, x / p), x)
    if cfg.greedy:
        return x

    if cfg.temperature != 1.0:
        x = x / cfg.temperature

    if 0 < cfg.top_k < V:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]  # [b, 1], the k-th largest logit
        x = jnp.where(x < kth, -jnp.inf, x)

    if cfg.top_p < 1.0:
        # Ascending stable sort (torch's CPU sort order for ties), cumulative probability from the smallest logit;
        # drop every token whose cumulative probability is <= 1 - top_p, but never the largest one.
        order = jnp.argsort(x, axis=-1, stable=True)  # [b, V]
        cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(x, order, axis=-1), axis=-1), axis=-1)
        remove_sorted = (cum <= 1.0 - cfg.top_p).at[:, -1].set(False)
        rows = jnp.arange(x.shape[0])[:, None]
        remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
        x = jnp.where(remove, -jnp.inf, x)
    return x


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32, exactly: the first index of the maximum, a NaN counting as the maximum.

    Two vectorisable reductions (the max, then the lowest index holding it) instead of one (value, index) reduce,
    which XLA:CPU runs as a scalar loop: 140 us against 13 us over a 32k vocabulary, per decode step.
    """
    peak = jnp.max(x, axis=-1, keepdims=True)  # NaN if any entry is NaN, and then the first NaN wins
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where((x == peak) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


def sample(logits: jax.Array, seen: jax.Array, cfg: SamplingConfig, key: jax.Array) -> jax.Array:
    """Next tokens [b] int32 from logits [b, V] and seen [b, V] bool.

    Greedy (`cfg.temperature == 0`): argmax of the penalised logits (the lowest id among ties); `key` is unused.
    Otherwise one categorical draw per row from `process_logits`; a single key serves the whole batch (rows are
    drawn independently).
    """
    x = process_logits(logits, seen, cfg)
    if cfg.greedy:
        return argmax(x)
    return jax.random.categorical(key, x, axis=-1).astype(jnp.int32)


def mark_seen(seen: jax.Array, tokens: jax.Array) -> jax.Array:
    """seen [b, V] bool with `seen[i, tokens[i]]` set; tokens [b] int. Ids outside [0, V) (-1 padding) are ignored."""
    b, V = seen.shape
    tokens = jnp.asarray(tokens)
    idx = jnp.where((tokens >= 0) & (tokens < V), tokens, V)  # V is out of bounds: dropped by the scatter
    return seen.at[jnp.arange(b), idx].set(True, mode="drop")


def seen_from_prompts(tokens: jax.Array, lengths: jax.Array, vocab: int) -> jax.Array:
    """[b, vocab] bool: which ids occur among the first `lengths[i]` tokens of row i.

    tokens: [b, L] int (right padding after lengths[i] is ignored); lengths: [b] int; vocab: static int.
    Ids outside [0, vocab) are ignored.
    """
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"vocab={vocab!r} is invalid: must be a positive int")
    tokens = jnp.asarray(tokens)
    b, L = tokens.shape
    valid = (jnp.arange(L)[None, :] < jnp.asarray(lengths)[:, None]) & (tokens >= 0) & (tokens < vocab)
    idx = jnp.where(valid, tokens, vocab)
    return jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], idx].set(True, mode="drop")
