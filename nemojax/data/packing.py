"""Packing documents into fixed-length rows, interleaving packed streams, and batching with padding.

Layout of one packed row (every array has length `seq_len`):

  tokens       int32    input ids
  targets      int32    the next token of the same document
  loss_mask    float32  1.0 where `targets` is a real token, 0.0 on padding
  segment_ids  int32    1, 2, ... for the documents (or pieces of documents) in the row, 0 on padding
  positions    int32    0, 1, ... within each segment, restarting at every segment

Each document becomes `[BOS] + ids + [EOS]`; its inputs are that minus the last id and its targets that minus
the first, so targets are shifted within the document only: the model learns to predict the first token after
BOS and to end with EOS, and no target ever crosses into the next document (nothing needs masking but padding).
Rows are cut by concatenate-then-split (grain's `ConcatThenSplitIterDataset`): no token is dropped, a document
longer than the room left continues at the start of the next row as a new segment whose positions start at 0
again (each row is an independent context).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from nemojax.data.tokenizers import Tokenizer, encode_array

Example = dict[str, np.ndarray]
ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def document_example(ids: np.ndarray, bos_id: int, eos_id: int) -> Example:
    """`ids: [n]` -> `{"tokens": [n + 1], "targets": [n + 1]}` for `[BOS] + ids + [EOS]` shifted by one."""
    seq = np.empty(ids.shape[0] + 2, dtype=np.int32)
    seq[0] = bos_id
    seq[1:-1] = ids
    seq[-1] = eos_id
    return {"tokens": seq[:-1], "targets": seq[1:]}


class TokenizeDocument:
    """Grain map: a document's text -> `document_example` of its ids under `tokenizer`."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> Example:
        return document_example(encode_array(self.tokenizer, text), self.tokenizer.bos_id, self.tokenizer.eos_id)


class FinishRow:
    """Grain map: grain's packed features -> the five row arrays, with `pad_id` in padded slots."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, packed: Example) -> Example:
        segment_ids = packed["tokens_segment_ids"].astype(np.int32)
        real = segment_ids > 0
        return {
            "tokens": np.where(real, packed["tokens"], self.pad_id).astype(np.int32),
            "targets": np.where(real, packed["targets"], self.pad_id).astype(np.int32),
            "loss_mask": real.astype(np.float32),
            "segment_ids": segment_ids,
            "positions": np.where(real, packed["tokens_positions"], 0).astype(np.int32),
        }


def pack_documents(examples: grain.IterDataset, seq_len: int, pad_id: int) -> grain.IterDataset:
    """Packs a stream of `document_example`s into rows of `seq_len` (see the module docstring)."""
    packed = grain.experimental.ConcatThenSplitIterDataset(
        examples, length_struct={"tokens": seq_len, "targets": seq_len}
    )
    return _JsonSafeConcatThenSplit(packed).map(FinishRow(pad_id))


class _JsonSafeConcatThenSplit(grain.IterDataset):
    """Passes `ConcatThenSplitIterDataset` through, making its state survive a JSON round trip.

    grain 0.2.18 compares the state's `remainder_slices` with the tuple `(-1, -1)`; after JSON (which is how
    `grain.checkpoint` and Orbax store it) they are lists, the comparison fails and a restored stream would
    re-emit a finished document. Turning them back into tuples on `set_state` fixes that.
    """

    def __init__(self, parent: grain.IterDataset) -> None:
        super().__init__(parent)

    def __iter__(self) -> _JsonSafeIterator:
        return _JsonSafeIterator(iter(self._parent))


class _JsonSafeIterator(grain.DatasetIterator):
    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state({**state, "remainder_slices": slices})


def padding_row(seq_len: int, pad_id: int) -> Example:
    """A row with nothing in it: pad ids, zero mask, segment 0."""
    return {
        "tokens": np.full(seq_len, pad_id, np.int32),
        "targets": np.full(seq_len, pad_id, np.int32),
        "loss_mask": np.zeros(seq_len, np.float32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
    }


def stack_and_pad(rows: Sequence[Example], *, batch_size: int, pad_id: int) -> Example:
    """Grain `batch_fn`: stacks rows to `[batch_size, seq_len]`, adding `padding_row`s when there are fewer."""
    rows = list(rows)
    if len(rows) < batch_size:
        rows += [padding_row(rows[0]["tokens"].shape[0], pad_id)] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def batch_rows(rows: grain.IterDataset, batch_size: int, pad_id: int, *, drop_remainder: bool) -> grain.IterDataset:
    """Rows -> batches `{key: [batch_size, seq_len]}`; a short last batch is padded unless dropped."""
    fn: Callable[[Sequence[Example]], Example] = lambda rs: stack_and_pad(rs, batch_size=batch_size, pad_id=pad_id)
    return rows.batch(batch_size, drop_remainder=drop_remainder, batch_fn=fn)


class RoundRobinIterDataset(grain.IterDataset):
    """Takes one element from each parent in turn: `p0[0], p1[0], ..., pK-1[0], p0[1], ...`.

    No threads (so nothing to shut down); the state is the index of the next parent and every parent's state.
    Stops when the parent whose turn it is runs out (meant for infinite training streams).
    """

    def __init__(self, parents: Sequence[grain.IterDataset]) -> None:
        if not parents:
            raise ValueError("RoundRobinIterDataset needs at least one parent")
        super().__init__(list(parents))

    def __iter__(self) -> _RoundRobinIterator:
        return _RoundRobinIterator([iter(p) for p in self._parents])

    def __str__(self) -> str:
        return f"RoundRobinIterDataset(streams={len(self._parents)})"


class _RoundRobinIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator]) -> None:
        super().__init__(parents)
        self._turn = 0

    def __next__(self) -> Any:
        element = next(self._parents[self._turn])
        self._turn = (self._turn + 1) % len(self._parents)
        return element

    def get_state(self) -> dict[str, Any]:
        return {"turn": self._turn, "streams": [p.get_state() for p in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self._parents):
            raise ValueError(
                f"iterator state has {len(state['streams'])} streams but this pipeline has {len(self._parents)}"
                " (DataConfig.pack_streams changed?)"
            )
        self._turn = int(state["turn"])
        for p, s in zip(self._parents, state["streams"], strict=True):
            p.set_state(s)
