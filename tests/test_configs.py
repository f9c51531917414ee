"""Every experiment config loads, names a valid model, and opens with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemojax import config_files, param_count
from nemojax.train.loop import model_config, optimizer_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def test_the_design_card_configs_exist():
    """tiny (tests), small_hybrid (the demo) and nemotron_h_8b (pods) are all there."""
    assert {"tiny.py", "small_hybrid.py", "nemotron_h_8b.py"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_and_documents_its_command(path):
    """get_config() gives a valid model and optimizer, and the header comment says how to run it."""
    config = config_files.load(path)
    assert path.read_text().startswith("#") and f"--config configs/{path.name}" in path.read_text()
    expected = {"tiny": (1e5, 1e6), "small_hybrid": (2e7, 5e7), "nemotron_h_8b": (8.0e9, 8.2e9),
                "mtp_small": (3e6, 5e6), "minitron_small": (2e7, 5e7), "nvfp4_qad": (2e7, 5e7)}[path.stem]
    if "model" not in config:  # a compression or quantization config: its model is the teacher checkpoint
        assert {"teacher", "prune", "distill"} <= set(config) or {"teacher", "recipe", "qad"} <= set(config)
        config = config_files.load(path.parent / "small_hybrid.py")
    mcfg = model_config(config)
    assert optimizer_config(config).total_steps == config.train.steps
    assert expected[0] <= param_count(mcfg) <= expected[1]
