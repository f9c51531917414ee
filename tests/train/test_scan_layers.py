"""The trainer with model.runtime.scan_layers: same initial weights, losses and updates as the unrolled run, stacked
params sharded with an unsharded leading `layers` axis, unrolled Models handed back, a workdir that remembers its
layout; and the persistent compilation cache (train.compilation_cache_dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec

from nemojax import config_files
from nemojax.errors import CheckpointError
from nemojax.model import abstract_params
from nemojax.train import loop, sharding

ROOT = Path(__file__).resolve().parents[2]
B, L = 4, 16
# The Super twin (latent MoE + MTP head) on a pattern whose scan step holds Mamba, MoE and attention: prefix "M",
# two steps of "EM*", suffix "E". MTP loss, MoE balance loss and bias update, packed documents and gradient
# accumulation all on, so every path of the step sees the stacked layout.
NESTED = "M-*MM*MM-"  # "M", "-", 2 x ["*", 2 x "M"], "-"
MOE_OVERRIDES = ["model.preset=nemotron-3-super-120b-a12b-tiny", "model.overrides.pattern=MEM*EM*E",
                 "train.moe_aux_loss=0.01", "train.moe_bias_rate=0.01", "train.document_mask=True",
                 "train.grad_accum=2", "optimizer.warmup_steps=1"]


def _config(*overrides: str, mtp_loss_weight: float = 0.0):
    config = config_files.load(ROOT / "configs" / "tiny.py", list(overrides))
    config.train.mtp_loss_weight = mtp_loss_weight  # not a field of configs/tiny.py
    return config


def _batch(vocab: int, seed: int) -> dict[str, jax.Array]:
    tokens = np.random.default_rng(seed).integers(0, vocab, (B, L + 1)).astype(np.int32)
    segments = np.zeros((B, L), np.int32)
    segments[:, 6:] = 1
    segments[::2, 11:] = 2
    return {"tokens": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.ones((B, L), jnp.float32), "segment_ids": jnp.asarray(segments)}


def _two_steps(config) -> tuple[list[dict], object, loop.Run]:
    run = loop.build(config, devices=jax.devices()[:1])
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.RULES):
        state = run.init(jax.random.PRNGKey(0))
        init = jax.device_get(loop.as_model(run.model_config, state.params))  # the step donates the state
        metrics = []
        for seed in range(2):
            state, m = run.step(state, _batch(run.model_config.vocab_size, seed))
            metrics.append({k: float(v) for k, v in m.items()})
    return metrics, init, loop.as_model(run.model_config, state.params)


def test_scanned_train_steps_equal_unrolled():
    """Two AdamW steps from one seed: identical initial weights, every metric of both steps (loss, MTP and balance
    losses, grad norm) equal to float32 round-off, and the updated params (unrolled back) equal."""
    metrics, init, final = _two_steps(_config(*MOE_OVERRIDES, mtp_loss_weight=0.3))
    metrics_s, init_s, final_s = _two_steps(_config(*MOE_OVERRIDES, "model.runtime.scan_layers=True",
                                                    mtp_loss_weight=0.3))
    assert init_s.config == init.config and not init_s.config.runtime.scan_layers
    for a, b in zip(jax.tree.leaves(init_s.params), jax.tree.leaves(init.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert {"loss", "mtp_nll", "moe_balance", "grad_norm"} <= set(metrics[0])
    for m_s, m in zip(metrics_s, metrics, strict=True):
        assert m_s.keys() == m.keys()
        for key in m:
            np.testing.assert_allclose(m_s[key], m[key], rtol=2e-5, err_msg=key)
    assert metrics[1]["loss"] != metrics[0]["loss"]
    # Adam divides each gradient element by its own RMS, so float32 round-off in a near-zero element moves that
    # element's update by a visible fraction of lr = 3e-3 (seen: 1.1e-5 in 1 of 8192); 5e-5 is 1.7% of lr.
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(final_s.params), jax.tree.leaves(final.params),
                            strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5,
                                   err_msg=jax.tree_util.keystr(path))
    # layer 4 (slot_2 of the run's repeat 0): its correction bias starts at 0 and the aux-loss-free update moved it
    assert float(jnp.max(jnp.abs(final_s.params["layers_4"]["mixer"]["gate"]["e_score_correction_bias"]))) > 0


def test_stacked_params_have_unsharded_layers_axes():
    """On an fsdp 4 x tensor 2 mesh each stacked leaf is sharded like its unrolled layer, with every stacked axis
    (one per level of runs) unsharded."""
    config = loop.model_config(_config(f"model.overrides.pattern={NESTED}", "model.runtime.scan_layers=True"))
    mesh = AbstractMesh((1, 4, 2, 1), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    stacked = sharding.param_shardings(config, mesh, abstract_params(config))
    unrolled_config = config.replace(runtime={"scan_layers": False})
    unrolled = sharding.param_shardings(unrolled_config, mesh, abstract_params(unrolled_config))
    specs = lambda tree: [s.spec for s in jax.tree.leaves(tree)]  # noqa: E731
    run = stacked["layers_scan_2"]  # layers 2-7: 2 x ["*", 2 x "M"]
    for tree, layer, depth in ((run["slot_0"], 2, 1), (run["scan_1"]["slot_0"], 3, 2)):
        expected = [PartitionSpec(*(None,) * depth, *spec) for spec in specs(unrolled[f"layers_{layer}"])]
        assert specs(tree) == expected
        assert any("tensor" in str(spec) for spec in expected) and any("fsdp" in str(spec) for spec in expected)


def test_train_hands_back_unrolled_models_and_the_workdir_keeps_its_layout(tmp_path):
    """train() and restore_model() return the unrolled, checkpoint-named Model; the workdir records the scanned
    layout, so resuming it with scan_layers off is refused, naming the difference."""
    overrides = [f"model.overrides.pattern={NESTED}", "train.steps=2", "optimizer.warmup_steps=1",
                 "train.checkpoint_every=2", "train.eval_every=100", "train.log_every=1"]
    config = _config(*overrides, "model.runtime.scan_layers=True")
    out = loop.train(config, tmp_path, progress=False)
    model = out["model"]
    assert not model.config.runtime.scan_layers and f"layers_{len(model.config.pattern) - 1}" in model.params
    assert "layers_scan_2" in out["state"].params  # the train state itself stays stacked
    restored = loop.restore_model(config, tmp_path)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="params_layout: checkpoint has 'scanned', config has None"):
        loop.train(_config(*overrides, "train.steps=3"), tmp_path, progress=False)


@pytest.mark.xdist_group("subprocess")
def test_compilation_cache_dir_stores_and_reuses_the_step(tmp_path):
    """With train.compilation_cache_dir the first process's compiled step lands in the directory, and a second
    process that builds the same step loads it from there: jax reports a persistent-cache hit only then."""
    cache = tmp_path / "xla_cache"

    def compile_step() -> int:
        process = subprocess.run([sys.executable, "-m", "tests.train.compile_cache_worker", str(cache)], cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                 timeout=600)
        assert process.returncode == 0, process.stderr[-3000:]
        return json.loads(process.stdout.strip().splitlines()[-1])["cache_hits"]

    assert compile_step() == 0
    assert cache.is_dir() and any(cache.iterdir())
    assert compile_step() > 0
