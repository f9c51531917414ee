"""Tokenizers: byte-level round trips, tokenizer.json via `train_bpe`, special tokens, the CLI entry point."""

import json

import numpy as np
import pytest

from nemojax.data import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_bpe, train_bpe_cli
from nemojax.data.tokenizers import encode_array
from tests.data.corpus import write_corpus

SAMPLES = [
    "",
    "hello world",
    "naïve café — ünïcödé",
    "日本語のテキスト",
    "emoji 🙂🚀 and\ttabs\nnewlines\r\n",
    "\x00nul",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(encode_array(tok, text), np.array(ids, np.int32))


def test_byte_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
    assert tok.decode([tok.bos_id, *b"ok", tok.eos_id, tok.pad_id]) == "ok"
    assert tok.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character decodes, replaced


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = ["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1\n", "naïve café"] * 20
    return train_bpe(texts, vocab_size=320, out_path=out, min_frequency=2), out


def test_bpe_round_trip(bpe):
    tok, path = bpe
    loaded = load_tokenizer(path)
    assert isinstance(loaded, HFTokenizer) and isinstance(loaded, Tokenizer)
    assert 259 < loaded.vocab_size <= 320
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 2)
    for text in [*SAMPLES, "the quick fox returns x + 1"]:
        ids = loaded.encode(text)
        assert loaded.decode(ids) == text
        assert ids == tok.encode(text)
    # merges were learned: a frequent phrase takes fewer tokens than bytes
    assert len(loaded.encode("the quick brown fox")) < len(b"the quick brown fox") // 2
    # the folder works as well as the file
    assert load_tokenizer(path.parent).encode("the lazy dog") == loaded.encode("the lazy dog")


def test_bpe_special_text_is_not_a_special_token(bpe):
    tok, _ = bpe
    ids = tok.encode("<|eos|> and <|bos|>")
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == "<|eos|> and <|bos|>"
    assert tok.decode([tok.bos_id, *tok.encode("fox"), tok.eos_id]) == "fox"


def test_bpe_vocab_too_small(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["abc"], vocab_size=100, out_path=tmp_path / "t.json")


def test_tokenizer_path_missing(tmp_path):
    with pytest.raises(ValueError, match="DataConfig.tokenizer"):
        load_tokenizer(tmp_path / "nope.json")


def test_tokenizer_without_eos(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    path = tmp_path / "tokenizer.json"
    HF(models.BPE()).save(str(path))
    with pytest.raises(ValueError, match="EOS"):
        HFTokenizer(path)


def test_train_bpe_cli(tmp_path, capsys):
    write_corpus(tmp_path / "corpus", n=30)
    out = tmp_path / "out" / "tokenizer.json"
    argv = ["--out", str(out), "--vocab-size", "300", "--kind", "text", "--paths", str(tmp_path / "corpus")]
    assert train_bpe_cli(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["out"] == str(out) and report["documents"] > 20
    tok = load_tokenizer(out)
    assert tok.vocab_size == report["vocab_size"] <= 300
    assert tok.decode(tok.encode("doc 7: δέλτα 🙂")) == "doc 7: δέλτα 🙂"


def test_allow_special_maps_special_strings_to_their_ids(bpe):
    """Opt-in for rendered chat prompts: special-token strings become their ids; the default stays plain text."""
    tok, path = bpe
    text = "<|bos|>the fox<|eos|><|pad|>"
    ids = tok.encode(text, allow_special=True)
    assert ids == [tok.bos_id, *tok.encode("the fox"), tok.eos_id, tok.pad_id]
    plain = tok.encode(text)
    assert plain == tok.encode(text, allow_special=False) and tok.bos_id not in plain and tok.eos_id not in plain
    assert tok.encode(text) == load_tokenizer(path).encode(text)  # the special path did not change the plain one
    assert ByteTokenizer().encode("<|bos|>", allow_special=True) == list(b"<|bos|>")
