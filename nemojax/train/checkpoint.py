"""Checkpoints of a training run with orbax's CheckpointManager (async): the TrainState (params, optimizer state,
step, rng) and, when given, the data iterator's state.

A workdir remembers what it trains (`run.json`: the model config and the shapes that must not change). Opening it
with a different config, or restoring a checkpoint that cannot be read, raises `CheckpointError` and touches
nothing, so a good checkpoint is never replaced by a fresh start. Orbax writes each step to a temporary
directory and renames it when complete, so a save interrupted part-way is never listed as a step.

Guards: the checkpoints folder is checked writable (a probe file) before a run's first step and every save, so a folder
that cannot be written is a `CheckpointError` naming it instead of a dead background save the run waits on for
ever. Only states whose params are finite are saved; beside each step, `checksums/<step>.json` holds a digest of
the saved state (per leaf: the wrapping uint32 sum of its bit patterns, so any flipped bit changes it), checked on
restore together with finiteness. A training job holds `WorkdirLock` (workdir/lock.json) so two jobs never share a
workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from nemojax.config import ModelConfig
from nemojax.errors import CheckpointError
from nemojax.locks import FolderLock, FolderLockedError

RUN_FILE = "run.json"
LOCK_FILE = "lock.json"
CHECKSUM_DIR = "checksums"
__all__ = ["CHECKSUM_DIR", "LOCK_FILE", "RUN_FILE", "CheckpointError", "Checkpoints", "WorkdirLock",
           "WorkdirLockedError", "config_fingerprint", "read_run", "state_digest"]

# Run-time fields that run.json files written before `config.runtime` existed kept inside "model" (and its
# sub-configs): dropped on reading, except the two that shape the saved state, which move to the top level.
_LEGACY_RUNTIME = {"model": ("dtype", "remat", "scan_layers", "matmul_impl"),
                   "mamba": ("ssd_impl", "decode_impl", "scan_impl"), "attention": ("impl", "decode_impl"),
                   "moe": ("impl",)}


def config_fingerprint(config: ModelConfig) -> dict[str, Any]:
    """What a resumed run must share with its checkpoints, as run.json entries: the architecture ("model", the
    config without its runtime) and, of the runtime, only what shapes the saved state: the param dtype and the
    quantization recipe (whose calibration state is saved with the params). The compute dtype, remat and kernel
    choices may change between runs of one checkpoint; the scanned layout is recorded by the trainer."""
    model = dataclasses.asdict(config)
    runtime = model.pop("runtime")
    return {"model": model, "param_dtype": runtime["param_dtype"], "quant": runtime["quant"]}


def read_run(path: str | Path) -> dict[str, Any]:
    """A workdir's run.json (`path`: the file), in the current layout: a file written before the runtime split
    (param_dtype, quant and the kernel choices inside "model") reads as the same run written today."""
    run = json.loads(Path(path).read_text())
    model = run.get("model")
    # an old layout's "model" is an architecture (hidden_size ...); a method's nested fingerprint is left alone
    if not isinstance(model, dict) or "hidden_size" not in model or \
            not any(name in model for name in ("param_dtype", "quant")):
        return run
    for name in ("param_dtype", "quant"):
        value = model.pop(name)
        run.setdefault(name, value)
    for name in _LEGACY_RUNTIME["model"]:
        model.pop(name, None)
    for sub in ("mamba", "attention", "moe"):
        if isinstance(model.get(sub), dict):
            for name in _LEGACY_RUNTIME[sub]:
                model[sub].pop(name, None)
    return run


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: checkpoint has {saved!r}, config has {current!r}"]


class WorkdirLockedError(FolderLockedError):
    """Another live training job holds the workdir's lock."""


def _bit_sum(x: jax.Array) -> jax.Array:
    """The wrapping uint32 sum of x's bit patterns (scalar): flipping any one bit changes it (by 2^k mod 2^32)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}.get(jnp.dtype(x.dtype).itemsize)
    try:
        bits = jax.lax.bitcast_convert_type(x, unsigned)  # 64-bit leaves gain a trailing axis of two words
    except (TypeError, ValueError):  # sub-byte types (int4, float4): their values are exact in float32
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@jax.jit
def _digest(state: Any) -> tuple[list[jax.Array], jax.Array]:
    leaves = jax.tree.leaves(state)
    params = jax.tree.leaves(getattr(state, "params", state))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in params
                                if jnp.issubdtype(p.dtype, jnp.inexact)] or [jnp.bool_(True)]))
    return [_bit_sum(leaf) for leaf in leaves], finite


def state_digest(state: Any) -> tuple[dict[str, int], bool]:
    """({leaf path: wrapping uint32 sum of its bit patterns}, whether every floating param is finite) of a train
    state (or any pytree; "params" is the whole tree when it has no such field). Computed on device (sharded
    leaves stay where they are); only the scalars come to the host."""
    sums, finite = jax.device_get(_digest(state))
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return {path: int(value) for path, value in zip(paths, sums, strict=True)}, bool(finite)


def _write_atomically(path: Path, text: str) -> None:
    """path's contents become `text` all at once (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class WorkdirLock(FolderLock):
    """An exclusive claim on a training workdir: `workdir/lock.json` (see `nemojax.locks.FolderLock`). A second job
    is refused with `WorkdirLockedError` naming the owner's pid and host; the lock of a dead job on this host is
    taken over with a warning."""

    def __init__(self, workdir: str | Path):
        super().__init__(workdir, LOCK_FILE, purpose="a training job", error=WorkdirLockedError)


class Checkpoints:
    """Saves and restores a run's state under `workdir/checkpoints` (digests under `workdir/checksums`).

    `fingerprint` is a JSON-able dict of what a resumed run must share with the saved one (model config,
    sequence length, ...). Runtime choices such as the step count or learning rate are left out of it on purpose.
    """

    def __init__(self, workdir: str | Path, fingerprint: dict[str, Any], *, keep: int = 3, async_save: bool = True):
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep={keep!r} is invalid: must be an integer >= 1 (checkpoints to keep)")
        self.workdir = Path(workdir).absolute()  # orbax needs absolute paths
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.folder = self.workdir / "checkpoints"
        self.checksums = self.workdir / CHECKSUM_DIR
        fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples and the like
        run_file = self.workdir / RUN_FILE
        if run_file.exists():
            diffs = _differences(read_run(run_file), fingerprint)
            if diffs:
                raise CheckpointError(f"{self.workdir} holds a run of another configuration; refusing to resume "
                                      "or overwrite it:\n  " + "\n  ".join(diffs))
        else:
            run_file.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        # Folders are created on the calling thread: orbax's background creation swallows a failure (a full disk)
        # and the save then waits out a 300 s barrier before a misleading timeout.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self._last_saved: int | None = None
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def check_writable(self) -> None:
        """Raises CheckpointError unless a file can be created in the checkpoints and checksums folders: orbax's
        background save thread dies on an unwritable folder without waking the thread that waits on it, so a
        writer calls this before its first step (and `save` before every save); restoring alone never needs it."""
        for folder in (self.folder, self.checksums):
            probe = folder / f".write-probe-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as error:
                raise CheckpointError(f"checkpoint folder {folder} cannot be written ({type(error).__name__}: "
                                      f"{error}); make it a writable directory or use another workdir") from error

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None) -> None:
        """Starts an async save of `step` and writes its digest (checksums/<step>.json); first raises
        CheckpointError if the folder cannot be written, if the previous async save failed (so a run never trains
        on for long past a checkpoint it did not write), or if the state's params are not finite (so rotation,
        which drops the oldest steps, only ever drops finite checkpoints for newer finite ones)."""
        self.check_writable()
        digest, finite = state_digest(state)
        if not finite:
            raise CheckpointError(f"refusing to save checkpoint step {step} in {self.folder}: its params are not "
                                  "finite (NaN or inf); the newer checkpoints are left as they were")
        try:
            self.manager.check_for_errors()
        except Exception as error:
            raise CheckpointError(f"an earlier save into {self.folder} failed ({type(error).__name__}: "
                                  f"{error})") from error
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if jax.process_index() == 0:  # before the save: a kill after orbax commits never leaves a step undigested
            _write_atomically(self.checksums / f"{step}.json", json.dumps({"step": step, "leaves": digest}))
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as error:
            # orbax raises a background save's failure from the next save: name both steps
            earlier = "" if self._last_saved is None else f" (or the background save of step {self._last_saved})"
            raise CheckpointError(f"saving checkpoint step {step}{earlier} into {self.folder} failed "
                                  f"({type(error).__name__}: {error})") from error
        self._last_saved = step
        if jax.process_index() == 0:
            self._drop_stale_checksums(keep=step)

    def _drop_stale_checksums(self, keep: int) -> None:
        """Removes the digests of steps orbax has rotated away (an in-flight save, `keep`, is not listed yet)."""
        live = {*self.manager.all_steps(), keep}
        for path in self.checksums.glob("*.json"):
            if path.stem.isdigit() and int(path.stem) not in live:
                path.unlink(missing_ok=True)

    def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None,
                step: int | None = None) -> Any:
        """The saved state at `step` (default: latest) laid out like `abstract_state` (ShapeDtypeStructs with
        shardings); restores `data_iterator` in place. Raises CheckpointError naming the step when it cannot be
        read, its params are not finite, or it differs from the digest written when it was saved (a step saved
        before digests existed is only checked for finiteness)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.workdir} has no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax raises many types for unreadable data; say which step and why
            raise CheckpointError(f"checkpoint step {step} in {self.folder} cannot be restored "
                                  f"({type(error).__name__}: {error}); it was left untouched") from error
        state = restored["state"]
        if jax.tree.structure(state) != jax.tree.structure(abstract_state):
            raise CheckpointError(f"checkpoint step {step} holds a different state structure")
        self._verify(step, state)
        return state

    def _verify(self, step: int, state: Any) -> None:
        digest, finite = state_digest(state)
        if not finite:
            raise CheckpointError(f"checkpoint step {step} in {self.folder} holds non-finite params (NaN or inf); "
                                  "refusing it (it was left untouched)")
        path = self.checksums / f"{step}.json"
        if not path.exists():
            return
        saved = json.loads(path.read_text()).get("leaves", {})
        changed = sorted(name for name in set(saved) | set(digest) if saved.get(name) != digest.get(name))
        if changed:
            raise CheckpointError(f"checkpoint step {step} in {self.folder} is corrupt: {len(changed)} leaves differ "
                                  f"from the checksums written when it was saved ({path}), first {changed[0]}; "
                                  "refusing it (it was left untouched)")

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:
            raise CheckpointError(f"saving into {self.folder} failed ({type(error).__name__}: {error})") from error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
