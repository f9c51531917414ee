"""Tokenizers: the built-in byte-level one, any Hugging Face `tokenizer.json`, and byte-level BPE training.

Every tokenizer follows the `Tokenizer` protocol: `encode(str) -> list[int]` (no special tokens added),
`decode(list[int]) -> str` (special tokens dropped), and the ids `vocab_size`, `bos_id`, `eos_id`, `pad_id`.
The data pipeline adds BOS and EOS around each document itself. Special-token strings in the text stay plain
text unless `encode(text, allow_special=True)` is asked for, which is for prompts rendered from a chat template.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

# Special tokens written by `train_bpe`, and the names looked for (in this order) in other tokenizer.json files.
BPE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS = 256, EOS = 257, PAD = 258 (`vocab_size` 259)."""

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """UTF-8 bytes; `allow_special` is accepted for the protocol and ignored (no special token has text)."""
        del allow_special
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """The ids as an int32 array `[num_bytes]`, without a Python list in between (the fast path)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special ids are dropped and invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json`.

    Special-token strings inside documents are encoded as plain text (`encode_special_tokens`), so a document
    cannot inject a BOS or EOS; `encode(text, allow_special=True)` maps them to their ids instead, for a prompt
    rendered from a chat template ("<|im_start|>", "<think>", ...). BOS, EOS and PAD are found by name (`<|bos|>`,
    `<s>`, `</s>`, `<|endoftext|>`, `<pad>`, ...) unless given; a missing BOS or PAD falls back to EOS; a missing
    EOS is an error.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"DataConfig.tokenizer: {str(path)!r} is not a tokenizer.json file (or 'byte')")
        self.path = path
        self._tok = _HFTokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True
        self._special_tok = None  # a second copy that matches special tokens, made on first use
        self.eos_id = self._find("eos", eos_token, _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"DataConfig.tokenizer: {str(path)!r} has none of the EOS tokens {_EOS_NAMES}; pass eos_token"
            )
        self.bos_id = self._find("bos", bos_token, _BOS_NAMES)
        if self.bos_id is None:
            self.bos_id = self.eos_id
        self.pad_id = self._find("pad", pad_token, _PAD_NAMES)
        if self.pad_id is None:
            self.pad_id = self.eos_id

    def _find(self, what: str, token: str | None, names: Sequence[str]) -> int | None:
        if token is not None:
            idx = self._tok.token_to_id(token)
            if idx is None:
                raise ValueError(f"{what}_token={token!r} is not in {str(self.path)!r}")
            return idx
        for name in names:
            idx = self._tok.token_to_id(name)
            if idx is not None:
                return idx
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, no BOS/EOS added. allow_special: special-token strings in `text` become their ids
        (default: they are split as ordinary text)."""
        if not allow_special:
            return self._tok.encode(text, add_special_tokens=False).ids
        if self._special_tok is None:
            # A separate object rather than flipping the shared flag, so concurrent plain encodes are unaffected.
            from tokenizers import Tokenizer as _HFTokenizer

            special = _HFTokenizer.from_str(self._tok.to_str())
            special.encode_special_tokens = False
            self._special_tok = special
        return self._special_tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """`"byte"` gives `ByteTokenizer()`; anything else is the path of a tokenizer.json (or its folder)."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """`tokenizer.encode(text)` as an int32 array `[num_tokens]`."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_path: str | os.PathLike[str],
    *,
    min_frequency: int = 2,
) -> HFTokenizer:
    """Fits a byte-level BPE tokenizer (GPT-2 style pre-tokenization, all 256 bytes in the alphabet) and saves it.

    Args:
      texts: the training corpus, one string per document.
      vocab_size: the largest vocabulary wanted, special tokens included (`<|bos|>`, `<|eos|>`, `<|pad|>` get
        ids 0, 1, 2); at least 259. The result can be smaller when the corpus runs out of merges.
      out_path: where to write the `tokenizer.json` (parent folders are created).
      min_frequency: a pair must occur this often to be merged.

    Returns:
      The saved tokenizer, loaded back.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    smallest = 256 + len(BPE_SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size={vocab_size} must be at least {smallest} (256 bytes + special tokens)")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return HFTokenizer(out_path)


def train_bpe_cli(argv: Sequence[str] | None = None) -> int:
    """`nemojax tokenizer train`: fits a byte-level BPE on a corpus's training split and saves tokenizer.json.

    Args:
      argv: the arguments after `tokenizer train`, e.g.
        `["--out", "runs/tok/tokenizer.json", "--vocab-size", "4096", "--kind", "stdlib"]`.

    Returns:
      The process exit status (0).
    """
    from nemojax.data.config import DataConfig
    from nemojax.data.sources import documents

    parser = argparse.ArgumentParser(
        prog="nemojax tokenizer train", description="Fit a byte-level BPE tokenizer on a corpus's training split."
    )
    parser.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included")
    parser.add_argument("--kind", default="stdlib", choices=("stdlib", "text", "jsonl"), help="corpus kind")
    parser.add_argument("--paths", nargs="*", default=(), help="files or folders for --kind text/jsonl")
    parser.add_argument("--text-field", default="text", help="JSON key of the text (--kind jsonl)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held out of the fit, as in training")
    parser.add_argument("--max-docs", type=int, default=None, help="fit on at most this many documents")
    parser.add_argument("--min-frequency", type=int, default=2, help="smallest pair count that is merged")
    args = parser.parse_args(argv)

    cfg = DataConfig(
        kind=args.kind, paths=tuple(args.paths), text_field=args.text_field, val_fraction=args.val_fraction
    )
    docs = documents(cfg, "train")
    n = len(docs) if args.max_docs is None else min(len(docs), args.max_docs)
    tok = train_bpe((docs[i] for i in range(n)), args.vocab_size, args.out, min_frequency=args.min_frequency)
    print(json.dumps({"out": str(args.out), "vocab_size": tok.vocab_size, "documents": n}))
    return 0
