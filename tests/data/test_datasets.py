"""The pipeline: seeded shuffling, process sharding, exact resumption (get_state/set_state and Orbax), errors."""

import dataclasses
import itertools
import json

import numpy as np
import pytest

from nemojax.data import DataConfig, build_dataset, documents, make_dataset, train_bpe, vocab_size
from tests.data.corpus import documents_in, rows, write_corpus

SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root, n=40)
    return DataConfig(kind="text", paths=(str(root),), val_fraction=0.25, pack_streams=1)


def doc_order(cfg, seed, n_batches, **kw):
    kw = {"process_index": 0, "process_count": 1, **kw}
    it = make_dataset(cfg, "train", seq_len=SEQ, batch_size=kw.pop("batch_size", 4), seed=seed, **kw)
    return documents_in(rows(itertools.islice(it, n_batches)))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_shuffle_deterministic_by_seed_and_reshuffled_each_epoch(corpus):
    train = documents(corpus, "train")
    all_train = sorted(train[i].encode() for i in range(len(train)))
    n = len(all_train)
    a, b, c = doc_order(corpus, 0, 60), doc_order(corpus, 0, 60), doc_order(corpus, 1, 60)
    assert len(a) > 2 * n
    assert a == b
    assert a[:n] != c[:n]
    assert sorted(a[:n]) == all_train == sorted(c[:n])  # an epoch is a permutation of the training documents
    assert sorted(a[n : 2 * n]) == all_train and a[n : 2 * n] != a[:n]  # the next epoch, in another order
    assert a[:n] != [train[i].encode() for i in range(n)]  # actually shuffled


def test_process_shards_deal_out_the_single_process_stream(corpus):
    whole = doc_order(corpus, 7, 80, batch_size=4)
    for p in range(2):
        it = make_dataset(corpus, "train", seq_len=SEQ, batch_size=4, seed=7, process_index=p, process_count=2)
        first = next(it)
        assert first["tokens"].shape == (2, SEQ)  # global batch 4 over 2 processes
        shard = documents_in(rows(itertools.chain([first], itertools.islice(it, 59))))
        n = min(len(shard), len(whole[p::2]))
        assert n > 20
        assert shard[:n] == whole[p::2][:n]


def test_validation_shards_are_disjoint_and_cover(corpus):
    docs = documents(corpus, "validation")
    expected = sorted(docs[i].encode() for i in range(len(docs)))
    shards = [
        documents_in(
            rows(make_dataset(corpus, "validation", seq_len=SEQ, batch_size=4, process_index=p, process_count=2))
        )
        for p in range(2)
    ]
    assert shards[0] and shards[1]
    assert sorted(shards[0] + shards[1]) == expected
    assert not set(shards[0]) & set(shards[1]) - {b""}  # only empty documents can repeat


def resume_case(cfg, seed, **kw):
    """Three batches, the state, three more; then a fresh iterator restored from the (JSON) state."""
    it = make_dataset(
        cfg, "train", seq_len=kw.get("seq_len", 64), batch_size=4, seed=seed, process_index=0, process_count=1
    )
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    after = [next(it) for _ in range(3)]
    fresh = make_dataset(
        cfg, "train", seq_len=kw.get("seq_len", 64), batch_size=4, seed=seed, process_index=0, process_count=1
    )
    fresh.set_state(state)
    return after, [next(fresh) for _ in range(3)]


@pytest.mark.parametrize("streams", [1, 4])
def test_state_restore_gives_identical_next_batches(corpus, streams):
    after, resumed = resume_case(dataclasses.replace(corpus, pack_streams=streams), seed=11)
    assert_batches_equal(after, resumed)
    # and a restored iterator is not merely at the start
    start = make_dataset(corpus, "train", seq_len=64, batch_size=4, seed=11, process_index=0, process_count=1)
    assert not np.array_equal(next(start)["tokens"], after[0]["tokens"])


def test_state_restore_stdlib_default():
    after, resumed = resume_case(DataConfig(), seed=0, seq_len=128)
    assert_batches_equal(after, resumed)


def test_orbax_round_trip(tmp_path):
    import grain
    import orbax.checkpoint as ocp

    cfg = DataConfig(pack_streams=16)
    kw = dict(seq_len=64, batch_size=4, seed=2, process_index=0, process_count=1)
    it = make_dataset(cfg, "train", **kw)
    for _ in range(3):  # 12 of the 16 streams started: the state holds both kinds of stream state
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = [next(it) for _ in range(2)]

    fresh = make_dataset(cfg, "train", **kw)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.latest_step() == 3
        mgr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(expected, [next(fresh) for _ in range(2)])


def test_bpe_pipeline(corpus, tmp_path):
    docs = documents(corpus, "train")
    tok = train_bpe((docs[i] for i in range(len(docs))), vocab_size=300, out_path=tmp_path / "tokenizer.json")
    cfg = dataclasses.replace(corpus, tokenizer=str(tmp_path / "tokenizer.json"))
    assert vocab_size(cfg) == tok.vocab_size
    batches = list(make_dataset(cfg, "validation", seq_len=SEQ, batch_size=2, process_index=0, process_count=1))
    stream = np.concatenate([b["targets"][b["loss_mask"] > 0] for b in batches])
    pieces = np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]
    val = documents(cfg, "validation")
    assert [tok.decode(p) for p in pieces] == [val[i] for i in range(len(val))]
    assert all(b["tokens"].max() < tok.vocab_size for b in batches)


def test_entry_point_errors(corpus):
    kw = dict(seq_len=SEQ, batch_size=4, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="split='val'"):
        make_dataset(corpus, "val", **kw)
    with pytest.raises(ValueError, match="batch_size=3 .* process_count=2"):
        make_dataset(corpus, "train", seq_len=SEQ, batch_size=3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="process_index=2"):
        make_dataset(corpus, "train", seq_len=SEQ, batch_size=4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seq_len=0"):
        make_dataset(corpus, "train", **{**kw, "seq_len": 0})
    with pytest.raises(ValueError, match="DataConfig.tokenizer"):
        make_dataset(dataclasses.replace(corpus, tokenizer="/no/such/tokenizer.json"), "train", **kw)
    with pytest.raises(ValueError, match="DataConfig.paths"):
        build_dataset(DataConfig(kind="jsonl", paths=("/no/such/file.jsonl",)), "train", **kw)


def test_default_process_is_jax():
    import jax

    it = make_dataset(DataConfig(), "train", seq_len=16, batch_size=2 * jax.process_count())
    assert next(it)["tokens"].shape == (2, 16)
