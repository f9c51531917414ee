"""Document sources: the standard library corpus and its stable split, text folders, JSON lines, bad input."""

import hashlib
import json

import pytest

from nemojax.data import DataConfig, documents, is_validation, stdlib_files, stdlib_root


def test_stdlib_split_stable_disjoint_nonempty():
    cfg = DataConfig(kind="stdlib")
    train, val = documents(cfg, "train"), documents(cfg, "validation")
    assert len(train) > 500 and len(val) > 10
    assert set(train.keys).isdisjoint(val.keys)
    everything = [k for k, _ in stdlib_files(include_tests=True)]
    assert sorted(train.keys + val.keys) == everything
    assert 0.02 < len(val) / len(everything) < 0.10  # val_fraction 0.05
    # stable: built again, the same split in the same order
    assert documents(DataConfig(kind="stdlib"), "validation").keys == val.keys
    # the rule is SHA-1 of the relative path, independent of anything else
    for key in val.keys[:5] + train.keys[:5]:
        frac = int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2**64
        assert (frac < 0.05) == (key in val.keys) == is_validation(key, 0.05)
    # real source text, read lazily
    assert "import" in train[train.keys.index("os.py")]


def test_stdlib_files_layout():
    with_tests = [k for k, _ in stdlib_files(include_tests=True)]
    without = [k for k, _ in stdlib_files(include_tests=False)]
    assert "os.py" in without and "json/__init__.py" in without
    assert not any(k.startswith("site-packages/") or "/site-packages/" in k for k in with_tests)
    assert not any(p in k.split("/")[:-1] for k in without for p in ("test", "tests", "idle_test"))
    assert set(without) < set(with_tests)
    assert all((stdlib_root() / k).is_file() for k in without[:50])


def test_val_fraction_changes_the_split_monotonically():
    small = documents(DataConfig(kind="stdlib", val_fraction=0.05), "validation").keys
    large = documents(DataConfig(kind="stdlib", val_fraction=0.2), "validation").keys
    assert set(small) < set(large)


def test_text_folder_and_val_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("first")
    (tmp_path / "a" / "y.md").write_text("second")
    (tmp_path / "a" / ".hidden").write_text("skipped")
    (tmp_path / "b.txt").write_text("held out")
    cfg = DataConfig(kind="text", paths=str(tmp_path / "a"), val_paths=[str(tmp_path / "b.txt")])
    train, val = documents(cfg, "train"), documents(cfg, "validation")
    assert train.keys == ["x.txt", "y.md"] and [train[0], train[1]] == ["first", "second"]
    assert val.keys == ["b.txt"] and val[0] == "held out"
    only_txt = DataConfig(kind="text", paths=(str(tmp_path / "a"),), file_glob="*.txt", val_paths=cfg.val_paths)
    assert documents(only_txt, "train").keys == ["x.txt"]


def test_jsonl(tmp_path):
    lines = [json.dumps({"body": f"record {i} ✓", "id": i}) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines[:10]) + "\n\n  \n" + "\n".join(lines[10:]) + "\n")
    cfg = DataConfig(kind="jsonl", paths=(str(tmp_path),), text_field="body", val_fraction=0.3)
    train, val = documents(cfg, "train"), documents(cfg, "validation")
    got = sorted([train[i] for i in range(len(train))] + [val[i] for i in range(len(val))])
    assert got == sorted(f"record {i} ✓" for i in range(30))
    assert len(val) > 0 and set(train.keys).isdisjoint(val.keys)
    assert train.keys[0] == "d.jsonl:1" and "d.jsonl:13" in train.keys + val.keys  # line numbers after blanks


def test_jsonl_missing_field(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"content": "no text key"}\n')
    cfg = DataConfig(kind="jsonl", paths=(str(tmp_path / "d.jsonl"),), val_fraction=0.0)
    with pytest.raises(ValueError, match="text_field='text'"):
        documents(cfg, "train")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "parquet"}, "DataConfig.kind='parquet'"),
        ({"val_fraction": 1.0}, "DataConfig.val_fraction"),
        ({"pack_streams": 0}, "DataConfig.pack_streams"),
        ({"kind": "mqar", "mqar_num_kv_pairs": 0}, "DataConfig.mqar_num_kv_pairs"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="DataConfig.paths: .*does not exist"):
        documents(DataConfig(kind="text", paths=(str(tmp_path / "missing"),)), "train")
    with pytest.raises(ValueError, match="DataConfig.paths is empty"):
        documents(DataConfig(kind="text"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="'train' split .* is empty"):
        documents(DataConfig(kind="text", paths=(str(tmp_path / "empty"),)), "train")
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(ValueError, match="'validation' split .* is empty.*val_fraction=0.0"):
        documents(DataConfig(kind="text", paths=(str(tmp_path / "one.txt"),), val_fraction=0.0), "validation")
    with pytest.raises(ValueError, match="split='test'"):
        documents(DataConfig(), "test")
