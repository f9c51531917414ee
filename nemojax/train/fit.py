"""The one fit loop: every training method (LM training, distillation, teacher correction, QAD, QAT) is a loss
function, a params tree and its frozen inputs handed to `fit`, which owns the mesh, the shardings, checkpoints,
resuming, metrics and the progress bar.

    result = fit(params, loss_fn, optimizer, batches, steps=100, rng=jax.random.key(0),
                 frozen=(teacher_params,), mesh={"data": 2, "fsdp": 2, "tensor": 2},
                 shardings=lambda mesh: ..., frozen_shardings=lambda mesh: (...,),
                 workdir="runs/distill", desc="distill")
    result.state.params, result.history

`loss_fn(params, batch, rng, *frozen) -> (loss, LossAux)` is the `nemojax.train.step.LossFn` kind; `frozen` (a
teacher's params, say) are jit arguments, placed once on the mesh by their own shardings and never trained.

With a `workdir` the run writes Orbax checkpoints (the train state, and the data iterator's state when `batches`
is a grain iterator), resumes exactly from the newest one, and appends `{"step", "split": desc, ...}` lines to
workdir/metrics.jsonl. A plain Python iterator of batches cannot save its position, so a resumed run skips the
batches the saved steps used (the iterator must yield the same sequence each time). Without a workdir nothing is
written and the per-step metrics come back in memory. A loss that is not finite stops the run with
`NonFiniteLossError` before any checkpoint of the diverged state is written (or, with `on_nonfinite="skip"`, that
step's update is dropped and counted, and only `max_skipped` bad steps in a row stop the run). A run with a workdir
holds the workdir's lock until it ends, refuses a checkpoints folder it cannot write before its first step, and
verifies each checkpoint it resumes from against the digest written when it was saved (`nemojax.train.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from nemojax.train import sharding
from nemojax.train.checkpoint import Checkpoints, WorkdirLock
from nemojax.train.metrics import MetricsWriter, read_metrics
from nemojax.train.step import LossFn, TrainState, make_train_step

Params = Any
Batch = dict[str, Any]
ShardingsFn = Callable[[Mesh], Any]


class NonFiniteLossError(FloatingPointError):
    """The training loss or its gradient became NaN or infinite; the run stopped without checkpointing the
    diverged state."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a run's arrays live: the mesh and the NamedShardings of the train state, the batch and the frozen
    inputs (a tuple, one sharding tree per frozen input)."""

    mesh: Mesh
    state: TrainState
    batch: NamedSharding
    frozen: tuple = ()


@dataclasses.dataclass
class FitResult:
    """The final train state, the logged metrics (`{"step": s, name: value}` per logged step, oldest first; with
    a workdir, those of every invocation of the run) and whether the run reached its last step."""

    state: TrainState
    history: list[dict[str, float]]
    finished: bool


def resolve_mesh(mesh: Mesh | Mapping[str, int] | None) -> Mesh:
    """A Mesh as given, one built from a layout dict ({"data": 2, "fsdp": 2, "tensor": 2}; see
    `sharding.make_mesh`), or for None the first device alone."""
    if mesh is None:
        return sharding.make_mesh({}, jax.devices()[:1])
    if isinstance(mesh, Mesh):
        return mesh
    if isinstance(mesh, Mapping):
        return sharding.make_mesh(dict(mesh))
    raise ValueError(f"mesh={mesh!r} is invalid: must be None, a jax Mesh or a dict of mesh axis sizes such as "
                     "{'data': 2, 'fsdp': 2, 'tensor': 2}")


def make_layout(mesh: Mesh, optimizer: optax.GradientTransformation, params_shape: Params, params_sharding: Params,
                frozen_sharding: tuple = ()) -> Layout:
    """The Layout of a run whose params (ShapeDtypeStructs or arrays) lie as `params_sharding`: the optimizer
    state mirrors the params (Adam's mu and nu), the step count and rng are replicated, batches split by rows."""
    replicated = sharding.replicated(mesh)
    opt_sharding = sharding.opt_state_shardings(optimizer, params_shape, params_sharding, mesh)
    state = TrainState(params_sharding, opt_sharding, replicated, replicated)
    return Layout(mesh, state, sharding.batch_sharding(mesh), tuple(frozen_sharding))


def jit_step(step_fn: Callable, layout: Layout, *, donate: bool = True) -> Callable:
    """`step_fn(state, batch, *frozen) -> (state, metrics)` jitted for `layout` (metrics replicated); the state's
    buffers are donated (updated in place) unless `donate=False`."""
    return jax.jit(step_fn, in_shardings=(layout.state, layout.batch, *layout.frozen),
                   out_shardings=(layout.state, sharding.replicated(layout.mesh)),
                   donate_argnums=0 if donate else ())


def global_batch(batch: Batch, batch_sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch ([b, L] per field) -> one global array per field laid out by
    `batch_sharding` ([b * process_count, L])."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v)) for k, v in batch.items()}


def _replicated_tree(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: sharding.replicated(mesh), tree)


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: must be a positive integer" + (" or None" if allow_none
                                                                                          else ""))


NONFINITE_POLICIES = ("stop", "skip")


def new_guard() -> dict[str, jax.Array]:
    """The divergence watch `_guarded` carries between steps (int32 scalars, kept on device): `bad`, 0 or the step
    (1-based) where the run must stop; `run`, non-finite steps in a row; `skipped`, skipped steps in all."""
    return {name: jnp.zeros((), jnp.int32) for name in ("bad", "run", "skipped")}  # distinct buffers: donated


def _guarded(step_fn: Callable, on_nonfinite: str = "stop", max_skipped: int = 10) -> Callable:
    """step_fn with a divergence watch (`new_guard`). A step is bad when its loss or gradient norm is not finite (a
    non-finite gradient with a finite loss still turns the params to NaN: Adam's inf / inf).

    on_nonfinite="stop": `bad` becomes the first bad step (the host raises at its next sync, before any checkpoint).
    "skip": a bad step leaves the params and optimizer state as they were (the step count and rng advance, since its
    batch was used, so a resume stays aligned with the data); `bad` is set when `max_skipped` steps in a row were
    bad. The watch stays on device, so the host reads it only when it syncs anyway."""
    skip = on_nonfinite == "skip"

    def step(state: TrainState, batch: Batch, guard: dict, *frozen: Any) -> tuple[TrainState, dict, dict]:
        new_state, metrics = step_fn(state, batch, *frozen)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics.get("grad_norm", 0.0))
        run = jnp.where(finite, 0, guard["run"] + 1)
        if skip:
            kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (new_state.params, new_state.opt_state),
                                (state.params, state.opt_state))
            new_state = dataclasses.replace(new_state, params=kept[0], opt_state=kept[1])
            trips = run >= max_skipped
        else:
            trips = ~finite
        bad = jnp.where((guard["bad"] == 0) & trips, new_state.step, guard["bad"])
        skipped = guard["skipped"] + (~finite).astype(jnp.int32)
        return new_state, metrics, {"bad": bad, "run": run, "skipped": skipped}

    return step


def _default_fingerprint(desc: str, params_shape: Params) -> dict[str, Any]:
    """What a workdir must match when no fingerprint is given: the method and every param's dtype and shape."""
    leaves = jax.tree_util.tree_flatten_with_path(params_shape)[0]
    return {"method": desc,
            "params": {jax.tree_util.keystr(path): f"{leaf.dtype}{list(leaf.shape)}" for path, leaf in leaves}}


def fit(params: Params | Callable[[], Params], loss_fn: LossFn, optimizer: optax.GradientTransformation,
        batches: Iterator[Batch], steps: int, *, rng: jax.Array, frozen: tuple = (),
        mesh: Mesh | Mapping[str, int] | None = None, shardings: ShardingsFn | None = None,
        frozen_shardings: ShardingsFn | None = None, workdir: str | Path | None = None,
        fingerprint: dict[str, Any] | None = None, stop_after: int | None = None, desc: str = "train",
        progress: bool = False, grad_accum: int = 1, moe_bias_rate: float = 0.0, log_every: int = 1,
        checkpoint_every: int | None = None, keep_checkpoints: int = 3, on_nonfinite: str = "stop",
        max_skipped: int = 10, prepare: Callable[[Any], Batch] | None = None,
        on_log: Callable[[int, dict[str, float], float], dict[str, float]] | None = None,
        evaluate: Callable[[int, Params], dict[str, float] | None] | None = None) -> FitResult:
    """Runs `steps` optimizer steps of `loss_fn` from `params` (resuming from `workdir`'s newest checkpoint).

    params: the initial params pytree (left unchanged), or a function of no arguments that builds it (run under
      jit straight into its shardings, so a large model is never materialised on one device).
    loss_fn: `loss_fn(params, batch, rng, *frozen) -> (loss, LossAux)`; `rng` is the step's key.
    batches: this process's rows of each batch ({"tokens", "targets", "loss_mask", ...} [b, L]); `prepare`
      (optional) checks or converts each one first. Running out before `steps` raises ValueError.
    rng: the train state's key (split each step). frozen: extra jit inputs of the loss, not trained.
    mesh: None (one device), a Mesh, or a layout dict for `sharding.make_mesh`. shardings(mesh): the params'
      NamedSharding tree (default: replicated); frozen_shardings(mesh): a tuple of trees, one per frozen input.
    workdir: checkpoints, run.json (`fingerprint`, default: the method and the param shapes), metrics.jsonl and
      TensorBoard scalars under it; None keeps everything in memory. stop_after: end this invocation after that
      many steps (a checkpoint is written first), as `nemojax train --stop-after` does.
    desc: the method's name, on the progress bar and as the metrics' split. log_every: steps between logged
      metrics (and host syncs). checkpoint_every: steps between checkpoints (None: only at the end and on stop).
    on_nonfinite: "stop" (a non-finite loss or gradient ends the run) or "skip" (that step's update is dropped and
      counted in the logged metric "skipped_steps"; `max_skipped` bad steps in a row end the run).
    keep_checkpoints: how many checkpoints to keep (>= 1). With a workdir the run holds its lock (workdir/lock.json,
      `WorkdirLock`) from start to end, so a second job on the same workdir is refused.
    on_log(step, metrics, steps_per_second) -> metrics: adds derived metrics before they are logged.
    evaluate(step, params) -> metrics or None: run after each step; a dict is logged as split "validation" (and
      its "loss" printed).

    Returns a FitResult. Raises NonFiniteLossError when a loss is NaN or infinite (or, skipping, too many in a row;
    no checkpoint is written from that step on), ValueError for bad arguments, and `CheckpointError` for a workdir
    of another run, a corrupt checkpoint or one that cannot be written (`WorkdirLockedError`: a workdir in use).
    """
    _check_positive("steps", steps)
    _check_positive("stop_after", stop_after, allow_none=True)
    _check_positive("log_every", log_every)
    _check_positive("checkpoint_every", checkpoint_every, allow_none=True)
    _check_positive("keep_checkpoints", keep_checkpoints)
    _check_positive("max_skipped", max_skipped)
    if on_nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"on_nonfinite={on_nonfinite!r} is invalid: must be one of {NONFINITE_POLICIES}")
    frozen = tuple(frozen)
    mesh = resolve_mesh(mesh)
    build_params = params if callable(params) else None
    params_shape = jax.eval_shape(build_params) if build_params else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), params)
    params_sharding = shardings(mesh) if shardings else _replicated_tree(params_shape, mesh)
    frozen_sharding = tuple(frozen_shardings(mesh)) if frozen_shardings else tuple(
        _replicated_tree(f, mesh) for f in frozen)
    if len(frozen_sharding) != len(frozen):
        raise ValueError(f"frozen_shardings gave {len(frozen_sharding)} sharding trees for {len(frozen)} frozen "
                         "inputs: must give one per frozen input")
    layout = make_layout(mesh, optimizer, params_shape, params_sharding, frozen_sharding)
    step_fn = _guarded(make_train_step(optimizer, loss_fn, grad_accum=grad_accum, moe_bias_rate=moe_bias_rate),
                       on_nonfinite, max_skipped)
    replicated = sharding.replicated(mesh)
    step = jax.jit(step_fn, in_shardings=(layout.state, layout.batch, replicated, *layout.frozen),
                   out_shardings=(layout.state, replicated, replicated), donate_argnums=(0, 2))

    def new_state(p: Params, key: jax.Array) -> TrainState:
        return TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32), key)

    if build_params:
        init = jax.jit(lambda key: new_state(build_params(), key), out_shardings=layout.state)
    else:
        # The caller's arrays go in as arguments (not constants); jit's outputs are fresh buffers, so donating the
        # state in the steps never touches them.
        init = jax.jit(new_state, in_shardings=(layout.state.params, replicated), out_shardings=layout.state)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  jax.eval_shape(new_state, params_shape, rng), layout.state)
    savable_data = batches if isinstance(batches, grain.DatasetIterator) else None
    checkpoints = writer = lock = None
    history: list[dict[str, float]] = []
    try:
        if workdir is not None:
            workdir = Path(workdir)
            lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
            checkpoints = Checkpoints(workdir, fingerprint or _default_fingerprint(desc, params_shape),
                                      keep=keep_checkpoints)
            checkpoints.check_writable()
            writer = MetricsWriter(workdir)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
            if checkpoints is not None and checkpoints.latest_step() is not None:
                state = checkpoints.restore(abstract_state, savable_data)
                start = int(state.step)
                if savable_data is None:
                    _skip(batches, start, steps, desc)
            else:
                state = init(rng) if build_params else init(jax.device_put(params, layout.state.params), rng)
                start = 0
            frozen = jax.device_put(frozen, layout.frozen)
            end = steps if stop_after is None else min(steps, start + stop_after)
            guard = new_guard()
            bar = tqdm(total=steps, initial=start, desc=desc, unit="step",
                       disable=not progress or jax.process_index() != 0)
            last_time, last_step = time.perf_counter(), start
            for done in range(start + 1, end + 1):
                batch = _next(batches, done - 1, steps, desc)
                state, metrics, guard = step(state, global_batch(prepare(batch) if prepare else batch, layout.batch),
                                             guard, *frozen)
                if done % log_every == 0 or done == end:
                    _raise_if_diverged(guard, desc, checkpoints, on_nonfinite, max_skipped)
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if on_nonfinite == "skip":
                        metrics["skipped_steps"] = float(jax.device_get(guard["skipped"]))
                    if on_log:
                        now = time.perf_counter()
                        metrics = on_log(done, metrics, (done - last_step) / max(now - last_time, 1e-9))
                        last_time, last_step = now, done
                    history.append({"step": done, **metrics})
                    if writer is not None:
                        writer.write(done, desc, metrics)
                    postfix = {"loss": f"{metrics['loss']:.3f}"}
                    if "tokens_per_s" in metrics:
                        postfix["tok_s"] = f"{metrics['tokens_per_s']:.0f}"
                    bar.set_postfix(postfix)
                if evaluate is not None:
                    results = evaluate(done, state.params)
                    if results is not None:
                        if writer is not None:
                            writer.write(done, "validation", results)
                        if "loss" in results and jax.process_index() == 0:  # above the bar, which would hide it
                            tqdm.write(f"step {done}: validation loss {results['loss']:.4f}")
                        last_time, last_step = time.perf_counter(), done  # steps/s counts training only
                if checkpoints is not None and ((checkpoint_every and done % checkpoint_every == 0) or done == end):
                    _raise_if_diverged(guard, desc, checkpoints, on_nonfinite, max_skipped)
                    checkpoints.save(done, state, savable_data)
                    last_time, last_step = time.perf_counter(), done
                bar.update(1)
            bar.close()
            if checkpoints is not None:
                checkpoints.wait()
                if end < steps:
                    print(f"stopped at step {end} of {steps}; checkpoint saved, run again to resume", flush=True)
    finally:
        try:
            if checkpoints is not None:
                checkpoints.close()
            if writer is not None:
                writer.close()
        finally:
            if lock is not None:
                lock.release()
    if workdir is not None:
        history = _logged(workdir, desc)
    return FitResult(state, history, end == steps)


def _next(batches: Iterator[Batch], used: int, steps: int, desc: str) -> Batch:
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"data ran out after {used} of {steps} {desc} steps") from None


def _skip(batches: Iterator[Batch], count: int, steps: int, desc: str) -> None:
    """Advances a plain iterator past the batches that `count` saved steps consumed."""
    for used in range(count):
        _next(batches, used, steps, desc)


def _raise_if_diverged(guard: dict[str, jax.Array], desc: str, checkpoints: Checkpoints | None,
                       on_nonfinite: str = "stop", max_skipped: int = 10) -> None:
    first = int(jax.device_get(guard["bad"]))
    if first:
        kept = checkpoints.latest_step() if checkpoints is not None else None
        where = f"; the newest checkpoint (step {kept}) is left as it was" if kept is not None else ""
        what = (f"at step {first}" if on_nonfinite == "stop" else
                f"at {max_skipped} steps in a row up to step {first} (train.max_skipped={max_skipped}; each was "
                "skipped)")
        raise NonFiniteLossError(f"{desc}: the loss or its gradient is not finite (NaN or inf) {what}; "
                                 f"stopped without checkpointing the diverged state{where}. Lower the learning "
                                 "rate or check the data and the initial params")


def _logged(workdir: Path, split: str) -> list[dict[str, float]]:
    """The workdir's metrics of `split`, one per step (a step logged again after a resume keeps its last line)."""
    by_step = {}
    for record in read_metrics(workdir):
        if record["split"] == split:
            by_step[record["step"]] = {k: v for k, v in record.items() if k != "split"}
    return [by_step[s] for s in sorted(by_step)]
