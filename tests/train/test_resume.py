"""Checkpoint and resume: a run killed after its mid-way checkpoint and started again ends exactly where an
uninterrupted run does; checkpoints of another config, corrupt ones and half-written ones are handled safely."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from nemojax import config_files
from nemojax.errors import CheckpointError
from nemojax.train.loop import restore_model, train
from nemojax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
OVERRIDES = [f"train.steps={STEPS}", "train.checkpoint_every=6", "train.log_every=1", "train.eval_every=100",
             "optimizer.warmup_steps=1"]


def _config(*extra: str):
    return config_files.load(ROOT / "configs" / "tiny.py", [*OVERRIDES, *extra])


def _cli(workdir: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "nemojax.cli", "train", "--config", str(ROOT / "configs" / "tiny.py"),
            "--workdir", str(workdir), "--no-progress", *(f"--config.{o}" for o in OVERRIDES), *extra]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _train_losses(workdir: Path) -> dict[int, float]:
    """Train loss per step; a step logged twice (before a kill and after the resume) keeps its last value."""
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == "train"}


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A workdir holding a finished 2-step run with its checkpoint at step 2 (trained once; tests get copies)."""
    workdir = tmp_path_factory.mktemp("two_steps")
    train(_config("train.steps=2", "train.checkpoint_every=2"), workdir, progress=False)
    return workdir


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, dirs_exist_ok=True)
    return to


@pytest.mark.xdist_group("subprocess")
def test_killed_and_resumed_run_equals_straight_run(tmp_path):
    """Straight 12 steps vs 6 steps, SIGKILL, resume for 6 more: identical losses at every step and identical
    params."""
    straight = _cli(tmp_path / "straight")
    interrupted = _cli(tmp_path / "interrupted", "--stop-after", "6")
    for line in interrupted.stdout:
        if line.startswith("stopped at step 6"):
            interrupted.send_signal(signal.SIGKILL)  # a hard kill once the checkpoint is on disk
            break
    interrupted.wait(timeout=300)
    assert interrupted.returncode == -signal.SIGKILL
    resumed = _cli(tmp_path / "interrupted")
    for process in (straight, resumed):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-3000:]

    a, b = _train_losses(tmp_path / "straight"), _train_losses(tmp_path / "interrupted")
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    assert [a[s] for s in a] == [b[s] for s in a]
    assert a[STEPS] < a[1]  # it is learning, so equal losses are not a constant
    model_a = restore_model(_config(), tmp_path / "straight")
    model_b = restore_model(_config(), tmp_path / "interrupted")
    for x, y in zip(jax.tree.leaves(model_a.params), jax.tree.leaves(model_b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.xdist_group("two_steps")  # one worker, so the fixture trains once
def test_workdir_of_another_config_is_refused(tmp_path, two_steps):
    """Resuming a workdir with a different model is refused with the differing field named; nothing is written."""
    _copy(two_steps, tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint has 64, config has 32"):
        train(_config("train.steps=4", "model.overrides.hidden_size=32"), tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.xdist_group("two_steps")  # one worker, so the fixture trains once
def test_workdir_resumes_under_another_runtime_but_not_another_architecture(tmp_path, two_steps):
    """The fingerprint ignores the compute dtype and remat: a float32 workdir resumes with runtime bfloat16 +
    full remat (from its step-2 checkpoint, run.json untouched), while an architecture field or the param dtype
    (the saved state's dtype) that differs is refused, naming only that difference."""
    _copy(two_steps, tmp_path)
    run_json = (tmp_path / "run.json").read_bytes()
    assert not {"dtype", "remat", "runtime"} & set(json.loads(run_json)["model"])
    runtime = ["model.runtime.dtype=bfloat16", "model.runtime.remat=full"]
    for change, named in (("model.overrides.norm_eps=1e-6", "model.norm_eps: checkpoint has 1e-05, config has 1e-06"),
                          ("model.runtime.param_dtype=bfloat16",
                           "param_dtype: checkpoint has 'float32', config has 'bfloat16'")):
        with pytest.raises(CheckpointError) as info:
            train(_config("train.steps=3", *runtime, change), tmp_path, progress=False)
        assert str(info.value).split(":\n  ", 1)[1].splitlines() == [named]
    result = train(_config("train.steps=3", *runtime), tmp_path, progress=False)
    assert result["summary"]["steps"] == 3
    assert (result["model"].config.runtime.dtype, result["model"].config.runtime.remat) == ("bfloat16", "full")
    train_steps = [m["step"] for m in read_metrics(tmp_path) if m["split"] == "train"]
    assert train_steps == [1, 2, 3]  # steps 1-2 from the saved run, only step 3 run again: a resume, not a restart
    assert (tmp_path / "run.json").read_bytes() == run_json


@pytest.mark.xdist_group("two_steps")  # one worker, so the fixture trains once
def test_workdir_written_before_the_runtime_split_still_loads_and_resumes(tmp_path, two_steps):
    """A run.json of the earlier layout (param_dtype, quant and the kernel choices inside "model") is the same run:
    `load_checkpoint` reads it and training resumes from it; a real difference is still refused."""
    from nemojax.infer.load import load_checkpoint

    _copy(two_steps, tmp_path)
    run = json.loads((tmp_path / "run.json").read_text())
    current = load_checkpoint(tmp_path, tokenizer="byte")[0]
    legacy = dict(run, model=dict(run["model"], param_dtype=run.pop("param_dtype"), quant=run.pop("quant"),
                                  mamba=dict(run["model"]["mamba"], ssd_impl="chunked"),
                                  attention=dict(run["model"]["attention"], impl="auto")))
    (tmp_path / "run.json").write_text(json.dumps(legacy))
    loaded = load_checkpoint(tmp_path, tokenizer="byte")[0]
    assert loaded.config == current.config
    with pytest.raises(CheckpointError, match="param_dtype: checkpoint has 'float32', config has 'bfloat16'"):
        train(_config("train.steps=3", "model.runtime.param_dtype=bfloat16"), tmp_path, progress=False)
    assert train(_config("train.steps=3"), tmp_path, progress=False)["summary"]["steps"] == 3


@pytest.mark.xdist_group("two_steps")  # one worker, so the fixture trains once
def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, two_steps):
    """A checkpoint whose array data is damaged is refused with a CheckpointError naming the step; it is not
    overwritten by a fresh start."""
    _copy(two_steps, tmp_path)
    step_dir = tmp_path / "checkpoints" / "2"
    data_files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0
                  and "manifest" not in p.name and not p.name.startswith("_")]
    assert data_files
    for path in data_files:
        path.write_bytes(b"\0" * 7)
    snapshot = {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="checkpoint step 2"):
        train(_config("train.steps=4", "train.checkpoint_every=2"), tmp_path, progress=False)
    assert {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()} == snapshot


@pytest.mark.xdist_group("two_steps")  # one worker, so the fixture trains once
def test_unfinished_save_is_ignored_and_relative_workdir(tmp_path, two_steps, monkeypatch):
    """A step directory left half-written (orbax's temporary name) is not taken as a checkpoint: the run resumes
    from the last complete one. The workdir is given relative to the current directory, which orbax (absolute
    paths only) must also handle for restoring and saving."""
    monkeypatch.chdir(tmp_path)
    workdir = _copy(two_steps, tmp_path / "runs" / "rel")
    half = workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    half.mkdir()
    (half / "junk").write_text(json.dumps({"partial": True}))
    result = train(_config("train.steps=4", "train.checkpoint_every=1"), "runs/rel", progress=False)
    assert result["summary"]["steps"] == 4
    assert sorted(_train_losses(workdir)) == [1, 2, 3, 4]
    assert {"3", "4"} <= {p.name for p in (workdir / "checkpoints").iterdir()}  # saved through the relative path


def test_a_methods_nested_fingerprint_is_not_read_as_the_old_layout(tmp_path):
    """finetune and elastic.train nest config_fingerprint under "model" (its own "param_dtype" beside the
    architecture): read_run must return it unchanged, or the method's own rerun is refused as another run."""
    from nemojax import presets
    from nemojax.train.checkpoint import config_fingerprint, read_run

    run = {"method": "finetune", "model": config_fingerprint(presets.get("nemotron-h-8b-tiny"))}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert read_run(tmp_path / "run.json") == json.loads(json.dumps(run))
