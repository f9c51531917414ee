"""What every decode loop shares: its static `DecodeConfig` and the per-token stopping rule.

Both loops use it: the plain one (`nemojax.infer.generate.decode_loop`) and self-speculative decoding
(`nemojax.infer.speculative`), so a sequence stops at the same token whichever loop produced it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nemojax.infer import budget as budget_lib
from nemojax.infer.sampling import SamplingConfig
from nemojax.infer.stopping import StopSequences, ends_with_stop


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Everything static about one decode loop (a jit cache key)."""

    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    stops: StopSequences = StopSequences(())
    budget: budget_lib.ThinkingBudget | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} is invalid: must be a positive int")


def finished(token: jax.Array, out: jax.Array, count: jax.Array, dcfg: DecodeConfig) -> jax.Array:
    """token: [b] just emitted, out: [b, max_new] tokens so far, count: [b] their lengths -> [b] bool: the
    sequence ended on EOS or a stop sequence, or reached max_new_tokens."""
    done = count >= dcfg.max_new_tokens
    if dcfg.eos_ids:
        done |= jnp.isin(token, jnp.asarray(dcfg.eos_ids, jnp.int32))
    if len(dcfg.stops):
        done |= ends_with_stop(out, count, dcfg.stops)
    return done
