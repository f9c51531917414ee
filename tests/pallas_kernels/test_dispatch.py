"""The kernel dispatcher (pallas_kernels.dispatch) and the Pallas decode step wired into the Mamba mixer."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemojax
from nemojax.nn import mamba2
from pallas_kernels import dispatch
from tests.decoding import prefill_then_decode


def test_resolve(monkeypatch):
    assert dispatch.resolve("ssd_update", "xla") == "xla"
    assert dispatch.resolve("ssd_update", "pallas", backend="cpu") == "pallas"
    # "auto" takes the kernel only where it has been validated on the device
    monkeypatch.setitem(dispatch.VALIDATED, "ssd_update", {"gpu": "pallas"})
    assert dispatch.resolve("ssd_update", "auto", backend="gpu") == "pallas"
    assert dispatch.resolve("ssd_update", "auto", backend="cpu") == "xla"
    assert dispatch.interpret("cpu") and not dispatch.interpret("gpu")
    with pytest.raises(ValueError, match="impl='triton' is invalid"):
        dispatch.resolve("ssd_update", "triton")
    with pytest.raises(ValueError, match="op='conv' is invalid"):
        dispatch.resolve("conv", "xla")
    with pytest.raises(ValueError, match="runtime.mamba_decode_impl"):
        nemojax.presets.get("nemotron-h-8b-tiny", runtime={"mamba_decode_impl": "cuda"})


RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"


def _baseline_impl(baseline: str) -> str:
    return "cudnn" if "cudnn" in baseline else "xla" if "xla" in baseline.lower() else baseline


def _recorded_times() -> dict[tuple[str, str, str], dict[str, float]]:
    """(op, backend, shape) -> {implementation: ms} from every recorded bench JSON: each row times its kernel
    (`impl`, "pallas" in older files) against a baseline on the same inputs."""
    times: dict[tuple[str, str, str], dict[str, float]] = {}
    for path in RESULTS.glob("*.json"):
        run = json.loads(path.read_text())
        for r in run["rows"]:
            if "error" in r or r.get("quick"):
                continue
            entry = times.setdefault((r["op"], run["backend"], r["shape"]), {})
            entry[r.get("impl", "pallas")] = r["kernel_ms"]
            entry[_baseline_impl(r["baseline"])] = r["ref_ms"]
    return times


def test_validated_entries_rest_on_recorded_runs():
    """Every "auto" choice in dispatch.VALIDATED was measured on that backend in a committed run, and beat XLA at
    every shape measured there."""
    times = _recorded_times()
    for op, choices in dispatch.VALIDATED.items():
        for backend, impl in choices.items():
            measured = [t for (o, bk, _), t in times.items() if o == op and bk == backend and impl in t and "xla" in t]
            assert measured, f"{op} on {backend}: no recorded run times {impl!r} against XLA"
            for t in measured:
                assert t[impl] < t["xla"], (op, backend, t)


def test_attention_auto_picks_per_case(monkeypatch):
    """"auto" attention: the validated choice for plain and for packed sequences, cuDNN only where it takes the
    queries (bf16/f16, head_dim <= 128 in steps of 8), XLA on a backend nobody validated."""
    from nemojax.nn.attention import attention_impl

    monkeypatch.setitem(dispatch.VALIDATED, "attention", {"gpu": "cudnn"})
    monkeypatch.setitem(dispatch.VALIDATED, "attention_packed", {"gpu": "pallas"})
    q = jnp.zeros((1, 8, 4, 128), jnp.bfloat16)
    assert attention_impl("auto", q, packed=False, backend="gpu") == "cudnn"
    assert attention_impl("auto", q, packed=True, backend="gpu") == "pallas"
    assert attention_impl("auto", q.astype(jnp.float32), packed=False, backend="gpu") == "xla"
    assert attention_impl("auto", jnp.zeros((1, 8, 4, 256), jnp.bfloat16), packed=False, backend="gpu") == "xla"
    assert attention_impl("auto", q, packed=False, backend="tpu") == "xla"
    assert attention_impl("pallas", q, packed=False, backend="gpu") == "pallas"  # an explicit setting is kept


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pallas_decode_step_equals_xla(dtype, monkeypatch):
    """Prefill, then 3 decode steps with runtime.mamba_decode_impl="pallas" (interpreted on CPU) vs "xla": the same
    logits and the same SSM state (float32: 1e-5; bfloat16 compute: both paths read the same bf16 B, C)."""
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*M", runtime={"dtype": dtype})
    model = nemojax.Model.init(config, 0)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 260)
    traced = []
    kernel = mamba2.ssd_update
    monkeypatch.setattr(mamba2, "ssd_update", lambda *a, **k: traced.append(1) or kernel(*a, **k))
    runs = {impl: prefill_then_decode(config.replace(runtime={"mamba_decode_impl": impl}), model.params, tokens, (8, 5),
                                      steps=3, max_len=16) for impl in ("xla", "pallas")}
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(runs["pallas"][0], runs["xla"][0], rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(runs["pallas"][1]), jax.tree.leaves(runs["xla"][1]), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    assert np.abs(runs["xla"][0][1:] - runs["xla"][0][:1]).max() > 1e-3  # the steps did something
    assert traced  # the "pallas" run went through the kernel (both Mamba layers, traced once)


def test_compiler_params_pick_triton_on_gpu_only():
    """A pallas_call without params is lowered by Mosaic GPU on this JAX; the kernels here are written for Triton,
    so on "gpu" they pass Triton params, and none elsewhere (TPU refuses GPU params)."""
    from jax.experimental.pallas import triton as pltriton

    params = dispatch.compiler_params("gpu", num_warps=8)
    assert isinstance(params, pltriton.CompilerParams) and params.num_warps == 8
    assert dispatch.compiler_params("tpu") is None and dispatch.compiler_params("cpu") is None
    assert dispatch.resolve("attention", "cudnn") == "cudnn"
    with pytest.raises(ValueError, match="impl='cudnn' is invalid for ssd_scan"):
        dispatch.resolve("ssd_scan", "cudnn")
