"""Multi-query associative recall (MQAR), the synthetic recall task of Zoology (Arora et al., 2023).

One example of length `seq_len` (the model's input length), in Zoology's layout:

  tokens:   k1 v1 k2 v2 ... kN vN | 0 0 kq 0 0 0 kq' 0 ...       (the context, then queries at random slots)
  targets:  the answer v_q at every query key's position (the value paired with that key in the context);
            elsewhere the next input token (those positions carry no loss)
  loss_mask: 1.0 exactly at the query keys' positions

Token ids: 0 is the filler, keys are drawn from 1 .. V//2 - 1 and values from V//2 .. V - 1, both without
replacement; `num_queries` distinct keys are queried, at even offsets after the context chosen with Zoology's
power law `p(gap) ~ a * gap**(a - 1)`. The answer does not follow its query in `tokens` (as in Zoology).
An example is a pure function of `(split, seed, index)`: train uses NumPy's generator seeded with
`[0, seed, index]`, validation `[1, index]`, so the validation set is the same for every training seed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from nemojax.data.packing import Example

_SPLIT_TAG = {"train": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class MQARSpec:
    """The shape of the MQAR task; validated against itself (a ValueError names the DataConfig field)."""

    vocab_size: int
    num_kv_pairs: int
    num_queries: int
    seq_len: int
    power_a: float = 0.01

    def __post_init__(self) -> None:
        n, q, v = self.num_kv_pairs, self.num_queries, self.vocab_size
        if n < 1 or q < 1:
            raise ValueError(f"DataConfig.mqar_num_kv_pairs={n} and mqar_num_queries={q} must be positive")
        if self.num_keys < n or self.num_values < n:
            raise ValueError(
                f"DataConfig.mqar_vocab_size={v} leaves {self.num_keys} keys and {self.num_values} values, fewer than"
                f" mqar_num_kv_pairs={n}; need mqar_vocab_size >= {2 * n + 2}"
            )
        if q > n:
            raise ValueError(f"DataConfig.mqar_num_queries={q} must not exceed mqar_num_kv_pairs={n}")
        if self.num_slots < q:
            raise ValueError(
                f"seq_len={self.seq_len} leaves {self.num_slots} query slots after a context of {2 * n} tokens,"
                f" fewer than mqar_num_queries={q}; need seq_len >= {2 * n + 2 * q}"
            )
        if not self.power_a > 0:
            raise ValueError(f"DataConfig.mqar_power_a={self.power_a} must be > 0")

    @property
    def first_value(self) -> int:
        """Keys are `1 .. first_value - 1`, values `first_value .. vocab_size - 1`."""
        return self.vocab_size // 2

    @property
    def num_keys(self) -> int:
        return self.first_value - 1

    @property
    def num_values(self) -> int:
        return self.vocab_size - self.first_value

    @property
    def context_len(self) -> int:
        return 2 * self.num_kv_pairs

    @property
    def num_slots(self) -> int:
        """Places a query can go: even offsets after the context that leave room for the answer."""
        return (self.seq_len - self.context_len) // 2


def mqar_example(spec: MQARSpec, index: int, *, seed: int, split: str = "train") -> Example:
    """Example number `index` of a split: `tokens, targets, loss_mask, segment_ids, positions`, each `[seq_len]`."""
    if split not in _SPLIT_TAG:
        raise ValueError(f"split={split!r} is not one of {tuple(_SPLIT_TAG)}")
    key = [0, seed, index] if split == "train" else [1, index]
    rng = np.random.default_rng(key)
    n, q, L = spec.num_kv_pairs, spec.num_queries, spec.seq_len
    keys = rng.choice(np.arange(1, spec.first_value), size=n, replace=False)
    values = rng.choice(np.arange(spec.first_value, spec.vocab_size), size=n, replace=False)
    a = spec.power_a
    p = a * np.arange(1, spec.num_slots + 1, dtype=np.float64) ** (a - 1)
    gaps = rng.choice(spec.num_slots, size=q, replace=False, p=p / p.sum())
    which = rng.choice(n, size=q, replace=False)

    tokens = np.zeros(L, np.int32)
    tokens[0 : 2 * n : 2] = keys
    tokens[1 : 2 * n : 2] = values
    query_pos = spec.context_len + 2 * gaps
    tokens[query_pos] = keys[which]
    targets = np.zeros(L, np.int32)
    targets[:-1] = tokens[1:]
    targets[query_pos] = values[which]
    loss_mask = np.zeros(L, np.float32)
    loss_mask[query_pos] = 1.0
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": np.ones(L, np.int32),
        "positions": np.arange(L, dtype=np.int32),
    }


class MQARExamples:
    """A grain data source: `len` examples of one split, generated on demand."""

    def __init__(self, spec: MQARSpec, *, seed: int, split: str, length: int) -> None:
        self.spec, self.seed, self.split, self.length = spec, seed, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return mqar_example(self.spec, int(index), seed=self.seed, split=self.split)

    def __repr__(self) -> str:
        return f"MQARExamples({self.spec}, seed={self.seed}, split={self.split!r}, length={self.length})"


def mqar_answer_mask(tokens: Any, *, vocab_size: int, num_kv_pairs: int) -> Any:
    """Where accuracy is measured, recovered from the inputs alone: query keys after the context.

    Args:
      tokens: `[..., seq_len]` MQAR inputs (NumPy or JAX).
    Returns:
      Boolean `[..., seq_len]`, equal to `loss_mask > 0` of the same examples.
    """
    after_context = np.arange(tokens.shape[-1]) >= 2 * num_kv_pairs
    return after_context & (tokens >= 1) & (tokens < vocab_size // 2)


def masked_accuracy(predictions: Any, targets: Any, mask: Any) -> Any:
    """Share of masked positions where `predictions == targets` (all `[..., seq_len]`; NumPy or JAX; 0 if empty)."""
    hit = (predictions == targets) * mask
    denom = mask.sum()
    return hit.sum() / (denom + (denom == 0))
