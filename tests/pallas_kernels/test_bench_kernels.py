"""experiments/bench_kernels.py --quick: the device benchmark runs end to end on CPU (interpreted, tiny shapes),
so the script a GPU session runs once is known to work; every kernel agrees with its baseline on the same inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "experiments" / "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_kernels.py", "--quick", "--out", str(out)])
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert not [r for r in rows if "error" in r]
    assert {r["op"] for r in rows} == set(bench.OPS) | {"attention_packed"}
    for r in rows:  # bf16 outputs on both sides (the SSD baseline reads bf16 B/C in float32 math)
        assert r["rel_err"] < 1e-2, r
        assert r["kernel_ms"] > 0 and r["ref_ms"] > 0
