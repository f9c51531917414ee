"""Corpus statistics: the unigram entropy a language model has to beat.

A model that ignores context and predicts each token from corpus frequencies alone reaches, at best, the
unigram entropy of the targets; a validation loss (mean cross-entropy in nats) well below it shows the model
uses context. Everything here is in nats (natural log), the unit of `optax.softmax_cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import ArrayLike

from nemojax.data.config import DataConfig
from nemojax.data.sources import documents
from nemojax.data.tokenizers import encode_array, load_tokenizer


def token_counts(tokens: ArrayLike | Iterable[ArrayLike]) -> np.ndarray:
    """Occurrences of each id, `[max_id + 1]` int64, from one array of ids (any shape) or an iterable of them."""
    chunks = [tokens] if isinstance(tokens, np.ndarray) else tokens
    counts = np.zeros(0, np.int64)
    for chunk in chunks:
        ids = np.asarray(chunk).reshape(-1)
        if ids.size == 0:
            continue
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
            raise ValueError("tokens must be non-negative integer ids")
        c = np.bincount(ids.astype(np.int64))
        if c.shape[0] > counts.shape[0]:
            counts = np.pad(counts, (0, c.shape[0] - counts.shape[0]))
        counts[: c.shape[0]] += c
    return counts


def entropy_from_counts(counts: ArrayLike) -> float:
    """Entropy in nats of the distribution `counts / counts.sum()`."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError("no tokens to compute an entropy from")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def unigram_entropy(tokens: ArrayLike | Iterable[ArrayLike]) -> float:
    """Unigram entropy in nats per token of the given ids (one array, or an iterable of arrays such as documents).

    Example: `unigram_entropy(b["targets"][b["loss_mask"] > 0] for b in itertools.islice(val_iter, 100))`.
    """
    return entropy_from_counts(token_counts(tokens))


def corpus_unigram_entropy(cfg: DataConfig, split: str = "validation", max_documents: int | None = None) -> float:
    """Unigram entropy (nats per token) of the targets the pipeline scores for a text corpus split.

    Counts each document's ids plus its EOS (exactly the targets under `loss_mask`), for the first
    `max_documents` documents in corpus order (all when None).
    """
    if cfg.kind == "mqar":
        raise ValueError("DataConfig.kind='mqar' has no corpus; its unigram entropy is not meaningful")
    tokenizer = load_tokenizer(cfg.tokenizer)
    docs = documents(cfg, split)
    n = len(docs) if max_documents is None else min(len(docs), max_documents)
    eos = np.array([tokenizer.eos_id], np.int32)
    return unigram_entropy(np.concatenate([encode_array(tokenizer, docs[i]), eos]) for i in range(n))
