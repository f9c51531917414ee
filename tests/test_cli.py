"""The `nemojax` command's jobs print what they did, with numbers that can be checked."""

from __future__ import annotations

import re

from nemojax import cli


def test_forward_runs_a_forward_pass(capsys):
    """`nemojax forward` reports the full preset's exact size and a finite loss near log(vocab) for random tokens."""
    cli.main(["forward", "--preset", "nemotron-3-nano-30b-a3b", "--seq", "24", "--batch", "1"])
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


def test_tokenizer_train_writes_a_loadable_tokenizer(tmp_path, capsys):
    """`nemojax tokenizer train` fits a BPE of the asked size that round-trips text."""
    from nemojax.data import load_tokenizer

    out = tmp_path / "tok.json"
    try:
        cli.main(["tokenizer", "train", "--out", str(out), "--vocab-size", "400", "--max-docs", "20"])
    except SystemExit as exit_:
        assert exit_.code == 0
    tokenizer = load_tokenizer(str(out))
    assert tokenizer.vocab_size == 400
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_demo_trains_and_compares_with_unigram_entropy(tmp_path, capsys):
    """`nemojax demo` (shortened) trains, evaluates and writes the loss curve and metrics."""
    cli.main(["demo", "--workdir", str(tmp_path), "--no-progress", "--config.train.steps=4",
              "--config.train.batch_size=2", "--config.train.seq_len=64", "--config.train.eval_batches=1",
              "--config.optimizer.warmup_steps=1", "--config.model.overrides.pattern=M*-"])
    out = capsys.readouterr().out
    assert re.search(r"validation loss [0-9.]+ nats/token vs the corpus' unigram entropy 3\.[0-9]+", out)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "metrics.jsonl").exists()
