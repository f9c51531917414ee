"""Stop sequences checked inside a jitted generation loop.

`StopSequences` is static (hashable) data; `ends_with_stop` compares the tail of each row's token buffer with every
stop sequence at once, as one gather and one comparison over [b, S, M] (S sequences, M the longest), so the loop
body has a fixed shape whatever the rows' lengths.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class StopSequences:
    """Token-id sequences that end generation, e.g. `StopSequences([[2], [1733, 1229]])`.

    sequences: any sequence of non-empty sequences of non-negative ints; stored as a tuple of tuples, so the value is
    hashable and can be a static jit argument. An empty collection is allowed and never matches.
    """

    sequences: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        seqs = self.sequences
        if isinstance(seqs, str | bytes) or not isinstance(seqs, Sequence):
            raise ValueError(f"sequences={seqs!r} is invalid: must be a sequence of token-id sequences")
        out = []
        for i, seq in enumerate(seqs):
            if isinstance(seq, str | bytes) or not isinstance(seq, Sequence | np.ndarray):
                raise ValueError(f"sequences[{i}]={seq!r} is invalid: must be a sequence of token ids")
            if len(seq) == 0:
                raise ValueError(f"sequences[{i}]={seq!r} is invalid: must be non-empty")
            ids = []
            for t in seq:
                if isinstance(t, bool) or not isinstance(t, int | np.integer) or t < 0:
                    raise ValueError(f"sequences[{i}]={tuple(seq)!r} is invalid: token ids must be ints >= 0")
                ids.append(int(t))
            out.append(tuple(ids))
        object.__setattr__(self, "sequences", tuple(out))

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def max_len(self) -> int:
        """M, the length of the longest sequence (0 when there are none)."""
        return max((len(s) for s in self.sequences), default=0)

    def as_array(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [S, M] int32 right-padded with -1, lengths [S] int32), as numpy constants."""
        S, M = len(self.sequences), self.max_len
        ids = np.full((S, M), -1, np.int32)
        for i, seq in enumerate(self.sequences):
            ids[i, : len(seq)] = seq
        lengths = np.array([len(s) for s in self.sequences], np.int32)
        return ids, lengths


def ends_with_stop(buffer: jax.Array, count: jax.Array, stops: StopSequences) -> jax.Array:
    """[b] bool: whether the first `count[i]` tokens of `buffer[i]` end with any of `stops`.

    buffer: [b, T] int tokens; entries at or after count[i] are ignored (stale or padding). count: [b] int, expected in
    [0, T]; a stop sequence longer than count[i] never matches, and positions outside the buffer never match.
    stops: static.
    """
    buffer = jnp.asarray(buffer)
    count = jnp.asarray(count)
    b, T = buffer.shape
    if len(stops) == 0:
        return jnp.zeros((b,), bool)
    ids, lengths = stops.as_array()  # [S, M], [S]
    M = ids.shape[1]
    # Token j of sequence s sits at position count - len_s + j of the row.
    pos = count[:, None, None] - lengths[None, :, None] + jnp.arange(M)[None, None, :]  # [b, S, M]
    in_seq = np.arange(M)[None, :] < lengths[:, None]  # [S, M]
    in_buf = (pos >= 0) & (pos < T)
    tok = jnp.take_along_axis(buffer, jnp.clip(pos, 0, T - 1).reshape(b, -1), axis=1).reshape(pos.shape)
    match = jnp.where(in_seq[None], in_buf & (tok == ids[None]), True)  # [b, S, M]
    return jnp.any(jnp.all(match, axis=-1), axis=-1)
