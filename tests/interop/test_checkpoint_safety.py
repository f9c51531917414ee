"""Checkpoint folders are saved without losing anything and read without anything going silent: save_hf writes only
its own files and is crash-safe (old or new checkpoint at the path after a failure or kill at any instant), refuses
targets it must not write into, and loading names the file or tensor of every problem (truncated shard, bad JSON,
broken index, NaN/inf weights, integer tensors for float params)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import nemojax
from nemojax.interop import hf, modelopt, safetensors_file
from nemojax.interop.safetensors_file import INDEX_NAME, JOURNAL_NAME, WEIGHTS_NAME

REPO = Path(__file__).resolve().parents[2]


def _leaves(model: nemojax.Model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(model.params)]


def _same(a: nemojax.Model, b: nemojax.Model) -> bool:
    """Bit-identical params (NaN in the same places counts as equal)."""
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y, equal_nan=True)
                                      for x, y in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def old() -> nemojax.Model:
    return nemojax.Model.init(nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260), 0)


@pytest.fixture(scope="module")
def new(old) -> nemojax.Model:
    """`old` with every weight moved, so that a mix of the two checkpoints' files matches neither."""
    return nemojax.Model(old.config, jax.tree.map(lambda x: x + 1 if x.dtype.kind == "f" else x, old.params))


def _with_leaf(model: nemojax.Model, index: int, value: float) -> nemojax.Model:
    leaves, treedef = jax.tree.flatten(model.params)
    leaves[index] = leaves[index].at[(0,) * leaves[index].ndim].set(value)
    return nemojax.Model(model.config, jax.tree.unflatten(treedef, leaves))


# ------------------------------------------------------------------------------------ non-destructive save


def test_save_keeps_the_other_files_of_the_folder(tmp_path, old, new):
    """Saving back into a folder (a tokenizer, a README, a subfolder beside the weights) leaves those alone."""
    target = tmp_path / "ckpt"
    hf.save_hf(old, target)
    (target / "tokenizer.json").write_text('{"version": "1.0"}')
    (target / "notes").mkdir()
    (target / "notes" / "README.md").write_text("keep me")
    hf.save_hf(new, target)
    assert (target / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (target / "notes" / "README.md").read_text() == "keep me"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "notes", "tokenizer.json"]
    assert _same(hf.load_hf(target), new)


def test_stale_own_files_of_a_previous_save_are_removed(tmp_path, old, new):
    """Sharded -> single file removes the shards and index; single -> sharded removes model.safetensors; a
    quantized save's hf_quant_config.json (which would make the folder load as quantized) goes too."""
    target = tmp_path / "ckpt"
    hf.save_hf(old, target, max_shard_bytes=40_000)
    shards = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert len(shards) > 2 and (target / INDEX_NAME).exists()
    (target / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')
    (target / "tokenizer.json").write_text("tok")
    hf.save_hf(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert _same(hf.load_hf(target), new)
    hf.save_hf(old, target, max_shard_bytes=200_000)
    fewer = sorted(p.name for p in target.glob("model-*.safetensors"))
    assert 1 < len(fewer) < len(shards) and not (target / WEIGHTS_NAME).exists()
    assert sorted(p.name for p in target.iterdir()) == sorted(["config.json", INDEX_NAME, "tokenizer.json", *fewer])
    assert _same(hf.load_hf(target), old)


def test_quantized_save_keeps_other_files_and_a_plain_save_removes_its_quant_config(tmp_path):
    """save_quantized writes only config.json, hf_quant_config.json and weights; a later save_hf removes
    hf_quant_config.json (else the folder would still load as quantized) and keeps the tokenizer."""
    from tests.quant.test_export import _calibrated

    model = _calibrated("fp8")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "tokenizer.json").write_text("tok")
    modelopt.save_quantized(model, target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json"]
    assert hf.load_hf(target).config.runtime.quant is not None
    hf.save_hf(nemojax.Model.init(model.config.replace(runtime={"quant": None}), 0), target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert hf.load_hf(target).config.runtime.quant is None


@pytest.mark.parametrize("marker", ["run.json", "checkpoints"])
def test_save_refuses_a_training_workdir(tmp_path, old, marker):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "run.json").write_text("{}") if marker == "run.json" else (workdir / "checkpoints").mkdir()
    before = sorted(p.name for p in workdir.iterdir())
    with pytest.raises(nemojax.CheckpointError, match=f"training workdir.*{marker}"):
        hf.save_hf(old, workdir)
    assert sorted(p.name for p in workdir.iterdir()) == before


def test_save_refuses_a_file_and_symlinks(tmp_path, old):
    """A regular file, a symlink to a folder and a symlink loop are refused before anything is written."""
    file = tmp_path / "weights.bin"
    file.write_bytes(b"precious")
    with pytest.raises(nemojax.CheckpointError, match="weights.bin is a file"):
        hf.save_hf(old, file)
    assert file.read_bytes() == b"precious"

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(nemojax.CheckpointError, match="link is a symlink"):
        hf.save_hf(old, link)
    assert list(real.iterdir()) == [] and link.is_symlink()

    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(nemojax.CheckpointError, match="loop is a symlink"):
        hf.save_hf(old, loop)
    assert loop.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "loop", "real", "weights.bin"]


# ------------------------------------------------------------------------------------ crash safety


def test_leftovers_of_the_old_sibling_protocol_are_recovered(tmp_path, old, new):
    """The old swap, killed between its two renames, left the path missing: the complete new folder is moved back
    on load; sibling .NAME.saving-* debris and inner staging folders are removed by the next save."""
    target = tmp_path / "ckpt"
    hf.save_hf(old, tmp_path / "a")
    hf.save_hf(new, tmp_path / "b")
    (tmp_path / "a").rename(tmp_path / ".ckpt.saving-x1y2.old")
    (tmp_path / "b").rename(tmp_path / ".ckpt.saving-x1y2")
    assert _same(hf.load_hf(target), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    (tmp_path / ".ckpt.saving-orphan").mkdir()
    (target / ".nemojax-saving-killed").mkdir()
    (target / ".nemojax-saving-killed" / WEIGHTS_NAME).write_bytes(b"half")
    hf.save_hf(old, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert _same(hf.load_hf(target), old)


def _crash_points(monkeypatch, fail_at: int | None) -> list[str]:
    """Counts (and with `fail_at`, dies at) every step of a save that changes the disk: each rename, unlink,
    fsync and rmtree. Dies by a BaseException that is not an Exception, as a kill would not run handlers that
    catch Exception."""
    calls: list[str] = []

    class Killed(BaseException):
        pass

    def wrap(name, real):
        def step(*args, **kwargs):
            calls.append(name)
            if len(calls) == fail_at:
                raise Killed(name)
            return real(*args, **kwargs)
        return step

    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(os, "unlink", wrap("unlink", os.unlink))
    monkeypatch.setattr(safetensors_file, "_fsync", wrap("fsync", safetensors_file._fsync))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    return calls


@pytest.mark.parametrize("layouts", [(40_000, None), (None, 150_000)], ids=["sharded->single", "single->sharded"])
def test_a_save_killed_at_any_step_leaves_old_or_new(tmp_path, monkeypatch, old, new, layouts):
    """For every k, the save of `new` over `old` dies at its k-th disk-changing step; the path then loads as
    exactly `old` (died before the journal's commit rename) or `new` (after it), and the next save succeeds."""
    shard_old, shard_new = layouts

    def save(model, target, shard):
        hf.save_hf(model, target, **({"max_shard_bytes": shard} if shard else {}))

    with monkeypatch.context() as m:
        steps = _crash_points(m, None)
        save(new, tmp_path / "probe", shard_new)
        save(new, tmp_path / "probe", shard_new)
    n = len(steps) // 2  # the second save: a folder that already holds a checkpoint
    assert n > 6
    outcomes = []
    for k in range(1, n + 1):
        target = tmp_path / f"ckpt{k}"
        save(old, target, shard_old)
        (target / "tokenizer.json").write_text("tok")
        with monkeypatch.context() as m:
            _crash_points(m, k)
            with pytest.raises(BaseException, match=r"replace|unlink|fsync|rmtree"):
                save(new, target, shard_new)
        loaded = hf.load_hf(target)
        outcomes.append("new" if _same(loaded, new) else "old" if _same(loaded, old) else "neither")
        assert outcomes[-1] != "neither", f"killed at step {k}: the folder holds neither checkpoint"
        assert (target / "tokenizer.json").read_text() == "tok"
        assert not (target / JOURNAL_NAME).exists()
        save(old, target, shard_old)  # the save after a crash cleans up and works
        assert sorted(p.name for p in target.iterdir() if not p.name.startswith("model")) == [
            "config.json", "tokenizer.json"]
        assert _same(hf.load_hf(target), old)
    # the commit point splits the steps: old before it, new from it on
    assert outcomes == sorted(outcomes, key=["old", "new"].index) and outcomes[0] == "old" and outcomes[-1] == "new"


_CHILD = """
import itertools, shutil, sys
from pathlib import Path
from nemojax.interop.safetensors_file import save_folder
a, b, target = map(Path, sys.argv[1:4])
print("ready", flush=True)
for source in itertools.cycle([a, b]):
    save_folder(target, lambda staging: [shutil.copy(f, staging / f.name) for f in source.iterdir()])
"""


def test_kills_at_random_instants_leave_old_or_new(tmp_path, old, new):
    """A process saving two checkpoints (one sharded, one not) in turn over the same folder is SIGKILLed at
    random instants; the folder always loads as exactly one of them, with the folder's other files intact."""
    a, b, target = tmp_path / "a", tmp_path / "b", tmp_path / "ckpt"
    hf.save_hf(old, a, max_shard_bytes=40_000)
    hf.save_hf(new, b)
    shutil.copytree(a, target)
    (target / "tokenizer.json").write_text("tok")
    rng = np.random.default_rng(0)
    for _ in range(2):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(a), str(b), str(target)], cwd=REPO,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        child.send_signal(signal.SIGKILL)
        child.wait()
        loaded = hf.load_hf(target)
        assert _same(loaded, old) or _same(loaded, new)
        assert (target / "tokenizer.json").read_text() == "tok"


def test_a_save_or_load_during_another_live_save_is_refused_naming_it(tmp_path, old, new):
    """A folder another live process is saving into (its lock held) is neither written nor read: the second save
    and the load name that process, and the folder keeps its checkpoint. A lock left by a dead process is taken
    over with a warning."""
    target = tmp_path / "ckpt"
    hf.save_hf(old, target)
    saver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = target / safetensors_file.SAVE_LOCK_NAME
        lock.write_text(json.dumps({"pid": saver.pid, "host": socket.gethostname(), "started": 0.0, "token": "x"}))
        owner = f"process {saver.pid} on host {socket.gethostname()}"
        with pytest.raises(nemojax.CheckpointError, match=f"in use by {owner} \\(a checkpoint save\\)"):
            hf.save_hf(new, target)
        with pytest.raises(nemojax.CheckpointError, match=f"a checkpoint save by {owner} is in progress"):
            hf.load_hf(target)
        assert json.loads(lock.read_text())["pid"] == saver.pid
    finally:
        saver.kill()
        saver.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of process {saver.pid}"):
        hf.save_hf(new, target)
    assert _same(hf.load_hf(target), new) and not lock.exists()


_RACER = """
import sys
from pathlib import Path
import nemojax
from nemojax.errors import CheckpointError
from nemojax.interop import hf
model = hf.load_hf(sys.argv[1])
refused = 0
for _ in range(int(sys.argv[3])):
    try:
        hf.save_hf(model, sys.argv[2])
    except CheckpointError as e:
        assert "is in use by process" in str(e) or "is in progress" in str(e), e
        refused += 1
print(refused)
"""


def test_two_processes_saving_into_one_folder_never_mix_checkpoints(tmp_path, old, new):
    """Two processes save different checkpoints into one folder at the same time, over and over: each save either
    completes or is refused naming the other process (before: they removed each other's staging folders and
    crashed), and the folder always ends as one whole checkpoint."""
    a, b, target = tmp_path / "a", tmp_path / "b", tmp_path / "ckpt"
    hf.save_hf(old, a)
    hf.save_hf(new, b)
    racers = [subprocess.Popen([sys.executable, "-c", _RACER, str(src), str(target), "6"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for src in (a, b)]
    outputs = [r.communicate(timeout=300) for r in racers]
    assert all(r.returncode == 0 for r in racers), [err[-2000:] for _, err in outputs]
    loaded = hf.load_hf(target)
    assert _same(loaded, old) or _same(loaded, new)
    assert not list(target.glob(".nemojax-saving-*")) and not (target / safetensors_file.SAVE_LOCK_NAME).exists()


# ------------------------------------------------------------------------------------ reading errors


@pytest.fixture()
def saved(tmp_path, old) -> Path:
    hf.save_hf(old, tmp_path / "ckpt", max_shard_bytes=40_000)
    return tmp_path / "ckpt"


def test_truncated_shard_is_named(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    for keep in (len(data) - 100, 5, 0):
        shard.write_bytes(data[:keep])
        with pytest.raises(nemojax.CheckpointError, match=f"{shard.name}.*truncated"):
            hf.load_hf(saved)


def test_bad_json_names_the_file(saved):
    (saved / "config.json").write_text('{"model_type": "nemotron_h",')
    with pytest.raises(nemojax.CheckpointError, match="config.json: not valid JSON"):
        hf.load_hf(saved)
    (saved / "config.json").write_text("[]")
    with pytest.raises(nemojax.CheckpointError, match="config.json: holds a JSON list"):
        hf.load_hf(saved)


def test_bad_quant_config_json_names_the_file(tmp_path, old):
    hf.save_hf(old, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "hf_quant_config.json").write_text('{"quantization": ')
    with pytest.raises(nemojax.CheckpointError, match="hf_quant_config.json: not valid JSON"):
        hf.load_hf(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "hf_quant_config.json").write_text('{"producer": {}}')
    with pytest.raises(nemojax.CheckpointError, match='hf_quant_config.json: needs a "quantization"'):
        hf.load_hf(tmp_path / "ckpt")


def test_broken_index_is_named(saved, old):
    index = saved / INDEX_NAME
    good = json.loads(index.read_text())
    index.write_text("{not json")
    with pytest.raises(nemojax.CheckpointError, match=f"{INDEX_NAME}: not valid JSON"):
        hf.load_hf(saved)
    index.write_text(json.dumps({"metadata": good["metadata"]}))
    with pytest.raises(nemojax.CheckpointError, match=f'{INDEX_NAME}: needs a "weight_map"'):
        hf.load_hf(saved)
    index.write_text(json.dumps(good))
    shard = sorted(saved.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(nemojax.CheckpointError, match=f"names shard {shard.name}, which is missing"):
        hf.load_hf(saved)


def test_nonfinite_weights_warn_or_raise_naming_the_tensor(tmp_path, old):
    leaves = jax.tree.leaves_with_path(old.params)
    index = next(i for i, (path, _) in enumerate(leaves) if "in_proj" in jax.tree_util.keystr(path))
    bad = _with_leaf(_with_leaf(old, index, np.nan), index + 1, np.inf)
    hf.save_hf(bad, tmp_path / "bad")
    with pytest.warns(UserWarning, match=r"NaN/inf: backbone\.layers\.0\.mixer\.in_proj\.weight \(2 elements\)"):
        loaded = hf.load_hf(tmp_path / "bad")
    assert _same(loaded, bad)
    with pytest.raises(nemojax.CheckpointError, match=r"NaN/inf: backbone\.layers\.0\.mixer\.in_proj\.weight"):
        hf.load_hf(tmp_path / "bad", strict=True)


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_integer_tensor_for_a_float_param_is_named(tmp_path, old, dtype):
    state = hf.to_hf_state_dict(old)
    name = "backbone.norm_f.weight"
    state[name] = np.ones(state[name].shape, dtype)
    with pytest.raises(nemojax.CheckpointError, match=f"tensor {name} is {np.dtype(dtype)}, expected a floating"):
        hf.model_from_state_dict(old.config, state)
    hf.save_hf(old, tmp_path / "ckpt")
    safetensors_file.write_tensors(tmp_path / "ckpt", state, 1 << 40)
    with pytest.raises(nemojax.CheckpointError, match=f"tensor {name} is {np.dtype(dtype)}"):
        hf.load_hf(tmp_path / "ckpt")
