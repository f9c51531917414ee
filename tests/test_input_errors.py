"""Bad inputs to generation, quantization and the data sources raise a ValueError that names the argument and what
is allowed, instead of being truncated, clamped or padded into a plausible-looking result."""

from __future__ import annotations

import copy
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.data import DataConfig, documents, make_dataset
from nemojax.data.tokenizers import ByteTokenizer
from nemojax.infer.generate import generate
from nemojax.lowp.fp8 import current_scaling, quantize_fp8
from nemojax.lowp.qarray import QArray, quantize

VOCAB = 260


@pytest.fixture(scope="module")
def model() -> nemojax.Model:
    return nemojax.Model.init(nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=VOCAB), 0)


# ------------------------------------------------------------------------------------------------- generation


class _PadOutsideVocab(ByteTokenizer):
    pad_id = 300  # a tokenizer built for a larger vocabulary than the model's


def test_pad_id_outside_the_vocabulary_is_refused(model: nemojax.Model) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.pad_id=300 is invalid: must be an int token id in \[0, "
                                         r"vocab_size=260\)"):
        generate(model, ["ab"], tokenizer=_PadOutsideVocab(), max_new_tokens=2)
    # A config that skipped its own validation (e.g. built by hand) is caught by generate too.
    config = copy.copy(model.config)
    object.__setattr__(config, "pad_token_id", VOCAB)
    unchecked = types.SimpleNamespace(config=config, params=model.params)
    with pytest.raises(ValueError, match=r"config\.pad_token_id=260 is invalid"):
        generate(unchecked, [[1, 2]], max_new_tokens=2)


def test_empty_stop_string_is_refused(model: nemojax.Model) -> None:
    with pytest.raises(ValueError, match="stop holds an empty string"):
        generate(model, ["ab"], tokenizer=ByteTokenizer(), max_new_tokens=2, stop=["x", ""])
    # A bare string would be iterated as one stop string per character.
    with pytest.raises(ValueError, match=r"stop='ab' is invalid: must be a list .*stop=\['ab'\]"):
        generate(model, ["ab"], tokenizer=ByteTokenizer(), max_new_tokens=2, stop="ab")


@pytest.mark.parametrize("prompts, match", [
    ([[1.7, 2.0]], r"prompts\[0\] holds \[1\.7, 2\.0\]: token ids must be ints"),
    ([[1, 2.0]], r"prompts\[0\] holds \[2\.0\]: token ids must be ints"),
    (np.array([[1.7, 2.0]]), r"prompts\[0\] is a float64 array of shape \(2,\): must be 1-D integer token ids"),
    ([[True, 2]], r"prompts\[0\] holds \[True\]"),
    ([[[1, 2]], [[3]]], r"prompts\[0\] holds \[\[1, 2\]\]"),
    ([1, 2, 3], r"prompts\[0\]=1 is invalid: must be a sequence of int token ids"),
    (np.array([1, 2, 3]), r"prompts is an array of shape \(3,\): must be \[b, L\] token ids"),
    ([[1, 2], "ab"], "prompts mixes strings and token ids"),
    ([], "prompts is empty"),
    ([[1, 2], []], r"prompts\[1\] is empty"),
    ([[1, -1]], r"prompts\[0\] has token ids \[-1\] outside the vocabulary \[0, 260\)"),
    ([[1, VOCAB]], r"prompts\[0\] has token ids \[260\] outside the vocabulary \[0, 260\)"),
])
def test_bad_prompts_are_refused(model: nemojax.Model, prompts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, r"max_new_tokens=-1 is invalid: must be a positive int"),
    ({"max_new_tokens": 0}, r"max_new_tokens=0 is invalid"),
    ({"max_new_tokens": True}, r"max_new_tokens=True is invalid"),
    ({"seed": -1}, r"seed=-1 is invalid: must be an int in \[0, 2\*\*63\)"),
    ({"seed": 1.5}, r"seed=1\.5 is invalid"),
    ({"seed": True}, r"seed=True is invalid"),
    ({"temperature": -0.5}, r"temperature=-0\.5 is invalid: must be >= 0"),
    ({"temperature": float("nan")}, r"temperature=nan is invalid"),
    ({"top_p": 0.0}, r"top_p=0\.0 is invalid: must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1\.5 is invalid: must be in \(0, 1\]"),
    ({"top_k": -1}, r"top_k=-1 is invalid: must be an int >= 0"),
    ({"eos_ids": [VOCAB]}, r"eos_ids\[0\]=260 is invalid: must be an int token id in \[0, vocab_size=260\)"),
    ({"eos_ids": [1.0]}, r"eos_ids\[0\]=1\.0 is invalid"),
    ({"eos_ids": 2}, r"eos_ids=2 is invalid: must be a list of int token ids"),
    ({"stop": [[1, VOCAB]]}, r"stop\[0\] has token ids \[260\] outside the vocabulary"),
    ({"prompt_open": [True, False]}, r"prompt_open=\[True, False\] is invalid: must be 1 bools, one per prompt"),
    ({"speculative": -1}, r"speculative=-1 is invalid: must be an int >= 0"),
])
def test_bad_generation_arguments_are_refused(model: nemojax.Model, kwargs: dict, match: str) -> None:
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(model, [[1, 2, 3]], **kwargs)


def test_integer_arrays_and_numpy_ints_are_accepted(model: nemojax.Model) -> None:
    """The checks refuse floats, not integer containers: a [b, L] int array, numpy ints and a numpy seed give the
    same tokens as plain lists."""
    ref = generate(model, [[1, 2, 3], [4, 5, 6]], max_new_tokens=2, eos_ids=[]).tokens
    assert generate(model, np.array([[1, 2, 3], [4, 5, 6]], np.int32), max_new_tokens=2, eos_ids=[]).tokens == ref
    ids = [[np.int64(1), np.int64(2), np.int64(3)], np.array([4, 5, 6])]
    assert generate(model, ids, max_new_tokens=2, eos_ids=np.array([], np.int32), seed=np.int64(0)).tokens == ref


# ------------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4", "mxfp8"])
def test_quantize_refuses_an_empty_array(fmt: str) -> None:
    with pytest.raises(ValueError, match=r"x has shape \(0, 32\) with no elements; allowed: at least one element"):
        quantize(jnp.zeros((0, 32)), fmt)
    with pytest.raises(ValueError, match="with no elements"):  # a given amax used to let it through
        quantize(jnp.zeros((0, 32)), "fp8_e4m3", amax=1.0)


def test_per_tensor_fp8_refuses_an_empty_array_and_a_bad_host_scale() -> None:
    """current_scaling used to fail with numpy's "zero-size array to reduction operation" and quantize_fp8 returned
    an empty QArray; a zero or non-finite scale turned every code into 0 or nan."""
    with pytest.raises(ValueError, match=r"x has shape \(0, 4\) with no elements"):
        current_scaling(jnp.zeros((0, 4)))
    with pytest.raises(ValueError, match="with no elements"):
        quantize_fp8(jnp.zeros((0, 4)), 1.0)
    for scale in (0.0, float("inf"), np.float32("nan")):
        with pytest.raises(ValueError, match=r"scale=.* is invalid; allowed: finite values > 0"):
            quantize_fp8(jnp.ones((2, 4)), scale)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_quantize_refuses_integer_and_bool_arrays(dtype) -> None:
    with pytest.raises(ValueError, match="allowed: a floating dtype"):
        quantize(jnp.ones((4, 32), dtype), "nvfp4")
    # The per-tensor FP8 path builds the QArray directly: its dtype field is checked there.
    with pytest.raises(ValueError, match=r"dtype='(int32|bool)' is invalid; allowed: the name of a floating dtype"):
        quantize_fp8(jnp.ones((4, 32), dtype), jnp.float32(1.0))


@pytest.mark.parametrize("amax", [float("inf"), float("nan"), -1.0, np.float32("nan"), np.array([1.0, np.inf])])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
def test_quantize_refuses_a_non_finite_or_negative_static_amax(fmt: str, amax) -> None:
    with pytest.raises(ValueError, match=r"amax=.* is invalid; allowed: finite values >= 0"):
        quantize(jnp.ones((2, 4, 32)), fmt, amax=amax)


def test_quantize_still_traces_with_a_traced_amax() -> None:
    """The amax check reads host values only: under jit (a tracer) it is skipped and the result equals the eager
    one with the same Python amax."""
    x = jax.random.normal(jax.random.key(0), (4, 32))
    eager = quantize(x, "nvfp4", amax=3.0).dequantize()
    traced = jax.jit(lambda x, a: quantize(x, "nvfp4", amax=a).dequantize())(x, jnp.float32(3.0))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager))


def test_qarray_refuses_bad_static_fields() -> None:
    data, scale = jnp.zeros((2, 16), jnp.float8_e4m3fn), jnp.ones((), jnp.float32)
    with pytest.raises(ValueError, match="fmt='fp9' is not a known quantization format"):
        QArray(data, scale, None, "fp9", 1, "float32")
    with pytest.raises(ValueError, match="axis=-1 is invalid; allowed: a non-negative int"):
        QArray(data, scale, None, "nvfp4", -1, "float32")
    with pytest.raises(ValueError, match="dtype='int8' is invalid"):
        QArray(data, scale, None, "fp8_e4m3", 1, "int8")
    assert QArray(data, scale, None, "fp8_e4m3", 1, "bfloat16").dequantize().dtype == jnp.bfloat16


# ----------------------------------------------------------------------------------------------------- data


def test_a_folder_of_empty_files_is_refused(tmp_path) -> None:
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    cfg = DataConfig(kind="text", paths=(str(tmp_path),), val_fraction=0.0)
    with pytest.raises(ValueError, match=r"the 'train' split of DataConfig\.paths=.* has 3 documents and every one "
                                         r"is empty .*check DataConfig\.paths"):
        documents(cfg, "train")
    with pytest.raises(ValueError, match="every one is empty"):
        make_dataset(cfg, "train", seq_len=16, batch_size=2, process_index=0, process_count=1)
    (tmp_path / "d.txt").write_text("x")  # one document with text is enough
    assert len(documents(cfg, "train")) == 4


def test_a_validation_folder_of_empty_files_is_refused(tmp_path) -> None:
    (tmp_path / "train.txt").write_text("some text")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.txt").write_text("")
    cfg = DataConfig(kind="text", paths=(str(tmp_path / "train.txt"),), val_paths=(str(tmp_path / "val"),))
    assert len(documents(cfg, "train")) == 1
    with pytest.raises(ValueError, match=r"the 'validation' split of DataConfig\.val_paths=.* every one is empty"):
        documents(cfg, "validation")


def test_jsonl_with_only_empty_texts_is_refused(tmp_path) -> None:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    cfg = DataConfig(kind="jsonl", paths=(str(tmp_path / "d.jsonl"),), val_fraction=0.0)
    with pytest.raises(ValueError, match=r"has 5 documents and every one is empty \(each text_field='text' is ''"):
        documents(cfg, "train")


def test_every_configured_eos_id_ends_generation(model: nemojax.Model) -> None:
    """With eos_token_id a list, the second id ends a sequence too (it used to be dropped at load)."""
    free = generate(model, [[5, 6, 7]], max_new_tokens=4)
    first = int(free.tokens[0][0])
    other = (first + 1) % VOCAB
    stopped = generate(nemojax.Model(model.config.replace(eos_token_id=[other, first]), model.params), [[5, 6, 7]],
                       max_new_tokens=4)
    assert list(stopped.tokens[0]) == [first] and stopped.finish_reason[0] == "eos", stopped
