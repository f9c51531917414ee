"""Sharded training equals single-device training: DP, FSDP, TP, EP and a mixed layout on 8 CPU devices, and a
2-process x 2-device job over jax.distributed on 127.0.0.1 (each run in a subprocess, since the device count and
the distributed runtime are fixed when jax starts)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Each axis at least once, with as few runs as that takes (suite time): pure data and pure tensor parallelism are
# covered inside the mixed layouts. The tiny preset's Mamba mixer has 8 heads in 2 groups: tensor 2 shards all of
# its parts, tensor 4 shards z, x and dt by heads and replicates B and C (4 does not divide the groups).
LAYOUTS = [{"fsdp": 8}, {"expert": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]
RTOL = 2e-5  # different reduction orders across shards; measured about 1e-6


def _worker(mesh: object, devices: int, *extra: str) -> subprocess.Popen:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.train.layouts_worker", json.dumps(mesh), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen, timeout: int = 300) -> object:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_device() -> dict:
    return _result(_worker({}, 1))


def _assert_same_run(result: dict, reference: dict) -> None:
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=RTOL)
    np.testing.assert_allclose(result["grad_norms"], reference["grad_norms"], rtol=10 * RTOL)
    np.testing.assert_allclose(result["param_checksum"], reference["param_checksum"], rtol=RTOL)


@pytest.mark.xdist_group("subprocess")
def test_layouts_on_8_devices_match_one_device(single_device):
    """Losses, gradient norms and final params of 3 steps (grad accumulation, MoE aux loss and bias update on)
    agree with the single-device run for every layout."""
    results = _result(_worker(LAYOUTS, 8))
    assert [r["devices"] for r in results] == [8] * len(LAYOUTS)
    for result in results:
        _assert_same_run(result, single_device)
    # the run is not trivially constant: the loss moves between steps
    assert abs(single_device["losses"][2] - single_device["losses"][0]) > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.xdist_group("subprocess")
def test_two_processes_match_one_process(single_device):
    """2 processes x 2 CPU devices (data x fsdp), each feeding its own rows, train like one device."""
    port = str(_free_port())
    common = ("--num-processes", "2", "--port", port, "--local-devices", "2")
    workers = [_worker({"data": 2, "fsdp": 2}, 2, "--process-id", str(i), *common) for i in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert (result["processes"], result["devices"]) == (2, 4)
    _assert_same_run(result, single_device)
