"""Executes jupytext notebooks and writes their paired .ipynb with the outputs (`make notebooks`).

    python notebooks/execute.py notebooks/minitron.py notebooks/nvfp4_qad.py

Each notebook runs in this process, its code cells one after another in one namespace, from the repository root
(where the notebooks put their runs by default), with matplotlib's non-interactive Agg backend. Per cell, what it
prints becomes a stream output, every figure still open at its end a PNG display output (and is closed, as
Jupyter's inline backend does), and a final expression's value an execute_result. A cell that raises stops the
notebook with its traceback, and nothing is written for it. No Jupyter kernel is needed: jupytext and nbformat
(the test extras) are all it uses. Progress bars are turned off (TQDM_DISABLE) so the outputs stay readable.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _figures() -> list[dict]:
    """Every open matplotlib figure as a display_data output (PNG), then closes them all."""
    import matplotlib.pyplot as plt

    outputs = []
    for number in plt.get_fignums():
        figure = plt.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
        outputs.append({"output_type": "display_data", "metadata": {},
                        "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"),
                                 "text/plain": repr(figure)}})
    plt.close("all")
    return outputs


def run_cell(source: str, namespace: dict, name: str) -> tuple[list[dict], object]:
    """Runs one code cell; returns (its stream and figure outputs, the value of a final expression or None)."""
    tree = ast.parse(source, filename=name)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, name, "exec"), namespace)
        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace) if last is not None else None
    outputs = [{"output_type": "stream", "name": "stdout", "text": out.getvalue()}] if out.getvalue() else []
    return outputs + _figures(), value


def execute(path: Path) -> Path:
    """Executes the jupytext notebook `path` and writes the paired .ipynb beside it; returns that path."""
    import jupytext
    import matplotlib
    import nbformat

    matplotlib.use("Agg")
    notebook = jupytext.read(path)
    namespace = {"__name__": "__main__", "__file__": str(path)}
    count = 0
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        count += 1
        start = time.perf_counter()
        outputs, value = run_cell(cell.source, namespace, f"{path.name} cell {index}")
        if value is not None:
            outputs.append({"output_type": "execute_result", "execution_count": count, "metadata": {},
                            "data": {"text/plain": repr(value)}})
        cell.outputs, cell.execution_count = [nbformat.from_dict(o) for o in outputs], count
        print(f"{path.name}: cell {index} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    target = path.with_suffix(".ipynb")
    jupytext.write(notebook, target, fmt="ipynb")
    return target


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python notebooks/execute.py NOTEBOOK.py [NOTEBOOK.py ...]")
    os.environ.setdefault("TQDM_DISABLE", "1")
    paths = [Path(a).resolve() for a in argv]
    os.chdir(ROOT)
    for path in paths:
        start = time.perf_counter()
        print(f"wrote {execute(path)} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
