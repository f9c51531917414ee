"""Checkpoints of a training run with orbax's CheckpointManager (async): the TrainState (params, optimizer state,
step, rng) and, when given, the data iterator's state.

A workdir remembers what it trains (`run.json`: the model config and the shapes that must not change). Opening it
with a different config, or restoring a checkpoint that cannot be read, raises `CheckpointError` and touches
nothing, so a good checkpoint is never replaced by a fresh start. Orbax writes each step to a temporary
directory and renames it when complete, so a save interrupted part-way is never listed as a step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from nemojax.config import ModelConfig
from nemojax.errors import CheckpointError

RUN_FILE = "run.json"
__all__ = ["RUN_FILE", "CheckpointError", "Checkpoints", "config_fingerprint", "read_run"]

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
    if not isinstance(model, dict) or not any(name in model for name in ("param_dtype", "quant")):
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


class Checkpoints:
    """Saves and restores a run's state under `workdir/checkpoints`.

    `fingerprint` is a JSON-able dict of what a resumed run must share with the saved one (model config,
    sequence length, ...). Runtime choices such as the step count or learning rate are left out of it on purpose.
    """

    def __init__(self, workdir: str | Path, fingerprint: dict[str, Any], *, keep: int = 3, async_save: bool = True):
        self.workdir = Path(workdir).absolute()  # orbax needs absolute paths
        self.workdir.mkdir(parents=True, exist_ok=True)
        fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples and the like
        run_file = self.workdir / RUN_FILE
        if run_file.exists():
            diffs = _differences(read_run(run_file), fingerprint)
            if diffs:
                raise CheckpointError(f"{self.workdir} holds a run of another configuration; refusing to resume "
                                      "or overwrite it:\n  " + "\n  ".join(diffs))
        else:
            run_file.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None) -> None:
        """Starts an async save of `step`; first raises if the previous async save failed, so a run never trains
        on for long past a checkpoint it did not write."""
        self.manager.check_for_errors()
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None,
                step: int | None = None) -> Any:
        """The saved state at `step` (default: latest) laid out like `abstract_state` (ShapeDtypeStructs with
        shardings); restores `data_iterator` in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.workdir} has no checkpoint to restore")
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax raises many types for unreadable data; say which step and why
            raise CheckpointError(f"checkpoint step {step} in {self.workdir / 'checkpoints'} cannot be restored "
                                  f"({type(error).__name__}: {error}); it was left untouched") from error
        state = restored["state"]
        if jax.tree.structure(state) != jax.tree.structure(abstract_state):
            raise CheckpointError(f"checkpoint step {step} holds a different state structure")
        return state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
