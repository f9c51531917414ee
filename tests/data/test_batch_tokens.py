"""One batch type for every method that takes data: the data pipeline's own dict batches.

importance and calibrate read their "tokens" (and still take bare [B, L] token arrays); distill, QAD, QAT and
fine-tuning read tokens, targets and loss mask. Anything else is a ValueError that says what is allowed.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

import nemojax
from nemojax import compress, data, quant
from nemojax.compress.distill import finetune
from nemojax.data.batch_tokens import batch_tokens


@pytest.fixture(scope="module")
def model():
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*-", runtime={"dtype": "float32"})
    return nemojax.Model.init(config, 0)


@pytest.fixture(scope="module")
def batches():
    """Two batches exactly as the pipeline yields them ({"tokens", "targets", "loss_mask", ...} [2, 32])."""
    stream = data.make_dataset(data.DataConfig(kind="stdlib"), "train", seq_len=32, batch_size=2, seed=0)
    out = list(itertools.islice(stream, 2))
    assert {"tokens", "targets", "loss_mask"} <= set(out[0])
    return out


def test_batch_tokens_reads_the_dict_or_the_array(batches):
    tokens = np.asarray(batches[0]["tokens"])
    np.testing.assert_array_equal(batch_tokens(batches[0], "x"), tokens)
    np.testing.assert_array_equal(batch_tokens(tokens, "x"), tokens)
    np.testing.assert_array_equal(batch_tokens([[1, 2], [3, 4]], "x"), [[1, 2], [3, 4]])


@pytest.mark.parametrize("bad, named", [
    ({"input_ids": np.zeros((2, 4), np.int32)}, "keys \\['input_ids'\\], no 'tokens'"),
    (np.zeros((2, 4), np.float32), "shape \\[2, 4\\] and dtype float32"),
    (np.zeros(8, np.int32), "shape \\[8\\] and dtype int32"),
    ("def f(x):", "batch='def f\\(x\\):' is invalid"),
    ([[1, 2], [3]], "not an array"),
])
def test_bad_batches_name_what_is_allowed(bad, named):
    with pytest.raises(ValueError, match=f"importance: .*{named}.*allowed: the data pipeline's dict batch"):
        batch_tokens(bad, "importance")


def test_importance_and_calibrate_take_the_pipeline_dicts(model, batches):
    """Scores and amaxes from the dict batches equal those from their token arrays; a bad batch is a ValueError
    naming what is allowed (it was a bare numpy error)."""
    tokens = [np.asarray(b["tokens"]) for b in batches]
    from_dicts, from_tokens = compress.importance(model, batches), compress.importance(model, tokens)
    assert from_dicts.keys() == from_tokens.keys()
    for key in from_dicts.keys():
        np.testing.assert_array_equal(from_dicts[key], from_tokens[key], err_msg=key)
    with pytest.raises(ValueError, match="allowed: the data pipeline's dict batch"):
        compress.importance(model, [{"ids": tokens[0]}])

    student = quant.apply(model, "nvfp4")
    a, b = quant.calibrate(student, batches), quant.calibrate(student, tokens)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="calibrate: .*allowed: the data pipeline's dict batch"):
        quant.calibrate(student, [tokens[0].astype(np.float32)])


def test_training_methods_take_the_pipeline_dicts(model, batches, capsys):
    """distill, qad, qat and finetune each run a step on the pipeline's dicts (the loss of that step is a finite
    positive number), and the QAD progress bar is labelled "qad", not "distill"."""
    small = compress.prune(model, compress.importance(model, batches[:1]), hidden=48)
    _, history = compress.distill(small, teacher=model, data=batches, steps=1)
    assert np.isfinite(history[0]["kl"]) and history[0]["kl"] >= 0
    _, history = finetune(model, batches, 1)
    assert np.isfinite(history[0]["loss"]) and history[0]["loss"] > 0
    student = quant.calibrate(quant.apply(model, "nvfp4"), batches)
    capsys.readouterr()
    _, history = quant.qad(student, teacher=model, data=batches, steps=1, progress=True)
    bar = capsys.readouterr().err
    assert np.isfinite(history[0]["kl"])
    _, history = quant.qat(student, data=batches, steps=1)
    assert np.isfinite(history[0]["loss"]) and history[0]["loss"] > 0
    assert "qad" in bar and "distill" not in bar, bar
