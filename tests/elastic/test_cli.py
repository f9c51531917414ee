"""The documented `nemojax elastify` command at tiny scale: one elastic checkpoint holding every nested model, each
budget's submodel as a loadable Hugging Face checkpoint, and the printed table agreeing with them."""

from __future__ import annotations

import json
import re

import numpy as np

import nemojax
from nemojax import cli, elastic
from nemojax.data.tokenizers import ByteTokenizer
from tests.test_cli import documented, in_checkout  # noqa: F401 - the fixture

TINY = ["--no-progress", "--config.calibration.num_sequences=4", "--config.calibration.batch_size=2",
        "--config.calibration.seq_len=32", "--config.train.steps=2", "--config.train.batch_size=2",
        "--config.train.seq_len=32", "--config.train.warmup_steps=1", "--config.elastic.router_hidden=16",
        "--config.elastic.max_drop=1", "--config.eval.batches=1", "--config.eval.batch_size=2",
        "--config.eval.seq_len=32"]


def test_elastify_writes_one_nested_checkpoint_and_each_budget(in_checkout, capsys):  # noqa: F811
    teacher = nemojax.Model.init(
        nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M-*M", runtime={"dtype": "float32"}), 0)
    nemojax.save_hf(teacher, in_checkout / "runs" / "demo")
    command = documented("nemojax elastify --config configs/elastic_small.py --teacher runs/demo --workdir runs/elastic")  # noqa: E501
    cli.main(command + TINY)
    out = capsys.readouterr().out
    work = in_checkout / "runs" / "elastic"
    em = elastic.load(work / "elastic")
    record = json.loads((work / "elastify.json").read_text())
    assert em.budgets == (1.0, 0.75, 0.5) and len(em.removal_order) == 1 and "depth" in em.choices
    tokens = np.random.default_rng(0).integers(0, 260, (1, 9))
    for row in record["budgets"]:
        small = nemojax.load_hf(work / f"budget_{row['budget']:g}")
        assert small.num_params == row["params"]
        np.testing.assert_allclose(small(tokens), em(tokens, row["budget"]), rtol=1e-5, atol=1e-5)
        assert re.search(rf"budget {row['budget']:g}\s+{row['params']:,}\s", out)
    assert record["steps"] == 2 and "saved" in out

    # the header's next command: the extracted 0.5 submodel generates as a plain checkpoint, greedy by default
    generate = documented('nemojax generate --checkpoint runs/elastic/budget_0.5 --tokenizer byte --prompt "def main("')
    cli.main([*generate, "--max-new-tokens", "4", "--no-stream"])
    printed = capsys.readouterr()
    small = nemojax.load_hf(work / "budget_0.5")
    expected = nemojax.generate(small, ["def main("], max_new_tokens=4, tokenizer=ByteTokenizer())
    assert printed.out == expected.text[0] + "\n" and "generate: 4 tokens" in printed.err
