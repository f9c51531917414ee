"""Fault injection into training runs, each checked against what an undisturbed run gives:

1. SIGKILLs at random instants of a run that checkpoints every step (a subprocess: this module run as a script):
   after each kill the newest checkpoint restores, digest-verified, to the uninterrupted run's state at that step, the
   next start takes over the dead job's lock, and the last start ends bit-identical to an uninterrupted run.
2. A flipped byte in a saved Orbax checkpoint's array data: resuming is refused with a CheckpointError naming the
   step, never a silently different state.
3. A full disk (OSError ENOSPC) at several points of an Orbax save: a named error within seconds (no hang), the
   earlier checkpoint restores, and the run resumes from it once there is room.
4. A loss that turns NaN mid-run through `nemojax train` (a huge learning rate): exit status 2 with the named error,
   the last finite checkpoint kept and restorable.

The other fault tests: tests/interop/test_checkpoint_safety.py (kills at random instants of `save_hf`, refused
targets, damaged files), tests/train/test_guards.py (an unwritable checkpoints folder, the workdir lock, digests,
skipped non-finite steps), tests/train/test_resume.py (a kill after a checkpoint, corrupt and half-written
checkpoints).

Run as a script, this module is the training job that test 1 starts and kills:

    python -m tests.test_fault_injection WORKDIR
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nemojax.errors import CheckpointError
from nemojax.train.checkpoint import CHECKSUM_DIR, LOCK_FILE, Checkpoints
from nemojax.train.fit import fit
from nemojax.train.metrics import read_metrics
from nemojax.train.step import LossAux, TrainState, make_train_step

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40  # of the killed run: enough that every kill, a few steps after the last restart, lands mid-run
DIM = 16


# ------------------------------------------------------------------ a small regression run (tests 1 and 3)


def _batches(count: int = STEPS) -> list[dict[str, np.ndarray]]:
    """Linear-regression batches x [8, DIM], y [8, DIM] (y = x W* + 0.3 for a fixed random W*)."""
    rng = np.random.default_rng(0)
    true_w = rng.normal(size=(DIM, DIM)).astype(np.float32)
    out = []
    for _ in range(count):
        x = rng.normal(size=(8, DIM)).astype(np.float32)
        out.append({"x": x, "y": (x @ true_w + 0.3).astype(np.float32)})
    return out


def _loss(params, batch, rng):
    """Mean squared error of x w + b (the step hands every loss an rng; this one needs none)."""
    del rng
    error = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return jnp.mean(error ** 2), LossAux({}, {})


PARAMS = {"w": np.zeros((DIM, DIM), np.float32), "b": np.zeros((DIM,), np.float32)}
OPTIMIZER = optax.adam(0.05)


def _fit(workdir: Path, steps: int = STEPS, **options) -> Any:
    """fit on the regression batches from a grain iterator, whose position is checkpointed beside the train state
    (as `nemojax train` does with its data), with a checkpoint after every step."""
    data = iter(grain.MapDataset.source(_batches()).to_iter_dataset())
    return fit(PARAMS, _loss, OPTIMIZER, data, steps, rng=jax.random.key(3), workdir=workdir, checkpoint_every=1,
               **options)


def _worker(workdir: Path) -> None:
    """The killed job: STEPS steps in `workdir` (two checkpoints kept), printing "step N" as each is logged and
    "finished" at the end."""

    def announce(step: int, metrics: dict[str, float], steps_per_second: float) -> dict[str, float]:
        print(f"step {step}", flush=True)
        return metrics

    _fit(workdir, keep_checkpoints=2, on_log=announce)
    print("finished", flush=True)


@pytest.fixture(scope="module")
def oracle() -> tuple[list[dict[str, np.ndarray]], dict[int, float]]:
    """The params after each step 0..STEPS and the loss of each step 1..STEPS of an uninterrupted run: the plain
    jitted step loop, which fit equals value for value (tests/train/test_fit.py)."""
    step = jax.jit(make_train_step(OPTIMIZER, _loss))
    state = TrainState(PARAMS, OPTIMIZER.init(PARAMS), jnp.zeros((), jnp.int32), jax.random.key(3))
    params, losses = [PARAMS], {}
    for number, batch in enumerate(_batches(), start=1):
        state, metrics = step(state, batch)
        params.append(jax.device_get(state.params))
        losses[number] = float(metrics["loss"])
    return params, losses


def _abstract_state() -> TrainState:
    """The regression run's train state as ShapeDtypeStructs on the first device, as fit restores it."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.eval_shape(lambda: TrainState(PARAMS, OPTIMIZER.init(PARAMS), jnp.zeros((), jnp.int32),
                                              jax.random.key(3)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), state)


def _restore_latest(workdir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """(step, params) of the workdir's newest checkpoint, restored by `Checkpoints.restore` and so checked against
    the digest written when it was saved (which must exist); (0, the initial params) when no save completed."""
    checkpoints = Checkpoints(workdir, json.loads((workdir / "run.json").read_text()))
    try:
        step = checkpoints.latest_step()
        if step is None:
            return 0, PARAMS
        assert (workdir / CHECKSUM_DIR / f"{step}.json").exists(), f"checkpoint step {step} has no digest"
        state = checkpoints.restore(_abstract_state())
    finally:
        checkpoints.close()
    assert int(state.step) == step
    return step, jax.device_get(state.params)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Bit-identical pytrees of arrays."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# ------------------------------------------------------------------------------ 1. kills during training


def _start(workdir: Path, log: Path) -> subprocess.Popen:
    """The worker on `workdir`: stdout piped line by line, stderr into `log` (so a full pipe never blocks it)."""
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "tests.test_fault_injection", str(workdir)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=stderr,
                                text=True, bufsize=1)


def _kill_after(job: subprocess.Popen, step: int, delay: float) -> None:
    """SIGKILLs the job `delay` seconds after it printed "step {step}"; it must still be running then."""
    for line in job.stdout:
        if line.strip() == f"step {step}":
            break
    else:
        raise AssertionError(f"the job ended (status {job.wait()}) before step {step}")
    time.sleep(delay)
    assert job.poll() is None, f"the job ended before the kill, {delay:.3f} s after step {step}"
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    job.stdout.close()


KILLS = 2  # each start costs about 3 s of imports: two kills keep the module under 40 s


@pytest.mark.xdist_group("subprocess")
def test_random_kills_during_training_resume_from_a_verified_checkpoint_exactly(tmp_path, oracle):
    """The job is SIGKILLed KILLS times, each 0-0.1 s (the time of a few steps and saves) after a step 1-7 steps
    past its restart, drawn by a seeded rng: every time its newest checkpoint restores (digest verified) to the
    uninterrupted run's params at that step and the dead job's lock is left behind; the next start takes it over;
    the last start finishes with the uninterrupted run's params and per-step losses, bit for bit."""
    oracle_params, oracle_losses = oracle
    rng = np.random.default_rng(15)
    workdir, restored, dead = tmp_path / "run", 0, None
    for kill in range(KILLS + 1):
        log = tmp_path / f"stderr-{kill}.txt"
        job = _start(workdir, log)
        if kill == KILLS:
            out, _ = job.communicate(timeout=120)
            assert job.returncode == 0 and out.splitlines()[-1] == "finished", log.read_text()[-3000:]
        else:
            _kill_after(job, restored + int(rng.integers(1, 8)), float(rng.uniform(0.0, 0.1)))
            assert job.returncode == -signal.SIGKILL
            assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == job.pid  # the dead job's lock
        if dead is not None:
            assert f"taking over the lock of process {dead}" in log.read_text()
        restored, params = _restore_latest(workdir)
        assert _same(params, oracle_params[restored]), f"start {kill}: step {restored} restored other params"
        dead = job.pid
    assert restored == STEPS and not (workdir / LOCK_FILE).exists()
    losses = {m["step"]: m["loss"] for m in read_metrics(workdir) if m["split"] == "train"}  # the last of each step
    assert losses == oracle_losses


# --------------------------------------------------------------------------- 3. a full disk during a save


def _no_space(what: str) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", what)


class _FailedWrite:
    """An Orbax write future whose write ran out of space (what the background commit waits on)."""

    def result(self, timeout: float | None = None) -> None:
        raise _no_space("array data")


def _fill_disk_at(monkeypatch: pytest.MonkeyPatch, where: str, step: int) -> None:
    """Makes Orbax's save of `step` fail with ENOSPC at `where`: "write_start" (the array writes refused as they
    start, in the caller's thread), "write" (the array writes fail in the background), "commit" (the rename of the
    finished temporary folders, in the background) or "folders" (creating the temporary folders). Tensorstore's own
    writes are C++, so the faults go in at the Orbax Python calls around them."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import atomicity
    from orbax.checkpoint._src.serialization import jax_array_handlers

    saving = {}
    manager_save = ocp.CheckpointManager.save

    def save(self, number, *args, **kwargs):  # only notes which step is being saved
        saving["step"] = number
        return manager_save(self, number, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    if where in ("write_start", "write"):
        serialize = jax_array_handlers.ArrayHandler.serialize

        async def failing_serialize(self, values, infos, args=None):
            if saving.get("step") != step:
                return await serialize(self, values, infos, args)
            if where == "write_start":
                raise _no_space("array data")
            for written in await serialize(self, values, infos, args):
                written.result()
            return [_FailedWrite()]

        monkeypatch.setattr(jax_array_handlers.ArrayHandler, "serialize", failing_serialize)
    else:
        name = {"commit": "finalize", "folders": "create"}[where]
        original = getattr(atomicity.AtomicRenameTemporaryPath, name)

        async def failing(self, *args, **kwargs):
            if f"/{step}.orbax-checkpoint-tmp" in str(self.get()):
                raise _no_space(str(self.get()))
            return await original(self, *args, **kwargs)

        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, name, failing)


def _outcome_within(seconds: float, run: Callable[[], Any]) -> dict[str, Any]:
    """{"result": ...} or {"error": ...} of run() in a daemon thread, which must end within `seconds`."""
    outcome: dict[str, Any] = {}

    def target():
        try:
            outcome["result"] = run()
        except Exception as error:  # noqa: BLE001 - the test inspects it
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still running after {seconds} s: a hang"
    return outcome


@pytest.mark.parametrize("where", ["write_start", "write", "commit", "folders"])
def test_full_disk_during_a_save_is_a_named_error_and_the_earlier_checkpoint_restores(tmp_path, monkeypatch,
                                                                                       oracle, where):
    """The save of step 2 of 4 runs out of space: the run ends within 60 s with a CheckpointError naming the
    checkpoints folder and the cause; step 1 restores (digest verified) to the uninterrupted run's params; with room
    again the run resumes from it and ends with the uninterrupted run's params."""
    oracle_params, _ = oracle
    _fill_disk_at(monkeypatch, where, step=2)
    error = _outcome_within(60, lambda: _fit(tmp_path, steps=4)).get("error")
    assert isinstance(error, CheckpointError), repr(error)
    assert f"into {tmp_path / 'checkpoints'}" in str(error) and "No space left on device" in str(error)
    assert not (tmp_path / LOCK_FILE).exists()
    monkeypatch.undo()  # room on the disk again
    step, params = _restore_latest(tmp_path)
    assert step == 1 and _same(params, oracle_params[1])
    result = _fit(tmp_path, steps=4)
    assert result.finished and _same(jax.device_get(result.state.params), oracle_params[4])


# ------------------------------------------------------------ 4 and 2. `nemojax train` on configs/tiny.py

TINY = ROOT / "configs" / "tiny.py"
# three layers (Mamba, attention, MLP) compile in half the time of the preset's eight; a learning rate of 1e30 makes
# Adam move every weight by about 1e30 in step 1, so step 2's loss overflows
DIVERGING = ["model.overrides.pattern=M*-", "train.steps=4", "train.batch_size=2", "train.seq_len=16",
             "train.checkpoint_every=1", "train.log_every=1", "train.eval_every=100", "optimizer.warmup_steps=1",
             "optimizer.lr=1e30"]


def _cli_train(workdir: Path) -> tuple[int, str]:
    """(exit status, stderr) of `nemojax train` on configs/tiny.py with the DIVERGING overrides, run in-process."""
    from nemojax import cli

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            cli.main(["train", "--config", str(TINY), "--workdir", str(workdir), "--no-progress",
                      *(f"--config.{o}" for o in DIVERGING)])
            status = 0
        except SystemExit as exit_:
            status = exit_.code
    return status, stderr.getvalue()


def _error_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("nemojax train: error: "))


def _restore_tiny(workdir: Path) -> Any:
    """The train state of the tiny run's newest checkpoint, restored as `nemojax train` resumes it (digest
    checked)."""
    from nemojax import config_files
    from nemojax.train import loop

    config = config_files.load(TINY, DIVERGING)
    run = loop.build(config)
    with jax.set_mesh(run.mesh):
        checkpoints = Checkpoints(workdir, loop._fingerprint(run.model_config, config))
        try:
            return jax.device_get(checkpoints.restore(run.abstract_state))
        finally:
            checkpoints.close()


@pytest.fixture(scope="module")
def diverged(tmp_path_factory) -> tuple[Path, int, str]:
    """(workdir, exit status, stderr) of the diverging `nemojax train` run (run once for tests 4 and 2)."""
    workdir = tmp_path_factory.mktemp("diverged")
    return workdir, *_cli_train(workdir)


@pytest.mark.xdist_group("diverged")  # one worker, so the fixture trains once
def test_nan_loss_mid_run_stops_the_job_and_keeps_the_last_finite_checkpoint(diverged):
    """`nemojax train` with a learning rate of 1e30: step 1 is finite (and checkpointed), step 2's loss is not; the
    job ends with exit status 2 and the named error on one line, step 1 stays the newest checkpoint and restores
    (digest verified, finite), and nothing of step 2 is written."""
    workdir, status, stderr = diverged
    assert status == 2, stderr[-3000:]
    line = _error_line(stderr)
    assert line.startswith("nemojax train: error: train: the loss or its gradient is not finite (NaN or inf) at "
                           "step 2; stopped without checkpointing the diverged state; the newest checkpoint (step 1) "
                           "is left as it was"), line
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]
    assert sorted(p.name for p in (workdir / CHECKSUM_DIR).iterdir()) == ["1.json"]
    logged = [m for m in read_metrics(workdir) if m["split"] == "train"]
    assert [m["step"] for m in logged] == [1] and np.isfinite(logged[0]["loss"])
    assert not (workdir / LOCK_FILE).exists()
    state = _restore_tiny(workdir)
    assert int(state.step) == 1
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))


def _data_files(step_dir: Path) -> list[Path]:
    """The array data files of a saved Orbax step (those under a `d` folder of its OCDBT store), largest last."""
    return sorted((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: (p.stat().st_size, p.name))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.xdist_group("diverged")  # one worker, so the fixture trains once
def test_bit_flip_in_checkpoint_data_is_refused_by_step_never_restored_silently(diverged, tmp_path):
    """A byte flipped in the middle of the largest array data file of checkpoint step 1: resuming the job is refused
    (exit status 2) with the CheckpointError naming step 1, and the checkpoint is left as it is. Flips at seeded
    random places of every data file are each refused naming the step, or restore the very state saved (a byte
    that no read uses, such as an unreferenced old B-tree node): never a different state."""
    run = shutil.copytree(diverged[0], tmp_path / "run")
    saved = _restore_tiny(run)
    step_dir = run / "checkpoints" / "1"
    largest = _data_files(step_dir)[-1]
    _flip_byte(largest, largest.stat().st_size // 2)
    snapshot = {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    status, stderr = _cli_train(run)
    assert status == 2 and "error: checkpoint step 1 in " in _error_line(stderr), stderr[-3000:]
    assert {p: p.read_bytes() for p in step_dir.rglob("*") if p.is_file()} == snapshot
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1"]

    rng = np.random.default_rng(15)
    for flip in range(6):
        copy = shutil.copytree(diverged[0], tmp_path / f"flip-{flip}")
        files = _data_files(copy / "checkpoints" / "1")
        path = files[int(rng.integers(len(files)))]
        offset = int(rng.integers(path.stat().st_size))
        _flip_byte(path, offset)
        try:
            state = _restore_tiny(copy)
        except CheckpointError as error:
            assert "checkpoint step 1 in " in str(error), str(error)
            continue
        assert _same(state.params, saved.params) and _same(state.opt_state, saved.opt_state), (
            f"byte {offset} of {path.relative_to(copy)} flipped: a different state restored without an error")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # no waiting on the background threads of jax and orbax at exit
