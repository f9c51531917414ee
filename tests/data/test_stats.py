"""Unigram entropy, in nats per token."""

import math

import numpy as np
import pytest

from nemojax.data import DataConfig, corpus_unigram_entropy, documents, token_counts, unigram_entropy
from tests.data.corpus import EOS, write_corpus


def test_known_entropies():
    assert unigram_entropy(np.array([3, 3, 7, 7])) == pytest.approx(math.log(2))
    assert unigram_entropy(np.arange(8).reshape(2, 4)) == pytest.approx(math.log(8))
    assert unigram_entropy(np.array([5, 5, 5])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert unigram_entropy([np.array([0, 0]), [1], np.array([2])]) == pytest.approx(-(p * np.log(p)).sum())
    np.testing.assert_array_equal(token_counts([np.array([2, 0]), np.array([2])]), [1, 0, 2])


def test_bad_tokens():
    with pytest.raises(ValueError, match="no tokens"):
        unigram_entropy(np.array([], np.int32))
    with pytest.raises(ValueError, match="non-negative"):
        unigram_entropy(np.array([-1, 2]))


def test_corpus_entropy_matches_counting_by_hand(tmp_path):
    write_corpus(tmp_path, n=30)
    cfg = DataConfig(kind="text", paths=(str(tmp_path),), val_fraction=0.3)
    val = documents(cfg, "validation")
    counts = np.zeros(259)
    for i in range(len(val)):
        for b in val[i].encode("utf-8"):
            counts[b] += 1
        counts[EOS] += 1
    p = counts[counts > 0] / counts.sum()
    assert corpus_unigram_entropy(cfg) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="mqar"):
        corpus_unigram_entropy(DataConfig(kind="mqar"))


def test_stdlib_byte_entropy_is_plausible():
    h = corpus_unigram_entropy(DataConfig(), "validation")
    assert 2.5 < h < 4.5  # Python source under bytes: ~3.3 nats, far below log(256) = 5.5
