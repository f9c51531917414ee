"""Experiment config files: Python files with a `get_config()` returning an ml_collections ConfigDict, plus dotted
command-line overrides (`--config.train.steps=200`).

A config is named by a path ("configs/tiny.py", "runs/x/my.py") or by the bare name of a shipped config ("tiny",
"tiny.py"). `resolve` looks in the working directory first, then in the configs shipped with the package (the
repository's top-level configs/, which a wheel installs as `nemojax/configs/`), so `nemojax train --config tiny`
works from any directory after a plain `pip install`."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections


def packaged_dir() -> Path:
    """The shipped configs: `nemojax/configs/` in an installed wheel, else the source checkout's `configs/`."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def resolve(name: str | Path) -> Path:
    """The config file that `name` means: `name` (or `name`.py) relative to the working directory if it exists,
    else the shipped config of that name, with a leading "configs/" dropped ("configs/tiny.py", "tiny.py" and
    "tiny" all find the shipped tiny.py). Raises ValueError naming every place it looked."""
    path = Path(name)
    suffixes = [""] if path.suffix == ".py" else ["", ".py"]
    tried = [Path(f"{path}{suffix}") for suffix in suffixes]
    if not path.is_absolute():
        relative = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
        tried += [packaged_dir() / f"{relative}{suffix}" for suffix in suffixes]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c if c.is_absolute() else Path.cwd() / c) for c in tried)
    raise ValueError(f"--config {name} does not exist: looked for {looked}")


def load(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the config file `path` names (see `resolve`), then applies `key.path=value`
    overrides (values parsed as Python literals when they are one, else kept as strings; the field's existing type
    must accept them)."""
    path = resolve(path)
    spec = importlib.util.spec_from_file_location(f"nemojax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"--config {path} has no get_config() function")
    config = module.get_config()
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is invalid: expected key.path=value")
        set_path(config, key, _parse(text))
    return config


def _parse(text: str) -> object:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        return {"true": True, "false": False, "none": None}.get(lowered, text)


def set_path(config: ml_collections.ConfigDict, key: str, value: object) -> None:
    """config[a][b][c] = value for key "a.b.c"; unknown keys are an error naming the key."""
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate(parents):
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise ValueError(f"config field {'.'.join(parents[:i])!r} is not a group; cannot set {key!r}")
        if name not in node:
            raise ValueError(f"config has no field {'.'.join(parents[:i + 1])!r} (override {key!r})")
        node = node[name]
    if isinstance(node, ml_collections.ConfigDict):
        # `overrides` and `runtime` groups are free-form (the model's fields, checked when it is built); every other
        # group has a fixed set of fields.
        if leaf not in node and parents[-1:] not in (["overrides"], ["runtime"]):
            raise ValueError(f"config has no field {key!r}")
        current = node.get(leaf)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            node[leaf] = value
        except TypeError as error:
            raise ValueError(f"override {key}={value!r}: {error}") from error
    elif isinstance(node, dict):
        node[leaf] = value
    else:
        raise ValueError(f"config field {'.'.join(parents)!r} is not a group; cannot set {key!r}")

