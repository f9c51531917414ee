"""`DataConfig`: the frozen, validated description of a training corpus or synthetic task.

The config is checked when it is built (kinds, fractions, sizes); checks that touch the file system (paths exist,
the corpus is not empty) happen when a dataset is built from it, in `nemojax.data.sources`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

KINDS = ("stdlib", "text", "jsonl", "mqar")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to cut it into train and validation.

    Attributes:
      kind: "stdlib" (the Python standard library's own `.py` files, always available), "text" (plain text
        files or directories of them, one document per file), "jsonl" (JSON lines, one document per line, the
        string in `text_field`) or "mqar" (synthetic multi-query associative recall, generated from the seed).
      paths: files or directories for "text" and "jsonl" (ignored by "stdlib" and "mqar"). A single string is
        taken as a one-element tuple.
      val_paths: optional explicit validation files or directories; when given, `paths` is all training data
        and the hash split is not used.
      text_field: the JSON key holding a document's text ("jsonl").
      file_glob: which files to take from a directory, relative to it; None means "**/*" for "text" and
        "**/*.jsonl" for "jsonl". Hidden files and folders (a name starting with ".") are skipped.
      tokenizer: "byte" for the built-in byte-level tokenizer, or the path of a Hugging Face `tokenizer.json`
        (or of a folder holding one).
      val_fraction: share of documents that go to validation, chosen by a stable hash of each document's
        name (its path relative to the corpus root, plus the line number for JSON lines). In [0, 1).
      stdlib_include_tests: whether "stdlib" also takes the standard library's own test suites (`test/`,
        `tests/`, `idle_test/`): about 1,800 files and 31 MB with them, 730 files and 12 MB without.
      pack_streams: the training stream packs this many independent document streams and takes rows from
        them in turn, so one batch mixes many documents even when one document fills hundreds of rows.
      read_threads: threads that read and tokenize documents ahead of packing, per stream.
      mqar_vocab_size: MQAR vocabulary: 0 is the filler, keys are 1 .. V//2 - 1, values V//2 .. V - 1.
      mqar_num_kv_pairs: key-value pairs in each example's context.
      mqar_num_queries: keys queried after the context (distinct keys); None queries every key.
      mqar_power_a: exponent of the power law that places queries (Zoology's `power_a`: small values put
        queries close to the context more often); 1.0 places them uniformly.
      mqar_num_val_examples: size of the fixed MQAR validation set.
    """

    kind: str = "stdlib"
    paths: tuple[str, ...] = ()
    val_paths: tuple[str, ...] = ()
    text_field: str = "text"
    file_glob: str | None = None
    tokenizer: str = "byte"
    val_fraction: float = 0.05
    stdlib_include_tests: bool = True
    pack_streams: int = 16
    read_threads: int = 1
    mqar_vocab_size: int = 8192
    mqar_num_kv_pairs: int = 8
    mqar_num_queries: int | None = None
    mqar_power_a: float = 0.01
    mqar_num_val_examples: int = 1024

    def __post_init__(self) -> None:
        for name in ("paths", "val_paths"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            elif not isinstance(value, Sequence):
                raise ValueError(f"DataConfig.{name}={value!r} must be a path or a sequence of paths")
            object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.kind not in KINDS:
            raise ValueError(f"DataConfig.kind={self.kind!r} is not one of {KINDS}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction={self.val_fraction!r} must be in [0, 1)")
        if not self.text_field:
            raise ValueError("DataConfig.text_field must be a non-empty JSON key")
        if not self.tokenizer:
            raise ValueError('DataConfig.tokenizer must be "byte" or the path of a tokenizer.json')
        _positive(self, "pack_streams")
        if self.read_threads < 0:
            raise ValueError(f"DataConfig.read_threads={self.read_threads} must be >= 0")
        _positive(self, "mqar_num_kv_pairs")
        _positive(self, "mqar_num_val_examples")
        if self.mqar_num_queries is not None:
            _positive(self, "mqar_num_queries")
        if not self.mqar_power_a > 0:
            raise ValueError(f"DataConfig.mqar_power_a={self.mqar_power_a} must be > 0")
        if self.kind == "mqar":
            # The vocabulary and query counts are checked together with seq_len by `MQARSpec`.
            _positive(self, "mqar_vocab_size")


def _positive(cfg: DataConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"DataConfig.{name}={value!r} must be a positive integer")
