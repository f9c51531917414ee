"""Prefill, then decode steps that feed given tokens: the logits of every step and the final cache, for the tests
that compare two implementations of a decode path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from nemojax.infer.cache import init_cache
from nemojax.infer.extend import decode_step, prefill


def prefill_then_decode(config: nemojax.ModelConfig, params, tokens: jax.Array, lengths: tuple[int, ...],
                        steps: int, max_len: int) -> tuple[np.ndarray, object]:
    """tokens: [b, L]; right-padded prefill of lengths[i] <= prefix tokens (the prefix is max(lengths) long), then
    `steps` decode steps feeding tokens[:, prefix + t] -> (logits [steps + 1, b, vocab] float32, cache)."""
    prefix = max(lengths)
    cache = init_cache(config, batch=tokens.shape[0], max_len=max_len)
    logits, cache = prefill(config, params, tokens[:, :prefix], jnp.array(lengths), cache)
    out = [logits]
    for t in range(prefix, prefix + steps):
        logits, cache = decode_step(config, params, tokens[:, t], cache)
        out.append(logits)
    return np.stack([np.asarray(o, np.float32) for o in out]), cache
