"""The elastic experiment, benchmark and notebook at test scale: experiments/elastic_nested.py --tiny and
experiments/bench_elastic.py --tiny run end to end and write what they document; the claims are judged by the
rule their docstring states; notebooks/elastic.py runs at tiny scale and its .ipynb is the executed pair of its .py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import numpy as np
import pytest

import nemojax
from nemojax import config_files, elastic
from nemojax.train.loop import model_config

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str):
    path = ROOT / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nested():
    return _module("elastic_nested")


# ------------------------------------------------------------------------------------- experiments/elastic_nested


@pytest.mark.parametrize("tiny", [True, False])
def test_every_method_gets_the_same_tokens(nested, tiny):
    s = nested.settings(tiny, None)
    two_stage = sum(nested.tokens_per_step(s, "elastic two-stage"))
    assert two_stage == sum(nested.tokens_per_step(s, "elastic stage 1 only")) == s["tokens"]
    assert 2 * sum(nested.tokens_per_step(s, "separate")) == s["tokens"]  # two separate models share the budget
    assert s["stage2_seq_len"] == 2 * s["seq_len"]
    with pytest.raises(SystemExit, match="multiple of 4"):
        nested.settings(tiny, 6)


def _report(two: tuple, one: tuple, separate: tuple, nested_bytes: int = 10, separate_bytes: int = 20) -> dict:
    keys = ("1", "0.75", "0.5")
    own = {k: {"fraction": float(k), "val_loss": 9.0} for k in keys}
    return {"loss": {"elastic two-stage": dict(zip(keys, two, strict=True)),
                     "elastic stage 1 only": dict(zip(keys, one, strict=True)),
                     "separate": dict(zip(keys, separate, strict=True))},
            "submodels": {"elastic stage 1 only": own}, "teacher": {"val_loss": separate[0]},
            "checkpoint": {"nested_bytes": nested_bytes, "separate_bytes": separate_bytes, "router_bytes": 1}}


def test_the_claims_are_judged_as_documented(nested):
    held = {v["claim"]: v["held"] for v in nested.verdicts(_report(
        two=(1.00, 1.50, 2.00), one=(1.01, 1.60, 2.10), separate=(0.99, 1.52, 1.97)))}
    # 2.00 is 1.5% above 1.97 (within 2%): nested matches; two-stage below stage-1-only everywhere
    assert held == {"1": True, "2": True, "3": True, "4": True}
    held = {v["claim"]: v["held"] for v in nested.verdicts(_report(
        two=(1.02, 1.50, 2.02), one=(1.01, 1.40, 2.10), separate=(0.99, 1.52, 1.97), nested_bytes=30))}
    # 2.02 is 2.5% above 1.97; 0.75 is worse after stage 2; the full model is worse; the nested folder is larger
    assert held == {"1": False, "2": False, "3": False, "4": False}


@pytest.mark.slow
def test_elastic_nested_runs_at_tiny_scale(nested, tmp_path):
    report = nested.main(["--tiny", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "out" / "en")])

    for ext in (".json", ".md", ".png"):
        assert (tmp_path / "out" / f"en{ext}").stat().st_size > 1000, ext
    assert json.loads((tmp_path / "out" / "en.json").read_text())["claims"] == report["claims"]
    teacher = report["teacher"]
    assert teacher["pattern"] == nested.TINY_PATTERN
    loss = report["loss"]
    assert set(loss) == set(nested.ARMS)
    assert all(set(v) == {"1", "0.75", "0.5"} and all(np.isfinite(list(v.values()))) for v in loss.values())
    assert loss["separate"]["1"] == loss["zero-shot"]["1"] == teacher["val_loss"]  # the separate full model
    sizes = report["submodels"]["elastic two-stage"]
    for k, sub in sizes.items():  # (a few tiny steps do not make the routers meet their budgets: not asserted)
        assert sub["params"] <= teacher["params"] and sub["fraction"] == sub["params"] / teacher["params"]
        separate = json.loads((Path(report["checkpoint"]["separate_dir"]) / f"budget_{k}" / "config.json").read_text())
        assert separate["hidden_size"] == sub["sizes"]["hidden"]  # the separate model has the two-stage sizes
    assert loss["elastic two-stage"] == {k: v["val_loss"] for k, v in sizes.items()}
    own = report["submodels"]["elastic stage 1 only"]
    for k in ("1", "0.75", "0.5"):  # the stage-1-only run is scored at the two-stage sizes, and at its own choice
        assert (own[k]["sizes"] != sizes[k]) or loss["elastic stage 1 only"][k] == own[k]["val_loss"]
    for k in ("0.75", "0.5"):
        # the elastic starting point is the pruned model up to the Mamba head order: close, not always equal
        assert report["zero_shot_elastic_start"][k] == pytest.approx(loss["zero-shot"][k], rel=0.1)
    c = report["checkpoint"]
    # one nested checkpoint = the full model's save_hf files + the routers + elastic.json
    meta = (Path(c["nested_dir"]) / "elastic.json").stat().st_size
    assert c["nested_bytes"] == c["separate_per_budget"]["1"] + c["router_bytes"] + meta
    assert c["nested_bytes"] < c["separate_bytes"]
    assert [v["claim"] for v in report["claims"]] == ["1", "2", "3", "4"]
    assert "| (4) | YES |" in (tmp_path / "out" / "en.md").read_text()


# ------------------------------------------------------------------------------------- experiments/bench_elastic


def test_nearest_sizes_picks_the_full_model_and_the_closest_half():
    bench = _module("bench_elastic")
    config = model_config(config_files.load(ROOT / "configs" / "tiny.py", []))
    choices = elastic.default_choices(config)
    full = nemojax.param_count(config)
    assert bench.nearest_sizes(config, choices, 1.0) == {a: v[0] for a, v in choices.items()}
    half = bench.nearest_sizes(config, choices, 0.5)
    assert abs(elastic.count_exact(config, half) / full - 0.5) < 0.01  # the space has a submodel within 1%


@pytest.mark.slow
def test_bench_elastic_runs_at_tiny_scale(tmp_path):
    bench = _module("bench_elastic")
    report = bench.main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "bench.json")])

    assert json.loads((tmp_path / "bench.json").read_text())["shapes"] == report["shapes"]
    assert report["env"]["cpu"] and report["model"]["sizes"]["1"] == {
        a: v[0] for a, v in elastic.default_choices(model_config(config_files.load(ROOT / "configs" / "tiny.py",
                                                                                     []))).items()}
    (shape,) = report["shapes"]
    assert (shape["batch"], shape["seq"]) == (2, 64)
    assert max(shape["logits_rel_err_masked_vs_extracted"].values()) < 1e-5
    assert shape["params"]["0.5"] < shape["params"]["0.75"] < shape["params"]["1"] == report["model"]["params"]
    assert shape["ratio_to_plain"]["plain"] == 1.0
    for name in ("masked 1", "masked 0.75", "masked 0.5", "extracted 0.5"):
        assert shape["median_s"][name] > 0
    assert shape["masked_worst_ratio"] == max(shape["ratio_to_plain"][f"masked {b}"] for b in ("1", "0.75", "0.5"))


# ------------------------------------------------------------------------------------------- notebooks/elastic


NOTEBOOKS = ROOT / "notebooks"


def test_elastic_ipynb_is_the_executed_pair_of_its_py():
    py, ipynb = jupytext.read(NOTEBOOKS / "elastic.py"), jupytext.read(NOTEBOOKS / "elastic.ipynb")
    cells = [(c.cell_type, c.source.strip()) for c in py.cells]
    assert [(c.cell_type, c.source.strip()) for c in ipynb.cells] == cells, \
        "notebooks/elastic.ipynb is stale: run python notebooks/execute.py notebooks/elastic.py"
    code = [c for c in ipynb.cells if c.cell_type == "code"]
    assert [c.get("execution_count") for c in code] == list(range(1, len(code) + 1))
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "QUICK=False" in text, "notebooks/elastic.ipynb holds a test-scale run"
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) >= 6


@pytest.mark.slow
def test_elastic_notebook_runs_at_tiny_scale(tmp_path):
    env = dict(os.environ, NEMOJAX_NOTEBOOK_QUICK="1", NEMOJAX_NOTEBOOK_OUT=str(tmp_path), MPLBACKEND="Agg",
               JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / "elastic.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    out = tmp_path / "quick"
    for figure in ("permutation", "search_space", "training", "router_choices", "nested_loss", "checkpoint_bytes"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    results = json.loads((out / "results.json").read_text())
    params = results["params"]
    assert params["0.5"] < params["0.75"] <= params["1"] == params["teacher"]
    assert results["tokens"]["separate_0.5"] * 2 == results["tokens"]["elastic"]
    bytes_ = results["checkpoint_bytes"]
    assert bytes_["nested"] < sum(bytes_["separate"].values())
    loss = results["validation_loss"]
    assert loss["zero_shot"]["1"] == pytest.approx(loss["teacher"], rel=1e-5)  # masked at full size: float rounding
    assert loss["nested"]["0.5"] < loss["zero_shot"]["0.5"]  # elastic distillation recovers the pruned model
