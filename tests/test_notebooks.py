"""The notebooks: each paired .ipynb matches its jupytext .py and holds the outputs of a run at the documented
scale (`make notebooks`), and each notebook executes at test scale.

Notebooks read NEMOJAX_NOTEBOOK_QUICK=1 (tiny scale) and NEMOJAX_NOTEBOOK_OUT (where they write); they run as
plain Python scripts in a subprocess, so a failing assert in a notebook's closing cell fails the test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


@pytest.mark.parametrize("name", ["minitron", "nvfp4_qad"])
def test_ipynb_is_paired_with_py(name):
    py = jupytext.read(NOTEBOOKS / f"{name}.py")
    ipynb = jupytext.read(NOTEBOOKS / f"{name}.ipynb")
    assert _cells(ipynb) == _cells(py), f"notebooks/{name}.ipynb is stale: run jupytext --sync notebooks/{name}.py"
    assert any(kind == "markdown" for kind, _ in _cells(py)) and any(kind == "code" for kind, _ in _cells(py))
    code = [cell for cell in ipynb.cells if cell.cell_type == "code"]
    assert [cell.get("execution_count") for cell in code] == list(range(1, len(code) + 1)), \
        f"notebooks/{name}.ipynb is not executed: run `make notebooks` and commit it"
    text = "".join(o.get("text", "") for cell in code for o in cell.outputs if o.output_type == "stream")
    assert "QUICK=False" in text, f"notebooks/{name}.ipynb holds a test-scale run: run `make notebooks`"
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.outputs), "no figure in the outputs"


def test_readme_lists_every_notebook():
    """notebooks/README.md describes each notebook there is (it once listed one of two)."""
    readme = (NOTEBOOKS / "README.md").read_text()
    notebooks = sorted(p.name for p in NOTEBOOKS.glob("*.py") if p.with_suffix(".ipynb").exists())
    assert notebooks == ["elastic.py", "minitron.py", "nvfp4_qad.py"]
    assert all(f"- `{name}`" in readme for name in notebooks)


def test_execute_records_prints_figures_and_the_last_value(tmp_path):
    """notebooks/execute.py (`make notebooks`): a cell's print is a stream output, its open figure a PNG, its
    final expression an execute_result, in the written .ipynb."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("execute", NOTEBOOKS / "execute.py")
    execute = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(execute)
    py = tmp_path / "toy.py"
    py.write_text("# %% [markdown]\n# toy\n\n# %%\nimport matplotlib.pyplot as plt\nx = 3\nprint('x is', x)\n"
                  "plt.plot([1, 2], [3, 4])\nx * 2\n\n# %%\ny = x + 1\n")
    notebook = jupytext.read(execute.execute(py))
    first, second = (cell for cell in notebook.cells if cell.cell_type == "code")
    assert [o.output_type for o in first.outputs] == ["stream", "display_data", "execute_result"]
    assert first.outputs[0].text == "x is 3\n" and first.outputs[2].data["text/plain"] == "6"
    assert first.outputs[1].data["image/png"].startswith("iVBOR")  # base64 of the PNG signature
    assert (first.execution_count, second.execution_count, second.outputs) == (1, 2, [])


def _run_quick(name: str, tmp_path: Path) -> None:
    """Runs notebooks/<name>.py at tiny scale as a script, writing under tmp_path; fails on any error."""
    env = dict(os.environ, NEMOJAX_NOTEBOOK_QUICK="1", NEMOJAX_NOTEBOOK_OUT=str(tmp_path), MPLBACKEND="Agg",
               JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    # (XLA_FLAGS comes from tests/conftest.py: backend optimisation level 0, as for every test.)
    proc = subprocess.run([sys.executable, str(NOTEBOOKS / f"{name}.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_minitron_notebook_runs_at_tiny_scale(tmp_path):
    _run_quick("minitron", tmp_path)

    out = tmp_path / "quick"
    for figure in ("hidden_scores", "layer_axis_scores", "block_importance", "distillation"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    results = json.loads((out / "results.json").read_text())
    params = results["params"]
    assert 0.4 < params["width"] / params["teacher"] < 0.55
    assert params["depth"] < params["teacher"]
    assert results["configs"]["width"]["hidden_size"] == 48
    assert results["configs"]["depth"]["pattern"] and len(results["configs"]["depth"]["pattern"]) == 4
    loss = results["validation_loss"]
    for kind in ("width", "depth"):
        assert loss["distilled"][kind] < loss["pruned"][kind]
        assert loss["pruned"][kind] > loss["teacher"]  # pruning without retraining costs accuracy
    curve = loss["width_curve"]
    assert curve[0] == [0, loss["pruned"]["width"]] and curve[-1][1] == pytest.approx(loss["distilled"]["width"])


@pytest.mark.slow
def test_nvfp4_qad_notebook_runs_at_tiny_scale(tmp_path):
    _run_quick("nvfp4_qad", tmp_path)

    out = tmp_path / "quick"
    for figure in ("value_grids", "nvfp4_block", "error_vs_block_amax", "nvfp4_1d_vs_2d", "ptq_vs_qad"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    results = json.loads((out / "results.json").read_text())
    grids = results["grids"]
    assert grids["E2M1"] == {"count": 7, "min": 0.5, "max": 6.0}
    assert grids["E4M3"] == {"count": 126, "min": 2.0**-9, "max": 448.0}
    assert grids["E5M2"]["max"] == 57344.0 and grids["E8M0"]["count"] == 255
    sweep = results["error_vs_block_amax"]["nvfp4"]
    ratios, errors = sweep["ratios"], sweep["max_rel_err"]
    assert max(e for r, e in zip(ratios, errors, strict=True) if r >= 2.0**-6 / 448) <= 0.1771
    assert all(e == 1.0 for r, e in zip(ratios, errors, strict=True) if r <= 2.0**-10 / 448)  # flushed to zero
    assert results["nvfp4_2d"]["transpose_consistent"] == {"1d": False, "2d": True}
    metrics = results["metrics"]
    assert metrics["PTQ nvfp4"]["loss"] >= metrics["teacher (f32)"]["loss"]
    assert metrics["NVFP4 QAD"]["kl"] < metrics["PTQ nvfp4"]["kl"]
    assert len(results["history"]["qad_kl"]) == results["scale"]["qad_steps"]
