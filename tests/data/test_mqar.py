"""MQAR: answers are the values paired with the queried keys, the mask is exactly the answers, determinism."""

import itertools

import numpy as np
import pytest

from nemojax.data import DataConfig, MQARSpec, make_dataset, masked_accuracy, mqar_answer_mask, mqar_example, mqar_spec

SPEC = MQARSpec(vocab_size=64, num_kv_pairs=6, num_queries=4, seq_len=48)


def check_example(spec, ex):
    tok, tgt, mask = ex["tokens"], ex["targets"], ex["loss_mask"]
    n, L = spec.num_kv_pairs, spec.seq_len
    assert all(ex[k].shape == (L,) for k in ex)
    keys, values = tok[0 : 2 * n : 2], tok[1 : 2 * n : 2]
    assert ((keys >= 1) & (keys < spec.first_value)).all() and len(set(keys.tolist())) == n
    assert ((values >= spec.first_value) & (values < spec.vocab_size)).all() and len(set(values.tolist())) == n
    pairs = dict(zip(keys.tolist(), values.tolist(), strict=True))
    answers = np.flatnonzero(mask)
    assert answers.size == spec.num_queries and set(mask.tolist()) <= {0.0, 1.0}
    assert (answers >= 2 * n).all()
    queried = tok[answers].tolist()
    assert len(set(queried)) == spec.num_queries  # distinct keys
    assert tgt[answers].tolist() == [pairs[k] for k in queried]  # the value paired with each queried key
    # outside the context only the query keys are non-filler, and the mask covers exactly those
    rest = np.arange(L) >= 2 * n
    assert set(np.flatnonzero(rest & (tok != 0)).tolist()) == set(answers.tolist())
    np.testing.assert_array_equal(mqar_answer_mask(tok, vocab_size=spec.vocab_size, num_kv_pairs=n), mask > 0)
    # away from the answers, targets are the next input
    others = np.setdiff1d(np.arange(L - 1), answers)
    np.testing.assert_array_equal(tgt[others], tok[others + 1])
    np.testing.assert_array_equal(ex["segment_ids"], np.ones(L))
    np.testing.assert_array_equal(ex["positions"], np.arange(L))


@pytest.mark.parametrize("index", range(20))
def test_examples_are_correct(index):
    check_example(SPEC, mqar_example(SPEC, index, seed=0))


def test_deterministic_given_seed_and_index():
    a = mqar_example(SPEC, 3, seed=1)
    b = mqar_example(SPEC, 3, seed=1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["tokens"], mqar_example(SPEC, 3, seed=2)["tokens"])
    assert not np.array_equal(a["tokens"], mqar_example(SPEC, 4, seed=1)["tokens"])
    # validation does not depend on the seed, and differs from training
    v1 = mqar_example(SPEC, 3, seed=1, split="validation")
    np.testing.assert_array_equal(v1["tokens"], mqar_example(SPEC, 3, seed=9, split="validation")["tokens"])
    assert not np.array_equal(v1["tokens"], a["tokens"])


def test_power_law_puts_queries_near_the_context():
    spec = MQARSpec(vocab_size=256, num_kv_pairs=4, num_queries=1, seq_len=208)
    first = [int(np.flatnonzero(mqar_example(spec, i, seed=0)["loss_mask"])[0]) for i in range(200)]
    slots = (np.array(first) - 8) // 2  # 100 slots
    assert np.median(slots) < 25  # power_a=0.01 favours early slots; uniform would give ~50
    uniform = MQARSpec(vocab_size=256, num_kv_pairs=4, num_queries=1, seq_len=208, power_a=1.0)
    u = [int(np.flatnonzero(mqar_example(uniform, i, seed=0)["loss_mask"])[0]) for i in range(200)]
    assert 35 < np.median((np.array(u) - 8) // 2) < 65


def test_pipeline_batches_and_sharding():
    cfg = DataConfig(kind="mqar", mqar_vocab_size=64, mqar_num_kv_pairs=6, mqar_num_queries=4)
    spec = mqar_spec(cfg, 48)
    assert spec == SPEC
    for p in range(2):
        it = make_dataset(cfg, "train", seq_len=48, batch_size=4, seed=5, process_index=p, process_count=2)
        batches = list(itertools.islice(it, 2))
        assert batches[0]["tokens"].shape == (2, 48)
        # process p gets examples p, p + 2, p + 4, ... of the global stream
        for r, index in enumerate(range(p, 8, 2)):
            ex = mqar_example(SPEC, index, seed=5)
            for k in ex:
                np.testing.assert_array_equal(batches[r // 2][k][r % 2], ex[k])


def test_validation_is_finite_and_padded():
    cfg = DataConfig(kind="mqar", mqar_vocab_size=64, mqar_num_kv_pairs=6, mqar_num_val_examples=10)
    batches = list(make_dataset(cfg, "validation", seq_len=48, batch_size=4, process_index=0, process_count=1))
    assert len(batches) == 3 and batches[-1]["tokens"].shape == (4, 48)
    per_row = np.concatenate([b["loss_mask"].sum(axis=1) for b in batches])
    np.testing.assert_array_equal(per_row, [6] * 10 + [0, 0])


def test_masked_accuracy():
    ex = mqar_example(SPEC, 0, seed=0)
    mask = ex["loss_mask"]
    assert masked_accuracy(ex["targets"], ex["targets"], mask) == 1.0
    assert masked_accuracy(np.zeros_like(ex["targets"]), ex["targets"], mask) == 0.0
    half = ex["targets"].copy()
    half[np.flatnonzero(mask)[:2]] = 0
    assert masked_accuracy(half, ex["targets"], mask) == 0.5
    assert masked_accuracy(half, ex["targets"], np.zeros_like(mask)) == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=10, num_kv_pairs=6, num_queries=2, seq_len=64), "mqar_vocab_size=10"),
        (dict(vocab_size=64, num_kv_pairs=4, num_queries=5, seq_len=64), "mqar_num_queries=5"),
        (dict(vocab_size=64, num_kv_pairs=8, num_queries=8, seq_len=30), "seq_len=30"),
    ],
)
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQARSpec(**kwargs)
