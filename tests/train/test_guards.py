"""Training-job guards: an unwritable checkpoints folder is an error within seconds (not a hang), bad train configs
are refused before step 1, a workdir lock keeps a second job out, a checkpoint that differs from its saved digest
is refused, and non-finite steps can be skipped (and counted) instead of stopping the run."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax import config_files
from nemojax.errors import CheckpointError
from nemojax.train import loop
from nemojax.train.checkpoint import LOCK_FILE, Checkpoints, WorkdirLockedError
from nemojax.train.fit import NonFiniteLossError, fit
from tests.train.test_fit import OPTIMIZER, PARAMS, STEPS, _batches, _loss

ROOT = Path(__file__).resolve().parents[2]


def _fit(batches=None, steps: int = STEPS, **options):
    """The linear-regression fit of test_fit (6 steps, a frozen scale of 2)."""
    return fit(PARAMS, _loss, OPTIMIZER, iter(batches if batches is not None else _batches()), steps,
               rng=jax.random.key(3), frozen=(jnp.float32(2.0),), **options)


def _tiny(*overrides: str):
    return config_files.load(ROOT / "configs" / "tiny.py", ["train.steps=2", "optimizer.warmup_steps=1", *overrides])


# 1. a checkpoints folder that cannot be written

def test_unwritable_checkpoint_folder_is_an_error_naming_it_not_a_hang(tmp_path):
    """`checkpoints` is a regular file (as root, chmod does not block writes; this is what kills orbax's background
    save thread, after which the old loop waited for ever): the run fails before step 1, naming the folder."""
    (tmp_path / "checkpoints").write_text("not a folder")
    outcome = {}

    def run():
        try:
            _fit(workdir=tmp_path)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "training hung on an unwritable checkpoints folder"
    assert isinstance(outcome.get("error"), CheckpointError)
    assert f"checkpoint folder {tmp_path / 'checkpoints'} cannot be written" in str(outcome["error"])
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any step


# 2. train-config sanity, before step 1

@pytest.mark.parametrize("field", ["log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"])
def test_zero_intervals_and_counts_are_refused_before_training(tmp_path, field):
    with pytest.raises(ValueError, match=rf"train\.{field}=0 is invalid: must be an integer >= 1"):
        loop.train(_tiny(f"train.{field}=0"), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


def test_empty_workdir_and_unknown_policy_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="workdir='' is invalid"):
        loop.train(_tiny(), "", progress=False)
    config = _tiny()
    config.train.on_nonfinite = "ignore"
    with pytest.raises(ValueError, match=r"train\.on_nonfinite='ignore' is invalid"):
        loop.train(config, tmp_path / "run", progress=False)
    assert not any(tmp_path.iterdir())


def test_empty_validation_split_is_refused_before_step_1(tmp_path):
    """Text data whose validation share is 0: no validation batch exists, found before any training."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 400)
    config = _tiny()
    config.data = {"kind": "text", "tokenizer": "byte", "paths": (str(corpus),), "val_fraction": 0.0}
    with pytest.raises(ValueError, match=r"the .?validation.? split of .* is empty"):
        loop.train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_nonfinite_policy_reaches_fit_from_the_train_config(tmp_path, monkeypatch):
    """`train.on_nonfinite` / `train.max_skipped` are handed to fit (stubbed, so nothing trains)."""
    seen = {}

    def fake_fit(*args, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before training

    monkeypatch.setattr(loop, "fit", fake_fit)
    config = _tiny()
    config.train.on_nonfinite, config.train.max_skipped = "skip", 4
    with pytest.raises(KeyboardInterrupt):
        loop.train(config, tmp_path, progress=False)
    assert (seen["on_nonfinite"], seen["max_skipped"]) == ("skip", 4)


# 3. workdir lock

def _lock(workdir: Path, pid: int) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": 0.0,
                                                 "token": "other"}))


def test_workdir_held_by_a_live_job_is_refused_naming_it(tmp_path):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, owner.pid)
        with pytest.raises(WorkdirLockedError, match=f"in use by process {owner.pid} on host {socket.gethostname()}"):
            _fit(workdir=tmp_path)
    finally:
        owner.kill()
        owner.wait()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == owner.pid  # not the refused job's to remove


def test_stale_lock_is_taken_over_and_every_lock_is_released(tmp_path):
    """A lock of a dead process on this host is taken over with a warning; the run's own lock is gone after it
    ends, also when it ends with an error."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(tmp_path / "a", dead.pid)
    with pytest.warns(UserWarning, match=f"taking over the lock of process {dead.pid}"):
        assert _fit(workdir=tmp_path / "a").finished
    assert not (tmp_path / "a" / LOCK_FILE).exists()
    with pytest.raises(NonFiniteLossError):
        _fit(_batches(poison=2), workdir=tmp_path / "b")
    assert not (tmp_path / "b" / LOCK_FILE).exists()


# 4. checkpoint digests

def test_checkpoint_that_differs_from_its_digest_is_refused_by_step(tmp_path):
    """Step 6's data no longer matches the digest written when it was saved (here: step 3's digest, as if bits of
    step 6 had flipped on disk and orbax read them back without complaint): resuming refuses step 6 by name."""
    _fit(workdir=tmp_path, checkpoint_every=3)
    assert json.loads((tmp_path / "checksums" / "6.json").read_text())["step"] == 6
    shutil.copy(tmp_path / "checksums" / "3.json", tmp_path / "checksums" / "6.json")
    with pytest.raises(CheckpointError, match=r"checkpoint step 6 in .* is corrupt: \d+ leaves differ"):
        _fit(workdir=tmp_path, checkpoint_every=3)


def test_nonfinite_state_is_never_saved_so_rotation_keeps_the_newest_finite(tmp_path):
    """Checkpoints.save refuses a state with NaN params (so rotation, which drops only the oldest, never drops the
    newest finite checkpoint for a diverged one); the kept steps and their digests are as they were."""
    state = _fit(workdir=tmp_path, checkpoint_every=2, keep_checkpoints=2).state
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 6]
    assert sorted(p.name for p in (tmp_path / "checksums").iterdir()) == ["4.json", "6.json"]
    poisoned = dataclasses.replace(state, params={**state.params, "b": jnp.full_like(state.params["b"], jnp.nan)})
    checkpoints = Checkpoints(tmp_path, json.loads((tmp_path / "run.json").read_text()), keep=2)
    try:
        with pytest.raises(CheckpointError, match="refusing to save checkpoint step 8 .* not finite"):
            checkpoints.save(8, poisoned)
        assert checkpoints.latest_step() == 6
    finally:
        checkpoints.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 6]


# 5. skipping non-finite steps

def test_skip_drops_the_bad_update_and_counts_it():
    """A NaN target in batch 3 of 6, skipped: the final params equal a 5-step run without that batch (the skipped
    step changed neither params nor optimizer state), and the logged skipped_steps count it."""
    batches = _batches(poison=2)
    result = _fit(batches, on_nonfinite="skip")
    oracle = _fit([b for i, b in enumerate(batches) if i != 2], steps=STEPS - 1)
    jax.tree.map(np.testing.assert_allclose, jax.device_get(result.state.params), jax.device_get(oracle.state.params))
    assert result.finished and int(result.state.step) == STEPS
    assert [m["skipped_steps"] for m in result.history] == [0, 0, 1, 1, 1, 1]
    assert np.isfinite(np.asarray(result.state.params["w"])).all()


def test_too_many_skips_in_a_row_stop_with_the_named_error(tmp_path):
    """Every batch from the second on is poisoned; max_skipped=2 stops at step 3 without checkpointing it."""
    batches = _batches()
    for batch in batches[1:]:
        batch["y"] = np.full_like(batch["y"], np.nan)
    with pytest.raises(NonFiniteLossError, match=r"at 2 steps in a row up to step 3 \(train.max_skipped=2"):
        _fit(batches, on_nonfinite="skip", max_skipped=2, workdir=tmp_path, checkpoint_every=1)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2]
