"""The `nemojax` command's jobs print what they did, with numbers that can be checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from nemojax import cli, config_files
from tests.test_readme import documented

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_checkout(tmp_path, monkeypatch):
    """A scratch working directory that sees the repository's configs/ as ./configs, as a checkout does, so the
    documented commands run with their relative paths (runs/demo, configs/x.py) as written."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_forward_runs_a_forward_pass(capsys):
    """`nemojax forward` reports the full preset's exact size and a finite loss near log(vocab) for random tokens."""
    cli.main(["forward", "--preset", "nemotron-3-nano-30b-a3b", "--seq", "24", "--batch", "1"])
    out = capsys.readouterr().out
    assert "31,577,940,288 parameters" in out
    assert "logits (1, 24, 512) float32" in out
    loss = float(re.search(r"next-token loss on random tokens ([0-9.]+)", out).group(1))
    assert abs(loss - 6.238) < 0.5  # log(512): an untrained model is close to uniform


def test_params_lists_published_totals(capsys):
    """`nemojax params` prints the published totals (the same numbers tests/test_presets.py derives)."""
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


# `make demo` is `nemojax demo --workdir runs/demo` (tests/test_readme.py checks the Makefile); these make it tiny.
DEMO_TINY = ["--no-progress", "--config.train.steps=4", "--config.train.batch_size=2", "--config.train.seq_len=64",
             "--config.train.eval_every=2", "--config.train.eval_batches=1", "--config.optimizer.warmup_steps=1",
             "--config.model.overrides.pattern=M*-", "--config.model.overrides.hidden_size=64",
             "--config.model.overrides.intermediate_size=128", "--config.model.overrides.mamba.num_heads=4",
             "--config.model.overrides.mamba.head_dim=16", "--config.model.overrides.mamba.n_groups=2",
             "--config.model.overrides.mamba.state_size=16", "--config.model.overrides.attention.num_heads=2",
             "--config.model.overrides.attention.num_kv_heads=1", "--config.model.overrides.attention.head_dim=32"]
DEMO_STAGES_TINY = [
    *(f"--compress-override={o}" for o in ("calibration.num_sequences=2", "calibration.batch_size=2",
                                           "calibration.seq_len=32", "prune.hidden=48", "prune.ffn=96",
                                           "prune.mamba_heads=2", "distill.steps=2", "distill.batch_size=2",
                                           "distill.seq_len=32", "distill.warmup_steps=1", "eval.batches=1",
                                           "eval.batch_size=2", "eval.seq_len=32")),
    *(f"--quant-override={o}" for o in ("calibration.num_sequences=2", "calibration.batch_size=2",
                                        "calibration.seq_len=32", "qad.steps=2", "qad.batch_size=2", "qad.seq_len=32",
                                        "qad.warmup_steps=1", "eval.batches=1", "eval.batch_size=2",
                                        "eval.seq_len=32")),
]


@pytest.mark.slow
def test_demo_runs_every_stage_with_figures_and_validation_losses(in_checkout, capsys):
    """`make demo`'s job, tiny: training prints its validation losses as it goes; each stage (training,
    compression, quantization) writes its PNG and prints its models' validation losses; the quantization table
    names the teacher by its real dtype."""
    cli.main(["demo", "--workdir", "runs/demo", *DEMO_TINY, *DEMO_STAGES_TINY])
    out = capsys.readouterr().out
    work = in_checkout / "runs" / "demo"
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [2, 4]
    for r in validation:  # printed during training, equal to what metrics.jsonl records
        assert f"step {r['step']}: validation loss {r['loss']:.4f}" in out
    assert re.search(r"validation loss [0-9.]+ nats/token vs the corpus' unigram entropy 3\.[0-9]+", out)
    for figure in ("loss.png", "minitron/compression.png", "nvfp4/quantization.png"):
        assert (work / figure).stat().st_size > 5000, figure
    distill = json.loads((work / "minitron" / "distill.json").read_text())
    assert re.search(rf"pruned \+ distilled\s+[0-9,]+\s+{distill['distilled']['val_loss']:.3f}", out)
    qad = json.loads((work / "nvfp4" / "qad.json").read_text())
    assert re.search(rf"teacher \(float32\)\s+[0-9.]+\s+{qad['teacher']['val_loss']:.3f}", out)
    assert re.search(rf"nvfp4 QAD\s+[0-9.]+\s+{qad['qad']['val_loss']:.3f}", out)
    assert "bfloat16)" not in out  # the float32 teacher is not called a bfloat16 one


# ---------------------------------------------------------------------------------------------- nemojax generate

PROMPT = "The quick brown fox"
NEW = 16


@pytest.fixture(scope="module")
def tiny():
    """A small random hybrid (Mamba, attention, MLP) over the byte vocabulary, float32."""
    import nemojax

    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*-", runtime={"dtype": "float32"})
    return nemojax.Model.init(config, 0)


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    import nemojax

    return nemojax.save_hf(tiny, tmp_path_factory.mktemp("hf") / "ckpt")


def _reference(model, prompts, **kwargs):
    from nemojax.data.tokenizers import ByteTokenizer
    from nemojax.infer.generate import generate

    return generate(model, prompts, max_new_tokens=NEW, tokenizer=ByteTokenizer(), **kwargs)


def test_generate_streams_the_greedy_completion_and_holds_back_a_stop_string(tiny, hf_dir, capsys, monkeypatch):
    """One prompt is streamed in several pieces; what is printed is exactly generate()'s greedy text cut at the
    stop string (which must never be printed, even in part); the summary goes to stderr."""
    full = _reference(tiny, [PROMPT]).text[0]
    stop = next(full[i:i + 2] for i in range(4, len(full) - 1)
                if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    pieces = []
    write = cli._StreamPrinter._write

    def spy(self, text):
        write(self, text)
        pieces.append(self.printed)

    monkeypatch.setattr(cli._StreamPrinter, "_write", spy)
    cli.main(["generate", "--checkpoint", str(hf_dir), "--tokenizer", "byte", "--prompt", PROMPT,
              "--max-new-tokens", str(NEW), "--stop", stop])
    out = capsys.readouterr()
    expected = full[:full.find(stop)]
    assert out.out == expected + "\n"
    assert len(set(pieces)) >= 2 and all(expected.startswith(p) for p in pieces)  # grew step by step
    tokens = int(re.search(r"generate: (\d+) tokens in [0-9.]+ s \([0-9.]+ tokens/s", out.err).group(1))
    assert tokens < NEW and out.err.rstrip().endswith("finish: stop")


def test_generate_no_stream_batch_prints_each_completion(tiny, hf_dir, capsys):
    prompts = [PROMPT, "def f(x):"]
    cli.main(["generate", "--checkpoint", str(hf_dir), "--tokenizer", "byte", "--prompt", prompts[0],
              "--prompt", prompts[1], "--max-new-tokens", str(NEW), "--no-stream"])
    out = capsys.readouterr()
    ref = _reference(tiny, prompts)
    assert out.out == "".join(f"--- prompt {i + 1} of 2: {p!r}\n{t}\n"
                              for i, (p, t) in enumerate(zip(prompts, ref.text, strict=True)))
    assert f"generate: {2 * NEW} tokens" in out.err and "finish: length, length" in out.err


def _save_workdir(tiny, workdir):
    """A workdir laid out as `nemojax train` leaves it: run.json plus orbax TrainState checkpoints (steps 3 and 5,
    with different params; the optimizer state is a stand-in the loader must not need)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    import nemojax
    from nemojax import config_files
    from nemojax.train.checkpoint import Checkpoints
    from nemojax.train.loop import _fingerprint  # the real run.json content, so a format change fails here
    from nemojax.train.step import TrainState

    assert dataclasses.asdict(tiny.config)["runtime"]["remat"] == "none"
    config = config_files.load(Path(cli.__file__).parent.parent / "configs" / "tiny.py", [])
    checkpoints = Checkpoints(workdir, _fingerprint(tiny.config, config), async_save=False)
    newest = None
    for step, seed in ((3, 7), (5, 0)):
        params = tiny.params if seed == 0 else nemojax.Model.init(tiny.config, seed).params
        state = TrainState(params, {"mu": jax.tree.map(jnp.zeros_like, params)}, jnp.asarray(step, jnp.int32),
                           jax.random.PRNGKey(step))
        checkpoints.save(step, state)
        newest = params
    checkpoints.close()
    return newest


def test_generate_from_a_training_workdir(tiny, in_checkout, capsys):
    """run.json + orbax: the newest step's params come back exactly, the tokenizer is run.json's ("byte"), and
    README's first generate command (on runs/demo) prints generate()'s seeded sample for them."""
    import jax
    import numpy as np

    from nemojax.data.tokenizers import ByteTokenizer
    from nemojax.infer.generate import generate
    from nemojax.infer.load import load_checkpoint

    tmp_path = in_checkout / "runs" / "demo"
    params = _save_workdir(tiny, tmp_path)
    model, tokenizer = load_checkpoint(tmp_path)
    assert model.config == tiny.config and isinstance(tokenizer, ByteTokenizer)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    older, _ = load_checkpoint(tmp_path, step=3)
    assert not np.array_equal(np.asarray(jax.tree.leaves(older.params)[0]), np.asarray(jax.tree.leaves(params)[0]))

    cli.main(documented('nemojax generate --checkpoint runs/demo --prompt "def read_config(path):" --max-new-tokens 200 --temperature 0.8 --top-p 0.95'))  # noqa: E501
    want = generate(tiny, ["def read_config(path):"], max_new_tokens=200, tokenizer=ByteTokenizer(),
                    temperature=0.8, top_p=0.95, seed=0)
    assert capsys.readouterr().out == want.text[0] + "\n" and want.text[0].strip()


def test_generate_chat_prints_the_thinking_block_and_the_answer(tiny, hf_dir, tmp_path, capsys):
    """--chat --thinking on with a template that opens <think> and a budget of 4: each reply is printed as its
    reasoning inside the tags, then its answer, exactly as `chat()` splits them."""
    from nemojax.data.tokenizers import ByteTokenizer
    from nemojax.infer.chat import chat

    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: <think>"
    (tmp_path / "chat.jinja").write_text(template, encoding="utf-8")
    prompts = [PROMPT, "2+2?"]
    cli.main(["generate", "--checkpoint", str(hf_dir), "--tokenizer", "byte", "--prompt", prompts[0], "--prompt",
              prompts[1], "--max-new-tokens", str(NEW), "--chat", "--chat-template", str(tmp_path / "chat.jinja"),
              "--thinking", "on", "--thinking-budget", "4", "--no-stream"])
    out = chat(tiny, ByteTokenizer(), [[{"role": "user", "content": p}] for p in prompts], template=template,
               thinking="on", thinking_budget=4, max_new_tokens=NEW)
    expected = "".join(f"--- prompt {i + 1} of 2: {p!r}\n<think>\n{r}\n</think>\n{a}\n"
                       for i, (p, r, a) in enumerate(zip(prompts, out.reasoning, out.answer, strict=True)))
    assert capsys.readouterr().out == expected
    assert all("</think>" in text for text in out.text)  # the budget closed every block: a real split


def test_documented_chat_command_uses_the_checkpoints_own_tokenizer(in_checkout, capsys):
    """README's chat command on a Hugging Face folder named hf_dir that carries its tokenizer.json (a small BPE
    here): the streamed reply is `chat()`'s for that tokenizer with the reasoning toggle on and the budget."""
    import nemojax
    from nemojax.data import DataConfig, documents, load_tokenizer, train_bpe
    from nemojax.infer.chat import chat

    model = nemojax.Model.init(
        nemojax.presets.get("nemotron-h-8b-tiny", pattern="M*-", runtime={"dtype": "float32"}), 0)
    folder = nemojax.save_hf(model, in_checkout / "hf_dir")
    docs = documents(DataConfig(kind="stdlib"), "train")
    train_bpe((docs[i] for i in range(10)), 300, folder / "tokenizer.json")
    argv = documented('nemojax generate --checkpoint hf_dir --chat --thinking on --thinking-budget 512 --prompt "..."')
    cli.main(argv + ["--max-new-tokens", str(NEW)])
    tokenizer = load_tokenizer(folder)
    assert tokenizer.vocab_size == 300 <= model.config.vocab_size
    want = chat(model, tokenizer, [{"role": "user", "content": "..."}], thinking="on", thinking_budget=512,
                max_new_tokens=NEW)
    assert capsys.readouterr().out == want.text[0] + "\n"


def test_generate_errors_name_the_path(tmp_path, hf_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match=f"checkpoint '{missing}' is not a folder"):
        cli.main(["generate", "--checkpoint", str(missing), "--prompt", "x"])
    with pytest.raises(SystemExit, match="is neither a Hugging Face checkpoint \\(no config.json\\) nor a training "
                                         "workdir \\(no run.json\\)"):
        cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="has no tokenizer.json; pass a tokenizer"):
        cli.main(["generate", "--checkpoint", str(hf_dir), "--prompt", "x"])
    (tmp_path / "run.json").write_text('{"model": {"vocab_size": 260}, "data": {"tokenizer": "byte"}}')
    with pytest.raises(SystemExit, match="model lacks the required fields \\['hidden_size', 'pattern'\\]"):
        cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
    model = {"vocab_size": 260, "hidden_size": 8, "pattern": "-", "intermediate_size": 8}
    (tmp_path / "run.json").write_text(json.dumps({"model": model, "data": {"tokenizer": "byte"}}))
    with pytest.raises(SystemExit, match="no checkpoint under .*checkpoints"):
        cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"])
    with pytest.raises(SystemExit, match="--thinking applies to chat prompts; add --chat"):
        cli.main(["generate", "--checkpoint", str(hf_dir), "--prompt", "x", "--thinking", "on"])


def test_model_config_from_dict_round_trips_every_preset():
    import dataclasses
    import json

    from nemojax import presets
    from nemojax.infer.load import model_config_from_dict

    for name in presets.names():
        config = presets.get(name)
        assert model_config_from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config, name
    d = dataclasses.asdict(presets.get("nemotron-h-8b-tiny"))
    d["mamba"]["d_state"] = 16
    with pytest.raises(ValueError, match="model.mamba has unknown fields \\['d_state'\\]"):
        model_config_from_dict(d)


def test_memory_answers_the_nano2_128k_question(capsys) -> None:
    """Nano 2 9B, bfloat16, 128k context: 16.556 GiB weights + 2 GiB KV + Mamba state (hand-computed in
    tests/infer/test_memory.py) = 20,067,486,720 bytes, which fits a 22 GiB A10G."""
    from nemojax.cli import main

    main(documented("nemojax memory --preset nemotron-nano-9b-v2 --context 131072 --budget-gib 22"))
    out = capsys.readouterr().out
    assert "20,067,486,720" in out and "fits in 22 GiB" in out
    main(["memory", "--preset", "nemotron-nano-9b-v2", "--context", "131072", "--budget-gib", "18"])
    assert "does not fit in 18 GiB" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ nemojax prune / distill

COMPRESS = ["--config", str(cli.COMPRESS_CONFIG),
            "--config.calibration.num_sequences=4", "--config.calibration.batch_size=2",
            "--config.calibration.seq_len=32", "--config.prune.hidden=48", "--config.prune.ffn=96",
            "--config.prune.mamba_heads=4", "--config.prune.layers=6", "--config.distill.steps=2",
            "--config.distill.batch_size=2", "--config.distill.seq_len=32", "--config.distill.warmup_steps=1",
            "--config.eval.batches=1", "--config.eval.batch_size=2", "--config.eval.seq_len=32"]


def test_prune_then_distill_write_loadable_checkpoints(in_checkout, capsys):
    """The documented `nemojax prune` (teacher runs/demo, here a Hugging Face folder) saves a student of the target
    sizes whose size it prints; a second prune reuses scores.npz; `nemojax distill` saves the distilled student
    and logs metrics; `nemojax generate` samples it."""
    import nemojax
    from nemojax import compress
    from nemojax.jobs.common import validation_loss

    teacher = nemojax.Model.init(
        nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, runtime={"dtype": "float32"}), 0)
    teacher_dir = nemojax.save_hf(teacher, in_checkout / "runs" / "demo")
    work = in_checkout / "runs" / "minitron"
    prune = documented("nemojax prune --config configs/minitron_small.py --teacher runs/demo --workdir runs/minitron")
    cli.main(prune + COMPRESS[2:])
    out = capsys.readouterr().out
    pruned = nemojax.load_hf(work / "pruned")
    cfg = pruned.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.mamba.num_heads, cfg.num_layers) == (48, 96, 4, 6)
    assert cfg.attention.num_heads == teacher.config.attention.num_heads
    printed = int(re.search(r"pruned: ([0-9,]+) parameters", out).group(1).replace(",", ""))
    assert printed == pruned.num_params < teacher.num_params
    assert f"teacher runs/demo: {teacher.num_params:,} parameters" in out and teacher_dir.is_dir()
    losses = [float(x) for x in re.findall(r"validation loss ([0-9.]+) nats/token", out)]
    assert len(losses) == 2 and all(4.0 < x < 7.0 for x in losses)  # random models: near log(260) = 5.56
    # the pruned student is the prune of the teacher by the saved scores
    want = compress.prune(teacher, compress.Scores.load(work / "scores.npz"), hidden=48, ffn=96,
                                  mamba_heads=4, layers=6)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), want.params, pruned.params)))

    scores_mtime = (work / "scores.npz").stat().st_mtime_ns
    cli.main(prune + COMPRESS[2:])
    assert "reusing importance scores" in capsys.readouterr().out
    assert (work / "scores.npz").stat().st_mtime_ns == scores_mtime

    cli.main(documented("nemojax distill --config configs/minitron_small.py --workdir runs/minitron")
             + ["--no-progress", *COMPRESS[2:]])  # the teacher from prune.json
    out = capsys.readouterr().out
    distilled = nemojax.load_hf(work / "distilled")
    assert distilled.config == cfg and distilled.num_params == pruned.num_params
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                                distilled.params, pruned.params)))
    before, after = (float(x) for x in re.search(r"validation loss ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert before == pytest.approx(losses[1], abs=1e-3)
    assert after == pytest.approx(validation_loss(
        distilled, config_files.load(cli.COMPRESS_CONFIG, [a[len("--config."):] for a in COMPRESS[2:]])),
        abs=1e-3)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "distill"] == [1, 2]
    assert all(r["kl"] >= 0 for r in records if r["split"] == "distill")

    generate = documented('nemojax generate --checkpoint runs/minitron/distilled --tokenizer byte --prompt "def main("')
    cli.main(generate + ["--max-new-tokens", str(NEW), "--no-stream"])
    assert capsys.readouterr().out == _reference(distilled, ["def main("]).text[0] + "\n"


def test_prune_errors_name_the_target(tmp_path):
    """A target the model cannot take stops with an error naming it, before anything is saved."""
    import nemojax

    teacher = nemojax.Model.init(
        nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, runtime={"dtype": "float32"}), 0)
    teacher_dir = nemojax.save_hf(teacher, tmp_path / "teacher")
    with pytest.raises(SystemExit, match="mamba_heads"):
        cli.main(["prune", "--teacher", str(teacher_dir), "--workdir", str(tmp_path / "w"), *COMPRESS,
                  "--config.prune.mamba_heads=3"])
    assert not (tmp_path / "w" / "pruned").exists()
    with pytest.raises(SystemExit, match="no pruned checkpoint"):
        cli.main(["distill", "--teacher", str(teacher_dir), "--workdir", str(tmp_path / "empty"), *COMPRESS])


# ------------------------------------------------------------------------------------ nemojax quantize / qad

QUANTIZE = ["--config", str(cli.QUANT_CONFIG),
            "--config.calibration.num_sequences=4", "--config.calibration.batch_size=2",
            "--config.calibration.seq_len=32", "--config.qad.steps=2", "--config.qad.batch_size=2",
            "--config.qad.seq_len=32", "--config.qad.warmup_steps=1",
            "--config.eval.batches=1", "--config.eval.batch_size=2", "--config.eval.seq_len=32"]


def test_quantize_then_qad_write_nvidia_checkpoints(in_checkout, capsys):
    """The documented `nemojax quantize` saves a calibrated NVFP4 checkpoint (ModelOpt layout) whose weights it
    reports at about 4.5/16 of bfloat16; `nemojax qad` (teacher from quantize.json) distils it and saves another;
    `nemojax generate` and `nemojax.load_hf` read that float8-scaled checkpoint back (they used to fail: numpy has
    no float8_e4m3fn); bad recipes stop with an error naming them, before anything is saved."""
    import nemojax
    from nemojax import quant

    tmp_path = in_checkout
    teacher = nemojax.Model.init(
        nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, runtime={"dtype": "float32"}), 0)
    teacher_dir = nemojax.save_hf(teacher, tmp_path / "runs" / "demo")
    work = tmp_path / "runs" / "nvfp4"
    cli.main(documented("nemojax quantize --config configs/nvfp4_qad.py --teacher runs/demo --workdir runs/nvfp4")
             + QUANTIZE[2:])
    out = capsys.readouterr().out
    ptq = quant.load_quantized(work / "ptq")
    assert ptq.config.runtime.quant is not None
    assert json.loads((work / "ptq" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    record = json.loads((work / "quantize.json").read_text())
    teacher_mb, ptq_mb = record["teacher"]["weight_bytes"], record["ptq"]["weight_bytes"]
    assert ptq_mb < 0.5 * teacher_mb  # the linears (most weights) at 4.5 bits instead of 16
    assert f"{ptq_mb / 1e6:.2f}" in out and record["ptq"]["val_loss"] > 0
    cli.main(documented("nemojax qad --config configs/nvfp4_qad.py --workdir runs/nvfp4")
             + ["--no-progress", *QUANTIZE[2:]])
    out = capsys.readouterr().out
    qad = quant.load_quantized(work / "qad")
    loaded = nemojax.load_hf(work / "qad")  # the same fake-quantized model, float8 block scales included
    assert loaded.config == qad.config
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(qad.params), strict=True):
        assert a.dtype == b.dtype and bool(jnp.array_equal(a, b))
    generate = documented('nemojax generate --checkpoint runs/nvfp4/qad --tokenizer byte --prompt "def main("')
    cli.main(generate + ["--max-new-tokens", str(NEW), "--no-stream"])
    assert capsys.readouterr().out == _reference(qad, ["def main("]).text[0] + "\n"
    assert qad.config.pattern == teacher.config.pattern
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "qad"] == [1, 2]
    assert all(r["kl"] > 0 for r in records if r["split"] == "qad")
    assert "QAD" in out
    with pytest.raises(SystemExit, match="quant recipe 'int3' is unknown"):
        cli.main(["quantize", "--teacher", str(teacher_dir), "--workdir", str(tmp_path / "w"), *QUANTIZE,
                  "--config.recipe=int3"])
    assert not (tmp_path / "w" / "ptq").exists()
    with pytest.raises(SystemExit, match="no quantized checkpoint"):
        cli.main(["qad", "--teacher", str(teacher_dir), "--workdir", str(tmp_path / "empty"), *QUANTIZE])
