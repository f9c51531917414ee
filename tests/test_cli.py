"""The `nemojax` command's jobs print what they did, with numbers that can be checked."""

from __future__ import annotations

import re

from nemojax import cli


def test_demo_runs_a_forward_pass(capsys):
    """`nemojax demo` reports the full preset's exact size and a finite loss near log(vocab) for random tokens."""
    cli.main(["demo", "--preset", "nemotron-3-nano-30b-a3b", "--seq", "24", "--batch", "1"])
    out = capsys.readouterr().out
    assert "31,577,940,288 parameters" in out
    assert "logits (1, 24, 512) float32" in out
    loss = float(re.search(r"next-token loss on random tokens ([0-9.]+)", out).group(1))
    assert abs(loss - 6.238) < 0.5  # log(512): an untrained model is close to uniform


def test_params_lists_published_totals(capsys):
    """`nemojax params` prints the spec's totals (spec/arch.md 4.3)."""
    cli.main(["params", "--preset", "nemotron-h-8b", "--preset", "nemotron-nano-12b-v2"])
    out = capsys.readouterr().out
    assert re.search(r"nemotron-h-8b\s+8,100,852,736", out)
    assert re.search(r"nemotron-nano-12b-v2\s+12,310,001,152", out)
