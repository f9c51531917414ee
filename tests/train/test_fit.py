"""The one fit loop (nemojax.train.fit): equal to a plain jitted step loop, exact resume of a plain iterator,
a non-finite loss stops before checkpointing, and distillation / QAD shard over 8 CPU devices and resume
bit-identically (one subprocess: the device count is fixed when jax starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nemojax.errors import CheckpointError
from nemojax.train.fit import NonFiniteLossError, fit
from nemojax.train.metrics import read_metrics
from nemojax.train.step import LossAux, TrainState, make_train_step

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def _batches(count: int = STEPS, poison: int | None = None) -> list[dict[str, np.ndarray]]:
    """Linear-regression batches x [4, 3], y [4, 1]; batch `poison` (0-based) holds a NaN target."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        x = rng.normal(size=(4, 3)).astype(np.float32)
        y = (x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.3).astype(np.float32)
        if i == poison:
            y[0, 0] = np.nan
        out.append({"x": x, "y": y})
    return out


def _loss(params, batch, rng, scale):
    """Mean squared error of x w + b, times a frozen input `scale`; rng adds nothing (kept to check its flow)."""
    pred = batch["x"] @ params["w"] + params["b"]
    loss = scale * jnp.mean((pred - batch["y"]) ** 2) + 0.0 * jax.random.uniform(rng)
    return loss, LossAux({"mse": jnp.mean((pred - batch["y"]) ** 2)}, {})


PARAMS = {"w": np.zeros((3, 1), np.float32), "b": np.zeros((1,), np.float32)}
OPTIMIZER = optax.adam(0.1)


def _fit(params=PARAMS, **options):
    return fit(params, _loss, OPTIMIZER, iter(options.pop("batches", _batches())), STEPS, rng=jax.random.key(3),
               frozen=(jnp.float32(2.0),), **options)


def test_fit_equals_a_plain_step_loop():
    """Without a workdir, fit is the jitted step over the batches, value for value (the oracle is the loop every
    method ran before fit existed), and leaves the caller's params alone."""
    params = jax.tree.map(jnp.asarray, PARAMS)
    result = _fit(params)
    step = jax.jit(make_train_step(OPTIMIZER, _loss))
    state = TrainState(PARAMS, OPTIMIZER.init(PARAMS), jnp.zeros((), jnp.int32), jax.random.key(3))
    losses = []
    for batch in _batches():
        state, metrics = step(state, batch, jnp.float32(2.0))
        losses.append(float(metrics["loss"]))
    assert [m["loss"] for m in result.history] == losses
    assert [m["step"] for m in result.history] == list(range(1, STEPS + 1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(result.state.params), jax.device_get(state.params))
    # it is learning: the params approach the true (w, b) = ([1, -2, 0.5], 0.3) from zero, 2.31 away
    distance = np.linalg.norm(np.r_[np.asarray(result.state.params["w"])[:, 0] - [1, -2, 0.5],
                                    np.asarray(result.state.params["b"]) - 0.3])
    assert result.finished and distance < 0.8 * 2.31
    # the caller's arrays are untouched: the steps donate the state's own buffers, never the input's
    assert not any(x.is_deleted() for x in jax.tree.leaves(params)) and not np.any(np.asarray(params["w"]))


def test_stopped_and_resumed_equals_straight(tmp_path):
    """A plain iterator (no savable state) is fast-forwarded on resume: stop after 2, resume, equals straight."""
    straight = _fit(workdir=tmp_path / "straight")
    first = _fit(workdir=tmp_path / "resumed", stop_after=2)
    assert not first.finished and [m["step"] for m in first.history] == [1, 2]
    resumed = _fit(workdir=tmp_path / "resumed")
    assert resumed.finished and resumed.history == straight.history
    assert [m["step"] for m in resumed.history] == list(range(1, STEPS + 1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state.params),
                 jax.device_get(straight.state.params))
    # a finished run started again does no step and returns the same state
    again = _fit(workdir=tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again.state.params),
                 jax.device_get(straight.state.params))


def test_non_finite_loss_stops_before_checkpointing(tmp_path):
    """Batch 4 (step 4) has a NaN target: the run raises naming step 4, and the newest checkpoint stays step 3."""
    with pytest.raises(NonFiniteLossError, match="loss or its gradient is not finite .* at step 4.*checkpoint "
                                                 "\\(step 3\\)"):
        _fit(batches=_batches(poison=3), workdir=tmp_path, checkpoint_every=1)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2, 3]
    with pytest.raises(NonFiniteLossError, match="at step 4"):  # in memory too
        _fit(batches=_batches(poison=3))


@jax.custom_vjp
def _blows_up_backward(w, flag):
    """Identity forward; backward multiplies the gradient by inf where flag > 0 (a finite loss, an inf gradient)."""
    return w


def _blows_up_fwd(w, flag):
    return w, flag


def _blows_up_bwd(flag, g):
    return g * jnp.where(jnp.max(flag) > 0, jnp.inf, 1.0), jnp.zeros_like(flag)


_blows_up_backward.defvjp(_blows_up_fwd, _blows_up_bwd)


def test_non_finite_gradient_with_a_finite_loss_stops_too(tmp_path):
    """Step 4's loss is finite but its gradient is inf (which would turn Adam's params to NaN): also stopped."""
    batches = _batches()
    for i, batch in enumerate(batches):
        batch["flag"] = np.full((4, 1), float(i == 3), np.float32)

    def loss(params, batch, rng, scale):
        return _loss({**params, "w": _blows_up_backward(params["w"], batch["flag"])}, batch, rng, scale)

    with pytest.raises(NonFiniteLossError, match="gradient is not finite .* at step 4"):
        fit(PARAMS, loss, OPTIMIZER, iter(batches), STEPS, rng=jax.random.key(3), frozen=(jnp.float32(2.0),),
            workdir=tmp_path, checkpoint_every=1)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [1, 2, 3]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # step 4's loss (finite) was not logged


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="ran out after 2 of 6 train steps"):
        _fit(batches=_batches(2))
    with pytest.raises(ValueError, match="stop_after=0 is invalid"):
        _fit(stop_after=0)
    with pytest.raises(ValueError, match="mesh='data' is invalid"):
        _fit(mesh="data")
    _fit(workdir=tmp_path, stop_after=1)
    wider = {"w": np.zeros((3, 2), np.float32), "b": np.zeros((2,), np.float32)}
    message = r"params\.\['w'\]: checkpoint has 'float32\[3, 1\]', config has 'float32\[3, 2\]'"
    with pytest.raises(CheckpointError, match=message):
        fit(wider, _loss, OPTIMIZER, iter(_batches()), STEPS, rng=jax.random.key(3), frozen=(jnp.float32(2.0),),
            workdir=tmp_path)


def test_one_checkpoint_error():
    """Training workdirs and Hugging Face checkpoints raise the same CheckpointError, a ValueError (bad input)."""
    import nemojax
    from nemojax.interop import hf
    from nemojax.train import checkpoint

    assert nemojax.CheckpointError is hf.CheckpointError is checkpoint.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError)


# ----------------------------------------------------------------------------- distill and QAD on 8 devices

# Tolerances of the 8-device (data 2 x fsdp 2 x tensor 2) run against the one-device run, after 3 Adam steps of
# lr = 1e-3. Sharding changes only the order of float32 reductions (gradient all-reduces over data and fsdp,
# partial sums of tensor-parallel matmuls). Adam moves a param by up to lr per step whatever its gradient's size,
# so the params are compared to the total movement lr * steps = 3e-3. Distillation is smooth: measured 6e-7, so
# atol 1e-5 (1/300 of the movement). QAD's fake quantizer rounds to FP4 with per-block scales: a last-bit
# difference can move a value across a rounding boundary, a whole FP4 step; measured 1.1e-5 (4.7e-5 on a
# deeper model), so atol 2e-4 (1/15 of the movement). Losses: the KL of two close distributions is a sum of
# differences of log-probabilities of size log V ~ 4, so its rounding error is absolute, a few float32 ulps of
# 4 (measured 4e-8 on QAD's KL of 1e-4); the distillation KL (~0.1) agrees to 2e-7 relative.
PARAM_ATOL = {"distill": 1e-5, "qad": 2e-4}
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("fit_worker")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}
    process = subprocess.run([sys.executable, "-m", "tests.train.fit_worker", str(workdir)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("subprocess")
@pytest.mark.parametrize("method", ["distill", "qad"])
def test_sharded_equals_one_device_and_resume_is_exact(mesh_runs, method):
    """On 8 devices the method trains like on one (tolerances above); stopped after 1 step and resumed in the
    same workdir it ends bit-identical to the straight 8-device run, params and metrics."""
    assert mesh_runs["devices"] == 8
    run = mesh_runs[method]
    np.testing.assert_allclose(run["mesh_losses"], run["single_losses"], rtol=LOSS_RTOL, atol=LOSS_ATOL)
    assert run["mesh_vs_single_max_abs"] <= PARAM_ATOL[method]
    assert run["moved_max_abs"] > 2e-3  # the params did move (Adam: about lr per step), so equality means something
    assert run["resumed_params_identical"] and run["resumed_history_identical"]
    assert run["resumed_steps"] == [1, 2, 3] and run["checkpoints"] == ["1", "3"]
    if method == "distill":
        assert run["single_losses"][-1] < run["single_losses"][0]
