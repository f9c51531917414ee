"""Every experiment config loads, names a valid model, and opens with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from nemojax import cli, config_files, param_count
from nemojax.train.loop import model_config, optimizer_config
from tests.test_readme import documented

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
                "mtp_small": (3e6, 5e6), "minitron_small": (2e7, 5e7), "nvfp4_qad": (2e7, 5e7),
                "elastic_small": (2e7, 5e7)}[path.stem]
    if "model" not in config:  # a compression or quantization config: its model is the teacher checkpoint
        assert any(fields <= set(config) for fields in ({"teacher", "prune", "distill"}, {"teacher", "recipe", "qad"},
                                                         {"teacher", "elastic", "train"}))
        config = config_files.load(path.parent / "small_hybrid.py")
    mcfg = model_config(config)
    assert optimizer_config(config).total_steps == config.train.steps
    assert expected[0] <= param_count(mcfg) <= expected[1]


# ------------------------------------------------------------------------- the header commands, at tiny scale

ROOT = Path(__file__).resolve().parents[1]
# Appended to a documented `nemojax train` command (later overrides win): two steps, one validation.
TINY_RUN = ["--no-progress", "--config.train.steps=2", "--config.train.batch_size=2", "--config.train.seq_len=32",
            "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
            "--config.train.log_every=1", "--config.optimizer.warmup_steps=1"]
# small_hybrid's model cut to the tiny preset's widths (same pattern kinds), so its commands run in seconds.
SMALL_AS_TINY = [f"--config.model.overrides.{key}={value}" for key, value in {
    "hidden_size": 64, "pattern": "M*-", "intermediate_size": 128, "mamba.num_heads": 4, "mamba.head_dim": 16,
    "mamba.state_size": 16, "mamba.n_groups": 2, "mamba.chunk_size": 16, "attention.num_heads": 2,
    "attention.num_kv_heads": 1, "attention.head_dim": 32}.items()]


@pytest.fixture
def in_checkout(tmp_path, monkeypatch):
    """A scratch working directory that sees the repository's configs/ as ./configs (as a checkout does)."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("argv, shrink", [
    (documented("nemojax train --config configs/tiny.py --workdir runs/tiny --config.train.steps=20"), []),
    (documented("nemojax train --config configs/small_hybrid.py --workdir runs/demo"), SMALL_AS_TINY),
    (documented("nemojax train --config configs/small_hybrid.py --workdir runs/small --config.train.steps=500"),
     SMALL_AS_TINY),
    (documented("nemojax train --config configs/small_hybrid.py --config.train.low_precision=fp8_training --workdir runs/fp8"),  # noqa: E501
     SMALL_AS_TINY),
    (documented("nemojax train --config configs/mtp_small.py --workdir runs/mtp_small"), []),
], ids=["tiny", "small_hybrid", "readme_small", "readme_fp8", "mtp_small"])
def test_documented_train_commands_run(argv, shrink, in_checkout, capsys):
    """Each documented `nemojax train` command trains (2 steps) in the workdir it names and prints the validation
    loss during training, the same number metrics.jsonl records."""
    from nemojax.train.metrics import read_metrics

    cli.main(argv + shrink + TINY_RUN)
    out = capsys.readouterr().out
    workdir = in_checkout / argv[argv.index("--workdir") + 1]
    validation = [r for r in read_metrics(workdir) if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [2]
    assert 0 < validation[0]["loss"] < 7  # near log(vocab) for an untrained model
    assert f"step 2: validation loss {validation[0]['loss']:.4f}" in out
    assert (workdir / "run.json").is_file()


def test_pod_command_parses_and_builds_its_config(in_checkout, monkeypatch):
    """The pod-scale command is not run: its arguments parse, reach the train job, and build the 8.1B config with
    the corpus and tokenizer it sets."""
    argv = documented("""nemojax train --config configs/nemotron_h_8b.py --workdir gs://bucket/runs/nemotron-h-8b --config.data.paths="('/data/corpus/',)" --config.data.tokenizer=/path/to/nemotron/tokenizer.json""")  # noqa: E501
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(vars(args)))
    cli.main(argv)
    assert seen["workdir"] == "gs://bucket/runs/nemotron-h-8b"
    config = config_files.load(seen["config"], seen["overrides"])
    assert config.data.paths == ("/data/corpus/",) and config.data.tokenizer == "/path/to/nemotron/tokenizer.json"
    assert param_count(model_config(config)) == 8_100_852_736


@pytest.mark.slow
def test_mtp_speculative_experiment_runs(in_checkout):
    """configs/mtp_small.py's experiment script, cut to 2 training steps and k = 1: speculative decoding
    reproduces greedy decoding (its own check, reported as "passed")."""
    import json
    import runpy

    argv = documented("python experiments/mtp_speculative.py")
    module = runpy.run_path(str(ROOT / argv[0]))
    out = in_checkout / "spec.json"
    code = module["main"](["--quick", "--steps", "2", "--draft", "1", "--max-new", "8", "--repeats", "1",
                           "--workdir", str(in_checkout / "runs" / "mtp"), "--out", str(out)])
    assert code in (0, None)
    assert json.loads(out.read_text())["passed"] is True


def test_stated_sizes_match_the_configs():
    """The figures a header states are the config's: small_hybrid's parameter count (it said "~25M" for 22.1M),
    minitron_small's pruned size."""
    import re

    small = model_config(config_files.load(ROOT / "configs" / "small_hybrid.py"))
    stated = float(re.search(r"a ([0-9.]+)M-parameter hybrid", (ROOT / "configs" / "small_hybrid.py").read_text())[1])
    assert stated == round(param_count(small) / 1e6, 1)
    header = (ROOT / "configs" / "minitron_small.py").read_text()
    assert f"Expect {param_count(small) / 1e6:.1f}M ->" in header
