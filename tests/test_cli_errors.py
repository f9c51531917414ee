"""One error style for every `nemojax` job: a user error (bad config, missing file or checkpoint, a workdir of
another run, a diverged loss) ends the job with exactly one stderr line `nemojax <job>: error: <message>` and exit
status 2, without a traceback; `--debug` re-raises it with its traceback; any other exception (a bug) propagates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nemojax import cli
from nemojax.errors import CheckpointError
from nemojax.train.fit import NonFiniteLossError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
# one training step of the tiny hybrid on 1 x 16 tokens, checkpointed, so a train takes seconds
ONE_STEP = ["--no-progress", "--config.train.steps=1", "--config.train.batch_size=1", "--config.train.seq_len=16",
            "--config.train.eval_every=1", "--config.train.eval_batches=1", "--config.train.checkpoint_every=1",
            "--config.optimizer.warmup_steps=0"]


def _user_error(argv: list[str], capsys) -> str:
    """Runs the CLI in-process, asserts it ended on a user error the documented way, and returns the message."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    job = argv[0]
    assert len(lines) == 1 and lines[0].startswith(f"nemojax {job}: error: "), err
    assert str(exit_.value) == lines[0]  # what in-process callers (and pytest.raises(match=...)) see
    return lines[0][len(f"nemojax {job}: error: "):]


def test_train_bad_override_value(tmp_path, capsys):
    message = _user_error(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), *ONE_STEP,
                           "--config.train.steps=-1"], capsys)
    assert "steps" in message and "-1" in message  # names the field and the value that is invalid
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_train_unknown_override_field(tmp_path, capsys):
    message = _user_error(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.train.nope=1"],
                          capsys)
    assert message == "config has no field 'train.nope'"


def test_train_missing_config_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _user_error(["train", "--config", str(tmp_path / "missing.py"), "--workdir", "w"], capsys)
    assert message.startswith(f"--config {tmp_path / 'missing.py'} does not exist")


def test_train_into_a_workdir_of_another_configuration(tmp_path, capsys):
    """The second run (seq_len 32 into a seq_len 16 workdir) is a CheckpointError: one line naming the workdir
    and the field that differs (the multi-line message joined), and the first run's checkpoint is untouched."""
    workdir = tmp_path / "w"
    cli.main(["train", "--config", TINY, "--workdir", str(workdir), *ONE_STEP])
    assert "trained" in capsys.readouterr().out
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    message = _user_error(["train", "--config", TINY, "--workdir", str(workdir), *ONE_STEP,
                           "--config.train.seq_len=32"], capsys)
    assert message.startswith(f"{workdir} holds a run of another configuration")
    assert "seq_len: checkpoint has 16, config has 32" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == saved


def test_generate_missing_checkpoint(tmp_path, capsys):
    message = _user_error(["generate", "--checkpoint", str(tmp_path / "nonexistent"), "--prompt", "x"], capsys)
    assert message == f"checkpoint '{tmp_path / 'nonexistent'}' is not a folder"


def test_params_unknown_preset(capsys):
    message = _user_error(["params", "--preset", "nope"], capsys)
    assert message.startswith("unknown preset 'nope'; known presets: ")


def test_the_process_exits_with_status_2_and_one_line(tmp_path):
    """Out of process: Python's own exit handling turns the SystemExit into status 2 and prints nothing more."""
    done = subprocess.run([sys.executable, "-m", "nemojax.cli", "params", "--preset", "nope"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("nemojax params: error: unknown preset 'nope'; known presets: ")


def test_memory_unknown_preset_is_argparse_error(capsys):
    """--preset has choices, so argparse refuses it: usage, then its one error line, exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["memory", "--preset", "nope"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: nemojax memory")
    assert err.splitlines()[-1].startswith("nemojax memory: error: argument --preset: invalid choice: 'nope'")


def test_override_without_value_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", TINY, "--workdir", "w", "--config.train.steps"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("nemojax: error: --config.train.steps needs a value "
                                    "(--config.a.b=value or --config.a.b value)")


def test_diverged_loss_is_a_user_error(tmp_path, capsys, monkeypatch):
    """NonFiniteLossError (a FloatingPointError, not a ValueError) ends the job the same way."""
    def diverge(args):
        raise NonFiniteLossError("train: the loss or its gradient is not finite (NaN or inf) at step 3")

    monkeypatch.setattr(cli, "_train", diverge)
    message = _user_error(["train", "--config", TINY, "--workdir", str(tmp_path / "w")], capsys)
    assert message == "train: the loss or its gradient is not finite (NaN or inf) at step 3"


@pytest.mark.parametrize("error", [KeyError("bug"), RuntimeError("bug"), FloatingPointError("jax_debug_nans")])
def test_other_exceptions_are_bugs_and_keep_their_traceback(error, tmp_path, capsys, monkeypatch):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_train", fail)
    with pytest.raises(type(error)) as raised:
        cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w")])
    assert raised.value is error
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_reraises_user_errors(where, tmp_path, capsys, monkeypatch):
    """--debug before or after the job name: the CheckpointError itself comes out (with its traceback), nothing
    is printed."""
    error = CheckpointError("w holds a run of another configuration")

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_train", fail)
    argv = ["train", "--config", TINY, "--workdir", str(tmp_path / "w")]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(CheckpointError) as raised:
        cli.main(argv)
    assert raised.value is error and raised.value.__traceback__ is not None
    assert capsys.readouterr().err == ""


def test_debug_reraises_a_real_bad_override(tmp_path):
    with pytest.raises(ValueError, match="config has no field 'train.nope'"):
        cli.main(["--debug", "train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--config.train.nope=1"])


def test_one_line_joins_a_multi_line_message():
    error = CheckpointError("w holds a run of another configuration; refusing it:\n  seq_len: 16 vs 32\n"
                            "  data: a vs b\n")
    assert cli._one_line(error) == ("w holds a run of another configuration; refusing it: seq_len: 16 vs 32; "
                                    "data: a vs b")
    assert cli._one_line(ValueError()) == "ValueError"
