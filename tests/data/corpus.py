"""Shared helpers for the data tests: a small on-disk text corpus and a way to read documents back out of rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nemojax.data import ByteTokenizer

EOS = ByteTokenizer.eos_id
BOS = ByteTokenizer.bos_id
PAD = ByteTokenizer.pad_id


def write_corpus(root: Path, n: int = 40) -> dict[str, str]:
    """Writes `n` text files of varied lengths (0 to ~150 bytes, some non-ASCII) under `root`; returns key -> text."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "δέλτα", "ε", "日本", "zeta", "🙂", "\n", "  "]
    texts = {}
    for i in range(n):
        body = " ".join(words[j] for j in rng.integers(0, len(words), size=int(rng.integers(0, 25))))
        key = f"sub{i % 3}/doc{i:03d}.txt"
        texts[key] = f"doc {i}: {body}" if i % 7 else ""  # some empty documents too
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(texts[key], encoding="utf-8")
    return texts


def rows(batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """Batches `{k: [B, L]}` -> rows `{k: [L]}`, in order."""
    for b in batches:
        for i in range(b["tokens"].shape[0]):
            yield {k: v[i] for k, v in b.items()}


def documents_in(row_list: Iterable[dict[str, np.ndarray]]) -> list[bytes]:
    """The complete documents whose targets (under loss_mask) run through the rows, in order, as UTF-8 bytes.

    A document's targets are its bytes then EOS, so the concatenated masked targets split at EOS; the piece
    after the last EOS is an unfinished document and is left out.
    """
    stream = np.concatenate([r["targets"][r["loss_mask"] > 0] for r in row_list])
    ends = np.flatnonzero(stream == EOS)
    out, start = [], 0
    for e in ends:
        piece = stream[start:e]
        assert (piece < 256).all(), "a special id inside a document"
        out.append(bytes(piece.astype(np.uint8)))
        start = e + 1
    return out
