"""Scanned layer stacks (config.runtime.scan_layers): the plan found in a pattern, the exact params round trip, and
logits and gradients equal to the unrolled stack's (dense, remat, MoE + MTP, packed documents, nested runs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from nemojax import presets
from nemojax.config import ModelConfig
from nemojax.model import Model, forward, forward_with_mtp, logical_axes
from nemojax.models import scan
from nemojax.models.hybrid import NemotronH
from nemojax.models.scan import Run
from nemojax.nn.state import Extend
from nemojax.train import moe_balance

H8B = presets.get("nemotron-h-8b").pattern
# "M", "-", then 2 scan steps of ["*", 2 scan steps of "M"] (a nested run), then "-".
DENSE = presets.get("nemotron-h-8b-tiny", pattern="M-*MM*MM-")
# "M", then 2 scan steps of ["*", 2 scan steps of "EM"] (latent MoE inside the nested run), then "E"; MTP "*E".
MOE_MTP = presets.get("nemotron-3-super-120b-a12b-tiny", pattern="M*EMEM*EMEME")


def test_find_plan_hand_cases() -> None:
    """The plan with the least compile work; hand-checked on the 8B pattern, the tiny twins' and the test ones."""
    # Nemotron-H-8B = "M" + "-M" x 3 + ("*" + "-M" x 5) x 4 + "-": XLA compiles 7 blocks (3 Mamba) instead of 52.
    p = scan.find_plan(H8B)
    assert p == ("M", Run(("-", "M"), 3), Run(("*", Run(("-", "M"), 5)), 4), "-")
    assert "M" + "-M" * 3 + ("*" + "-M" * 5) * 4 + "-" == H8B == "".join(scan.pattern_of(s) for s in p)
    assert scan.compiled_blocks(p) == "M-M*-M-"
    # Only "MM" repeats in the tiny twins' "M-M*-MM-".
    assert scan.find_plan("M-M*-MM-") == ("M", "-", "M", "*", "-", Run(("M",), 2), "-")
    assert scan.find_plan(DENSE.pattern) == ("M", "-", Run(("*", Run(("M",), 2)), 2), "-")
    assert scan.find_plan(MOE_MTP.pattern) == ("M", Run(("*", Run(("E", "M"), 2)), 2), "E")
    assert scan.find_plan("ME*-") is None
    with pytest.raises(ValueError, match="runtime.scan_layers=True is invalid for pattern='ME\\*-'"):
        scan.plan("ME*-")


@pytest.mark.parametrize("config", [DENSE, MOE_MTP], ids=["dense", "moe_mtp"])
def test_round_trip_is_exact_and_matches_the_scanned_module(config: ModelConfig) -> None:
    """unrolled -> scanned -> unrolled gives back every leaf bit for bit; the scanned tree has the shapes the scanned
    module initialises (one leading axis per level of runs); a top-level run's axis is logically `layers`, a nested
    run's unnamed."""
    params = Model.init(config, 0).params
    scanned = scan.to_scanned(config.pattern, params)
    # Both test patterns: layers 1-10 (DENSE: 2-7) are one run whose body is ["*", nested run of 2].
    first = 1 if config is MOE_MTP else 2
    run = scanned[f"layers_scan_{first}"]
    assert {k for k in scanned if k.startswith("layers")} == {"layers_0", f"layers_scan_{first}",
                                                              f"layers_{len(config.pattern) - 1}"} | (
        {"layers_1"} if config is DENSE else set())
    size = 3 if config is DENSE else 5  # one repeat of the outer run's body
    for r in range(2):  # slot_0 of repeat r is the attention layer first + r * size
        np.testing.assert_array_equal(run["slot_0"]["norm"]["scale"][r],
                                      params[f"layers_{first + r * size}"]["norm"]["scale"])
    # scan_1 / slot_0 at (r, q) is layer first + r * size + 1 + q * (size - 1) / 2
    inner = run["scan_1"]["slot_0"]["norm"]["scale"]
    assert inner.shape == (2, 2, config.hidden_size)
    for r in range(2):
        for q in range(2):
            np.testing.assert_array_equal(
                inner[r, q], params[f"layers_{first + r * size + 1 + q * (size - 1) // 2}"]["norm"]["scale"])
    back = scan.to_unrolled(config.pattern, scanned)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    scan_cfg = config.replace(runtime={"scan_layers": True})
    shapes = jax.eval_shape(lambda: Model.init(scan_cfg, 0).params)
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, scanned)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    axes, unrolled_axes = logical_axes(scan_cfg)[f"layers_scan_{first}"], logical_axes(config)
    for specs, layer, depth in ((axes["slot_0"], first, 1), (axes["scan_1"]["slot_0"], first + 1, 2)):
        ref = jax.tree.leaves(unrolled_axes[f"layers_{layer}"], is_leaf=is_spec)
        got = jax.tree.leaves(specs, is_leaf=is_spec)
        assert [tuple(s) for s in got] == [("layers", None)[:depth] + tuple(s) for s in ref]


def test_wrong_layout_is_a_named_error() -> None:
    params = Model.init(DENSE, 0).params
    with pytest.raises(ValueError, match="not in the scanned layout: layers_scan_2 is missing"):
        scan.to_unrolled(DENSE.pattern, params)
    scanned = scan.to_scanned(DENSE.pattern, params)
    with pytest.raises(ValueError, match="not in the unrolled layout"):
        scan.to_scanned(DENSE.pattern, scanned)
    truncated = {**scanned, "layers_scan_2": jax.tree.map(lambda x: x[:1], scanned["layers_scan_2"])}
    with pytest.raises(ValueError, match="layers_scan_2 leaves must have a leading layers axis of 2"):
        scan.to_unrolled(DENSE.pattern, truncated)


def test_scan_layers_option_is_validated() -> None:
    with pytest.raises(ValueError, match="runtime.scan_layers='yes' is invalid: must be one of \\(False, True\\)"):
        DENSE.replace(runtime={"scan_layers": "yes"})
    with pytest.raises(ValueError, match="runtime.scan_layers=True is invalid for pattern='M\\*-'"):
        Model.init(DENSE.replace(pattern="M*-", runtime={"scan_layers": True}), 0)


def _loss_and_grads(config: ModelConfig, params, tokens, segment_ids=None):
    """A loss that weighs every logit (and every MTP logit) differently, and its gradient."""

    def loss(params):
        if config.mtp is None:
            logits, extra = forward(config, params, tokens, segment_ids), []
        else:
            logits, extra = forward_with_mtp(config, params, tokens, segment_ids)
        total = 0.0
        for i, out in enumerate([logits, *extra]):
            weights = jax.random.normal(jax.random.key(10 + i), out.shape)
            total = total + jnp.sum(out * weights)
        return total, (logits, extra)

    return jax.value_and_grad(loss, has_aux=True)(params)


# remat on the packed dense stack, MoE + MTP packed (suite time: two cases cover the three features)
CASES = [(DENSE.replace(runtime={"remat": "full"}), True), (MOE_MTP, True)]


@pytest.mark.parametrize(("config", "packed"), CASES, ids=["dense_remat_packed", "moe_mtp_packed"])
def test_scanned_logits_and_grads_equal_unrolled(config: ModelConfig, packed: bool) -> None:
    """Same params in both layouts: logits (and MTP logits) and every gradient agree to float32 round-off, with
    remat and with packed documents (segment ids broadcast into every scan step)."""
    params = Model.init(config, 3).params
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)
    segment_ids = jnp.asarray([[0] * 7 + [1] * 9, [0] * 12 + [1] * 4]) if packed else None
    (loss, (logits, extra)), grads = _loss_and_grads(config, params, tokens, segment_ids)
    scan_cfg = config.replace(runtime={"scan_layers": True})
    (loss_s, (logits_s, extra_s)), grads_s = _loss_and_grads(scan_cfg, scan.to_scanned(config.pattern, params),
                                                             tokens, segment_ids)
    np.testing.assert_allclose(np.asarray(logits_s), np.asarray(logits), rtol=1e-5, atol=1e-5)
    for a, b in zip(extra_s, extra, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-5)
    expected = scan.to_scanned(config.pattern, grads)
    assert jax.tree.structure(grads_s) == jax.tree.structure(expected)
    for (path, g_s), g in zip(jax.tree_util.tree_leaves_with_path(grads_s), jax.tree.leaves(expected), strict=True):
        scale = float(jnp.max(jnp.abs(g))) + 1e-6
        np.testing.assert_allclose(np.asarray(g_s) / scale, np.asarray(g) / scale, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
    trained = [g for path, g in jax.tree_util.tree_leaves_with_path(grads_s)
               if "e_score_correction_bias" not in jax.tree_util.keystr(path)]  # moved by the balancer, not by grads
    assert min(float(jnp.max(jnp.abs(g))) for g in trained) > 0
    if packed:  # the segment ids reach the scanned layers: without them the logits differ
        unpacked = forward(scan_cfg, scan.to_scanned(config.pattern, params), tokens)
        assert float(jnp.max(jnp.abs(unpacked - logits_s))) > 1e-3


def test_moe_router_statistics_are_stacked_per_layer() -> None:
    """The scanned run sows one [repeats, E] expert load per slot, row r the unrolled layer's load; the balance
    loss and the correction-bias update read them per layer, so both layouts give the same loss and new biases."""
    config = MOE_MTP.replace(mtp=None)
    params = Model.init(config, 0).params
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, config.vocab_size)
    scan_cfg = config.replace(runtime={"scan_layers": True})
    scanned = scan.to_scanned(config.pattern, params)

    @jax.jit
    def stats(params, scanned):
        inter = NemotronH(config).apply({"params": params}, tokens, mutable=["intermediates"])[1]["intermediates"]
        inter_s = NemotronH(scan_cfg).apply({"params": scanned}, tokens, mutable=["intermediates"])[1][
            "intermediates"]
        return inter, inter_s

    inter, inter_s = stats(params, scanned)
    loads, loads_s = moe_balance.expert_loads(inter), moe_balance.expert_loads(inter_s)
    # MoE layers 2, 4 (repeat 0 of the outer run) and 7, 9 (repeat 1): one [2, 2, E] stack; layer 11 unrolled
    stacked = loads_s[("layers_scan_1", "scan_1", "slot_0", "mixer", "gate")]
    assert stacked.shape == (2, 2, config.moe.num_experts)
    for (r, q), layer in {(0, 0): 2, (0, 1): 4, (1, 0): 7, (1, 1): 9}.items():
        np.testing.assert_array_equal(np.asarray(stacked[r, q]), np.asarray(loads[(f"layers_{layer}", "mixer",
                                                                                    "gate")]))
    assert len(loads) == 5 and len(loads_s) == 2
    np.testing.assert_allclose(float(moe_balance.load_balancing_loss(inter_s)),
                               float(moe_balance.load_balancing_loss(inter)), rtol=1e-6)
    updated = moe_balance.update_correction_bias(params, loads, 0.5)
    updated_s = moe_balance.update_correction_bias(scanned, loads_s, 0.5)
    for a, b in zip(jax.tree.leaves(updated_s), jax.tree.leaves(scan.to_scanned(config.pattern, updated)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(updated["layers_9"]["mixer"]["gate"]["e_score_correction_bias"]),
                              np.asarray(params["layers_9"]["mixer"]["gate"]["e_score_correction_bias"]))


def test_decode_refuses_the_scanned_layout() -> None:
    scan_cfg = DENSE.replace(runtime={"scan_layers": True})
    params = scan.to_scanned(DENSE.pattern, Model.init(DENSE, 0).params)
    step = Extend(start=jnp.zeros((1,), jnp.int32), commit=jnp.ones((1,), jnp.int32), fresh=True)
    with pytest.raises(ValueError, match="decoding with caches runs the unrolled one"):
        NemotronH(scan_cfg).apply({"params": params}, jnp.zeros((1, 1), jnp.int32), (None,) * 9, step,
                                  method=NemotronH.extend)
