"""Document sources: the Python standard library, plain text files, JSON lines; and the stable train/validation split.

A source is a random-access sequence of documents (`len(src)`, `src[i] -> str`) that reads each document
only when asked, so building one for the whole standard library takes a directory walk, not a read of 30 MB.
Each document has a `key` (its path relative to the corpus root, plus `:line` for JSON lines); the split puts
a document in validation when the SHA-1 of its key, read as a fraction of 2**64, is below `val_fraction`, so
the split depends on nothing but the names and is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from nemojax.data.config import DataConfig

SPLITS = ("train", "validation")
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def check_split(split: str) -> str:
    """Returns `split` when it is "train" or "validation"; a ValueError otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}")
    return split


def is_validation(key: str, val_fraction: float) -> bool:
    """Whether the document named `key` belongs to the validation split (stable: SHA-1 of the key)."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2.0**64


def stdlib_root() -> Path:
    """The folder of the running Python's standard library (`sysconfig.get_paths()["stdlib"]`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(include_tests: bool = True) -> list[tuple[str, Path]]:
    """The standard library's `.py` files as sorted `(key, path)` pairs, key = posix path relative to the root.

    `site-packages`, `dist-packages` and `__pycache__` are never entered (they are not the standard library);
    the test suites (`test/`, `tests/`, `idle_test/`) are taken when `include_tests`.
    """
    root = stdlib_root()
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        skip = _STDLIB_SKIP_DIRS if include_tests else _STDLIB_SKIP_DIRS | STDLIB_TEST_DIRS
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                out.append((path.relative_to(root).as_posix(), path))
    out.sort()
    return out


class FileDocuments(Sequence[str]):
    """Whole files as documents, read lazily and decoded as UTF-8 (invalid bytes become U+FFFD)."""

    def __init__(self, keys: Sequence[str], paths: Sequence[Path]) -> None:
        self.keys = list(keys)
        self._paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        with open(self._paths[index], "rb") as f:
            return f.read().decode("utf-8", errors="replace")

    def has_text(self, index: int) -> bool:
        """Whether document `index` is not empty (a stat, no read)."""
        return os.path.getsize(self._paths[index]) > 0

    def __repr__(self) -> str:
        return f"FileDocuments({len(self)} files)"


class JsonlDocuments(Sequence[str]):
    """JSON lines as documents: each record is `(path, byte offset, byte length)`, parsed when read."""

    def __init__(self, keys: Sequence[str], records: Sequence[tuple[str, int, int]], text_field: str) -> None:
        self.keys = list(keys)
        self._records = list(records)
        self.text_field = text_field

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        path, offset, length = self._records[index]
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.read(length)
        where = self.keys[index]
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"DataConfig.paths: {where} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
            raise ValueError(f"DataConfig.text_field={self.text_field!r}: {where} has no string field of that name")
        return record[self.text_field]

    def has_text(self, index: int) -> bool:
        """Whether document `index` has a non-empty `text_field` (parses that line)."""
        return self[index] != ""

    def __repr__(self) -> str:
        return f"JsonlDocuments({len(self)} lines, text_field={self.text_field!r})"


def _list_files(entries: Sequence[str], pattern: str, field: str) -> list[tuple[str, Path]]:
    """`(key, path)` for every file named by `entries` (files, or folders searched with `pattern`)."""
    out: list[tuple[str, Path]] = []
    for entry in entries:
        root = Path(entry).expanduser()
        if root.is_file():
            out.append((root.name, root))
        elif root.is_dir():
            found = []
            for p in root.glob(pattern):
                rel = p.relative_to(root)
                if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.append((rel.as_posix(), p))
            out.extend(sorted(found))
        else:
            raise ValueError(f"DataConfig.{field}: {entry!r} does not exist")
    return out


def _jsonl_lines(files: Sequence[tuple[str, Path]]) -> tuple[list[str], list[tuple[str, int, int]]]:
    """Keys `file:line` and records for every non-blank line of the given JSON-lines files."""
    keys: list[str] = []
    records: list[tuple[str, int, int]] = []
    for key, path in files:
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    keys.append(f"{key}:{lineno}")
                    records.append((str(path), offset, len(line)))
                offset += len(line)
    return keys, records


def documents(cfg: DataConfig, split: str) -> FileDocuments | JsonlDocuments:
    """The documents of one split of the corpus `cfg` describes ("stdlib", "text" or "jsonl").

    Raises:
      ValueError: naming the field, for a missing path, a corpus or split without documents, a split whose
        documents are all empty (zero-byte files, or empty `text_field` strings), or a JSON-lines corpus whose
        first record has no string `text_field`.
    """
    check_split(split)
    if cfg.kind == "mqar":
        raise ValueError("DataConfig.kind='mqar' is synthetic and has no documents")
    if cfg.kind == "stdlib":
        files = stdlib_files(cfg.stdlib_include_tests)
        field = "kind"
        hashed = True
    else:
        if not cfg.paths:
            raise ValueError(f"DataConfig.paths is empty; kind={cfg.kind!r} needs files or folders")
        pattern = cfg.file_glob or ("**/*.jsonl" if cfg.kind == "jsonl" else "**/*")
        hashed = not cfg.val_paths
        field = "paths" if hashed or split == "train" else "val_paths"
        files = _list_files(getattr(cfg, field), pattern, field)

    if cfg.kind == "jsonl":
        keys, records = _jsonl_lines(files)
    else:
        keys, records = [k for k, _ in files], [p for _, p in files]
    total = len(keys)
    if hashed:
        want_val = split == "validation"
        keep = [i for i, k in enumerate(keys) if is_validation(k, cfg.val_fraction) == want_val]
        keys = [keys[i] for i in keep]
        records = [records[i] for i in keep]
    where = "the standard library" if cfg.kind == "stdlib" else f"DataConfig.{field}={getattr(cfg, field)!r}"
    if not keys:
        detail = f"{total} documents in all, val_fraction={cfg.val_fraction}" if hashed else "no documents"
        raise ValueError(f"the {split!r} split of {where} is empty ({detail}); check DataConfig.{field}")

    if cfg.kind == "jsonl":
        docs: FileDocuments | JsonlDocuments = JsonlDocuments(keys, records, cfg.text_field)  # type: ignore[arg-type]
        _ = docs[0]  # fail now, naming text_field, rather than inside the pipeline
    else:
        docs = FileDocuments(keys, records)  # type: ignore[arg-type]
    # Empty documents pack to BOS/EOS and padding only: a split made of nothing else would train or score on no
    # text at all. The scan stops at the first non-empty document, so a normal corpus pays one stat or parse.
    if not any(docs.has_text(i) for i in range(len(docs))):
        detail = f"each text_field={cfg.text_field!r} is ''" if cfg.kind == "jsonl" else "zero-byte files"
        raise ValueError(f"the {split!r} split of {where} has {len(docs)} documents and every one is empty "
                         f"({detail}: no text to train on); check DataConfig.{field}")
    return docs
