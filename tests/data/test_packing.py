"""Packing: rows reproduce the documents in order, targets shift within documents, positions restart per segment."""

import dataclasses
import itertools

import numpy as np
import pytest

from nemojax.data import DataConfig, build_dataset, document_example, documents, make_dataset
from tests.data.corpus import BOS, EOS, PAD, documents_in, rows, write_corpus

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, n=40)
    return DataConfig(kind="text", paths=(str(root),), val_fraction=0.4)


def test_document_example():
    ex = document_example(np.array([5, 6, 7], np.int32), bos_id=1, eos_id=2)
    np.testing.assert_array_equal(ex["tokens"], [1, 5, 6, 7])
    np.testing.assert_array_equal(ex["targets"], [5, 6, 7, 2])


def test_validation_rows_reproduce_documents_in_order(corpus):
    it = make_dataset(corpus, "validation", seq_len=SEQ, batch_size=4, process_index=0, process_count=1)
    batches = list(it)
    docs = documents(corpus, "validation")
    expected = [docs[i].encode("utf-8") for i in range(len(docs))]
    assert len(expected) >= 8
    assert documents_in(rows(batches)) == expected
    # every batch has the same shape; only the tail of the last one is padding
    assert all(b["tokens"].shape == (4, SEQ) for b in batches)
    mask = np.concatenate([b["loss_mask"].reshape(-1) for b in batches])
    n_real = int(mask.sum())
    assert n_real == sum(len(d) + 1 for d in expected)
    assert (mask[:n_real] == 1).all() and (mask[n_real:] == 0).all()


def check_row(row):
    """Invariants of one packed row; returns whether it ends exactly at a document end."""
    tok, tgt, seg, pos, mask = (row[k] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask"))
    assert tok.dtype == tgt.dtype == seg.dtype == pos.dtype == np.int32 and mask.dtype == np.float32
    real = seg > 0
    np.testing.assert_array_equal(mask, real.astype(np.float32))
    assert (tok[~real] == PAD).all() and (tgt[~real] == PAD).all() and (pos[~real] == 0).all()
    # padding only at the end, segments numbered 1, 2, ... in order
    n = int(real.sum())
    assert real[:n].all()
    assert seg[0] == 1 and (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    for s in range(1, int(seg.max()) + 1):
        idx = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[idx], np.arange(idx.size))  # positions restart at each segment
        if idx[0] > 0:
            assert tok[idx[0]] == BOS  # a segment that is not first in its row is a new document
        # within a document, targets are the inputs shifted by one
        np.testing.assert_array_equal(tgt[idx[:-1]], tok[idx[1:]])
        # BOS and EOS appear only at document boundaries
        assert (tok[idx[1:]] != BOS).all() and (tgt[idx[:-1]] != EOS).all()
    return bool(n and tgt[n - 1] == EOS)


def test_row_invariants_and_continuations(corpus):
    one_stream = dataclasses.replace(corpus, pack_streams=1)  # consecutive rows continue each other
    it = make_dataset(one_stream, "train", seq_len=SEQ, batch_size=4, seed=3, process_index=0, process_count=1)
    row_list = list(rows(itertools.islice(it, 10)))
    previous_ended = True
    starts_bos = 0
    for row in row_list:
        assert (row["tokens"][0] == BOS) == previous_ended  # a row continues a document exactly when one is open
        starts_bos += row["tokens"][0] == BOS
        previous_ended = check_row(row)
    assert 0 < starts_bos < len(row_list)  # both cases happened
    assert max(int(r["segment_ids"].max()) for r in row_list) >= 2  # several documents share a row


def test_interleaved_streams_are_the_single_stream_dealt_out(corpus):
    kw = dict(seq_len=SEQ, batch_size=4, seed=5, process_index=0, process_count=1)
    one = make_dataset(dataclasses.replace(corpus, pack_streams=1), "train", **kw)
    many = make_dataset(dataclasses.replace(corpus, pack_streams=3), "train", **kw)
    single_docs = documents_in(rows(itertools.islice(one, 40)))
    many_rows = list(rows(itertools.islice(many, 30)))
    for j in range(3):
        got = documents_in(many_rows[j::3])
        assert len(got) > 10
        assert got == single_docs[j::3][: len(got)]


def test_long_documents_split_across_rows(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    (tmp_path / "long.txt").write_text(text)
    cfg = DataConfig(kind="text", paths=(str(tmp_path),), val_paths=(str(tmp_path / "long.txt"),))
    batches = list(build_dataset(cfg, "validation", seq_len=64, batch_size=2, process_index=0, process_count=1))
    row_list = list(rows(batches))
    assert len(row_list) == 8  # 501 targets -> 8 rows, 7 full
    assert documents_in(row_list) == [text.encode()]
    assert all((r["segment_ids"] == 1).all() for r in row_list[:7])
    assert int(row_list[7]["loss_mask"].sum()) == 501 - 7 * 64
