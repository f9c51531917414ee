"""The `nemojax` command: one subcommand per job.

    nemojax demo [--workdir runs/demo] [--config.train.steps=100 ...]
        the main job: trains the small hybrid of configs/small_hybrid.py on the Python standard library's source,
        evaluates it, draws the loss curve and compares the validation loss with the corpus' unigram entropy
    nemojax forward [--preset nemotron-3-super-120b-a12b] [--seq 64]
        builds the preset's tiny variant, runs a jitted forward pass and an MTP pass, and prints what it did
    nemojax params [--preset NAME ...]
        parameter counts of full-size presets, from shapes alone
    nemojax train --config configs/x.py --workdir runs/x [--config.train.steps=200 ...]
        trains (resuming from the workdir's newest checkpoint) and prints a summary
    nemojax tokenizer train --out tok.json [--vocab-size 4096 --kind stdlib ...]
        fits a byte-level BPE on a corpus and saves it as a Hugging Face tokenizer.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nemojax import presets
from nemojax.model import Model, param_count

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "small_hybrid.py"


def _demo(args: argparse.Namespace) -> None:
    from nemojax import config_files, data
    from nemojax.train.loop import train

    config = config_files.load(args.config, args.overrides)
    workdir = Path(args.workdir)
    print(f"demo: training {args.config} in {workdir} (resumes if a checkpoint is there)")
    summary = train(config, workdir, progress=not args.no_progress)["summary"]
    entropy = data.corpus_unigram_entropy(data.DataConfig(**config.data.to_dict()), split="validation")
    val = summary["validation_loss"]
    print(f"\n{summary['params']:,}-parameter hybrid, {summary['steps']} steps of "
          f"{config.train.batch_size} x {config.train.seq_len} tokens")
    print(f"validation loss {val:.3f} nats/token vs the corpus' unigram entropy {entropy:.3f} "
          f"({val / entropy:.0%} of it); perplexity {math.exp(val):.2f}")
    print(f"metrics: {workdir / 'metrics.jsonl'}, TensorBoard: {workdir / 'tensorboard'}, "
          f"loss curve: {workdir / 'loss.png'}")


def _forward(args: argparse.Namespace) -> None:
    full = presets.get(args.preset)
    config = presets.get(f"{args.preset}-tiny")
    print(f"preset {args.preset}: {full.num_layers} layers '{full.pattern}', "
          f"{param_count(full):,} parameters (counted from shapes, nothing allocated)")
    print(f"tiny variant: {config.num_layers} layers '{config.pattern}', hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}" + (f", MTP '{config.mtp.pattern}'" if config.mtp else ""))
    model = Model.init(config, jax.random.key(args.seed))
    print(f"initialised {model.num_params:,} parameters on {jax.devices()[0].platform}")

    tokens = jax.random.randint(jax.random.key(args.seed + 1), (args.batch, args.seq), 0, config.vocab_size)
    start = time.perf_counter()
    logits = jax.block_until_ready(model(tokens))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits = jax.block_until_ready(model(tokens))
    run_s = time.perf_counter() - start
    print(f"forward: tokens {tuple(tokens.shape)} -> logits {tuple(logits.shape)} {logits.dtype}; "
          f"first call {compile_s:.2f} s (compile), then {run_s * 1e3:.1f} ms")
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1))
    uniform = float(jnp.log(config.vocab_size))
    print(f"next-token loss on random tokens {float(loss):.3f} (uniform guess: {uniform:.3f})")
    if config.mtp is not None:
        _, mtp_logits = model.with_mtp(tokens)
        print(f"MTP: {len(mtp_logits)} depth(s), logits {[tuple(m.shape) for m in mtp_logits]}")


def _params(args: argparse.Namespace) -> None:
    for name in args.preset or [n for n in presets.names() if not n.endswith("-tiny")]:
        print(f"{name:32s} {param_count(presets.get(name)):>18,}")


def _train(args: argparse.Namespace) -> None:
    from nemojax import config_files
    from nemojax.train.loop import train

    config = config_files.load(args.config, args.overrides)
    result = train(config, args.workdir, progress=not args.no_progress, stop_after=args.stop_after)
    summary = result["summary"]
    def nats(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(f"trained {summary['params']:,} parameters for {summary['steps']} steps in {summary['workdir']}: "
          f"train loss {nats(summary['train_loss'])}, validation loss {nats(summary['validation_loss'])} nats/token")


def _tokenizer(args: argparse.Namespace) -> None:
    from nemojax.data.tokenizers import train_bpe_cli

    raise SystemExit(train_bpe_cli(args.args))


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) overrides from the other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            if "=" in arg:
                overrides.append(arg[len("--config."):])
            elif i + 1 < len(argv):
                overrides.append(f"{arg[len('--config.'):]}={argv[i + 1]}")
                i += 1
            else:
                raise SystemExit(f"{arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="nemojax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    jobs = parser.add_subparsers(dest="job", required=True)
    demo = jobs.add_parser("demo", help="the main job: train the small hybrid on the embedded corpus")
    demo.add_argument("--config", default=str(DEMO_CONFIG))
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(run=_demo)
    forward = jobs.add_parser("forward", help="forward pass of a preset's tiny variant")
    forward.add_argument("--preset", default="nemotron-3-super-120b-a12b",
                         choices=[n for n in presets.names() if not n.endswith("-tiny")])
    forward.add_argument("--seq", type=int, default=64)
    forward.add_argument("--batch", type=int, default=2)
    forward.add_argument("--seed", type=int, default=0)
    forward.set_defaults(run=_forward)
    params = jobs.add_parser("params", help="parameter counts of full-size presets")
    params.add_argument("--preset", action="append")
    params.set_defaults(run=_params)
    train = jobs.add_parser("train", help="train from an ml_collections config file; resumes from the workdir")
    train.add_argument("--config", required=True, help="a Python file with get_config()")
    train.add_argument("--workdir", required=True)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--stop-after", type=int, default=None,
                       help="stop after this many steps of this invocation, with a checkpoint (to resume later)")
    train.set_defaults(run=_train)
    tokenizer = jobs.add_parser("tokenizer", help="tokenizer jobs: `nemojax tokenizer train --help`")
    tokenizer.add_argument("action", choices=["train"])
    tokenizer.add_argument("args", nargs=argparse.REMAINDER)
    tokenizer.set_defaults(run=_tokenizer)
    argv, overrides = _split_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    args.overrides = overrides
    args.run(args)


if __name__ == "__main__":
    main()
