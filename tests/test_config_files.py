"""Experiment config files and dotted command-line overrides."""

from __future__ import annotations

import textwrap
from pathlib import Path

import ml_collections
import pytest

from nemojax import config_files

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"


@pytest.fixture
def typed_config(tmp_path) -> Path:
    path = tmp_path / "typed.py"
    path.write_text(textwrap.dedent("""\
        import ml_collections

        def get_config():
            c = ml_collections.ConfigDict()
            c.train = ml_collections.ConfigDict({"steps": 10, "lr": 0.5, "remat": False, "name": "base",
                                                 "shape": (2, 3), "clip": None})
            c.model = ml_collections.ConfigDict({"preset": "p", "overrides": {"vocab_size": 8}})
            return c
        """))
    return path


def test_loads_tiny_config():
    config = config_files.load(TINY)
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.model.preset == "nemotron-h-8b-tiny"
    assert config.model.overrides.vocab_size == 260
    assert config.train.steps == 20 and config.train.batch_size == 4
    assert config.optimizer.lr == 3e-3
    assert dict(config.mesh) == {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}


def test_overrides_of_each_type(typed_config):
    config = config_files.load(typed_config, [
        "train.steps=200", "train.lr=1e-3", "train.remat=True", "train.name=long_run", "train.shape=(4, 5, 6)"])
    assert config.train.steps == 200 and type(config.train.steps) is int
    assert config.train.lr == 1e-3
    assert config.train.remat is True
    assert config.train.name == "long_run"
    assert config.train.shape == (4, 5, 6)


def test_bool_and_string_spellings(typed_config):
    assert config_files.load(typed_config, ["train.remat=true"]).train.remat is True
    assert config_files.load(typed_config, ["train.remat=False"]).train.remat is False
    # a quoted literal and a bare word give the same string; a number-like quoted string stays a string
    assert config_files.load(typed_config, ["train.name='a b'"]).train.name == "a b"
    assert config_files.load(typed_config, ["train.name=x.y"]).train.name == "x.y"
    assert config_files.load(typed_config, ["train.name='12'"]).train.name == "12"


def test_override_value_may_contain_equals_sign(typed_config):
    assert config_files.load(typed_config, ["train.name=a=b"]).train.name == "a=b"


def test_int_given_to_float_field_becomes_float(typed_config):
    config = config_files.load(typed_config, ["train.lr=2"])
    assert config.train.lr == 2.0 and type(config.train.lr) is float
    tiny = config_files.load(TINY, ["optimizer.lr=1", "train.z_loss=0"])
    assert type(tiny.optimizer.lr) is float and type(tiny.train.z_loss) is float


def test_later_overrides_win(typed_config):
    assert config_files.load(typed_config, ["train.steps=1", "train.steps=2"]).train.steps == 2


def test_wrong_type_is_a_value_error_naming_the_key(typed_config):
    with pytest.raises(ValueError, match=r"train\.steps"):
        config_files.load(typed_config, ["train.steps=abc"])
    with pytest.raises(ValueError, match=r"train\.steps"):
        config_files.load(typed_config, ["train.steps=2.5"])


@pytest.mark.parametrize("override, key", [
    ("train.stepz=5", "train.stepz"), ("trian.steps=5", "trian"), ("train.deep.er=1", "train.deep")])
def test_unknown_field_names_the_key(typed_config, override, key):
    with pytest.raises(ValueError, match=f"'{key}'"):
        config_files.load(typed_config, [override])


def test_setting_below_a_scalar_is_a_value_error(typed_config):
    with pytest.raises(ValueError, match=r"train\.steps"):
        config_files.load(typed_config, ["train.steps.x=1"])
    # deeper than one level below a scalar must be the same clear error, not a TypeError from `in`
    with pytest.raises(ValueError, match=r"train\.steps"):
        config_files.load(typed_config, ["train.steps.x.y=1"])


def test_model_overrides_accept_new_keys(typed_config):
    config = config_files.load(typed_config, ["model.overrides.hidden_size=32", "model.overrides.pattern=M*",
                                              "model.overrides.vocab_size=16"])
    assert config.model.overrides.to_dict() == {"vocab_size": 16, "hidden_size": 32, "pattern": "M*"}
    tiny = config_files.load(TINY, ["model.overrides.mamba={'chunk_size': 16}", "model.runtime.moe_impl=dense",
                                    "model.runtime.remat=full"])
    assert tiny.model.overrides.mamba.chunk_size == 16 and tiny.model.overrides.vocab_size == 260
    assert tiny.model.runtime.to_dict() == {"moe_impl": "dense", "remat": "full"}
    # the free-form groups are only `overrides` and `runtime`: a new key elsewhere under model is still an error
    with pytest.raises(ValueError, match="'model.hidden_size'"):
        config_files.load(typed_config, ["model.hidden_size=32"])


def test_override_without_equals_sign(typed_config):
    with pytest.raises(ValueError, match="train.steps"):
        config_files.load(typed_config, ["train.steps"])


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        config_files.load(tmp_path / "nope.py")


def test_file_without_get_config(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("X = 1\n")
    with pytest.raises(ValueError, match="get_config"):
        config_files.load(path)


def test_loading_twice_gives_independent_configs():
    a = config_files.load(TINY, ["train.steps=3"])
    b = config_files.load(TINY)
    assert a.train.steps == 3 and b.train.steps == 20


def test_shipped_configs_are_the_checkouts_configs_folder():
    assert config_files.packaged_dir() == ROOT / "configs"


@pytest.mark.parametrize("name", ["tiny", "tiny.py", "configs/tiny.py", "configs/tiny"])
def test_names_resolve_to_the_shipped_config_outside_a_checkout(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert config_files.resolve(name) == TINY
    assert config_files.load(name).model.preset == "nemotron-h-8b-tiny"


def test_working_directory_wins_over_the_shipped_config(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.py").write_text(
        "import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict({'mine': 1})\n")
    monkeypatch.chdir(tmp_path)
    assert config_files.resolve("configs/tiny.py") == Path("configs/tiny.py")
    assert config_files.load("configs/tiny").mine == 1
    assert config_files.load("tiny").model.preset == "nemotron-h-8b-tiny"  # ./tiny.py does not exist: shipped one


def test_unknown_name_lists_every_place_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="does not exist") as error:
        config_files.resolve("configs/nope")
    message = str(error.value)
    for looked in [tmp_path / "configs" / "nope", tmp_path / "configs" / "nope.py", ROOT / "configs" / "nope",
                   ROOT / "configs" / "nope.py"]:
        assert str(looked) in message
    with pytest.raises(ValueError, match="does not exist"):
        config_files.resolve(tmp_path / "nope.py")  # an absolute path is only looked for where it points


def test_cli_resolves_config_names_before_running(tmp_path, monkeypatch):
    import argparse

    from nemojax import cli

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(job="demo", config="small_hybrid", compress_config="configs/minitron_small.py",
                              quant_config="nvfp4_qad.py")
    cli._resolve_configs(args)
    assert (args.config, args.compress_config, args.quant_config) == (
        str(ROOT / "configs" / "small_hybrid.py"), str(ROOT / "configs" / "minitron_small.py"),
        str(ROOT / "configs" / "nvfp4_qad.py"))
    with pytest.raises(SystemExit, match=f"nemojax train: error: --config nope does not exist: looked for "
                                         f"{tmp_path / 'nope'}, {tmp_path / 'nope.py'}"):
        cli.main(["train", "--config", "nope", "--workdir", str(tmp_path / "run")])
