"""The `nemojax` command: one subcommand per job.

    nemojax demo [--workdir runs/demo] [--config.train.steps=100 ...] [--no-compress] [--no-quantize]
        the main job: trains the small hybrid of configs/small_hybrid.py on the Python standard library's source,
        evaluates it, draws the loss curve and compares the validation loss with the corpus' unigram entropy; then
        prunes it to about half its parameters and distills it back (configs/minitron_small.py, in
        <workdir>/minitron) and prints a before/after table; then quantizes it to NVFP4 (PTQ) and recovers it with
        QAD (configs/nvfp4_qad.py, in <workdir>/nvfp4) and prints a second table
    nemojax prune --config configs/minitron_small.py --teacher runs/demo --workdir runs/minitron
                  [--config.prune.hidden=384 ...]
        Minitron width/depth pruning of a teacher (a training workdir or a Hugging Face folder): importance on
        calibration batches (workdir/scores.npz, reused when present), prune to the config's targets, save the
        student as a Hugging Face checkpoint in workdir/pruned; prints parameters and validation loss before/after
    nemojax distill --config configs/minitron_small.py --workdir runs/minitron [--teacher DIR --config.distill.steps=60]
        logit distillation of workdir/pruned from the teacher (default: the one `prune` used) into workdir/distilled;
        prints the validation loss before/after and the teacher's; metrics in workdir/metrics.jsonl; checkpoints
        in the workdir, so a rerun resumes (--stop-after N ends after N steps)
    nemojax quantize --config configs/nvfp4_qad.py --teacher runs/demo --workdir runs/nvfp4 [--config.recipe=fp8]
        post-training quantization: apply a recipe (nemojax.quant.recipes), calibrate on training batches, save the
        quantized checkpoint in NVIDIA's ModelOpt layout in workdir/ptq; prints weight storage and validation loss
    nemojax qad --config configs/nvfp4_qad.py --workdir runs/nvfp4 [--teacher DIR --config.qad.steps=60]
        quantization-aware distillation of workdir/ptq from the high-precision teacher (default: the one
        `quantize` used) into workdir/qad; prints the validation losses; metrics in workdir/metrics.jsonl;
        checkpoints in the workdir, so a rerun resumes (--stop-after N ends after N steps)
    nemojax elastify --config configs/elastic_small.py --teacher runs/demo --workdir runs/elastic
        Nemotron Elastic: importance, permutation and budget routers, then one elastic distillation run (two-stage
        curriculum) from the frozen teacher; saves every nested model in one checkpoint (workdir/elastic,
        `nemojax.elastic.load`) and each budget's submodel as a Hugging Face checkpoint (workdir/budget_<b>);
        prints parameters and validation loss per budget; checkpoints in the workdir, so a rerun resumes
    nemojax forward [--preset nemotron-3-super-120b-a12b] [--seq 64]
        builds the preset's tiny variant, runs a jitted forward pass and an MTP pass, and prints what it did
    nemojax params [--preset NAME ...]
        parameter counts of full-size presets, from shapes alone
    nemojax memory [--preset nemotron-nano-9b-v2 --batch 1 --context 131072 --dtype bfloat16 --budget-gib 22]
        inference memory plan (weights, KV cache, Mamba SSM and conv state) and whether it fits a budget
    nemojax train --config configs/x.py --workdir runs/x [--config.train.steps=200 ...]
        trains (resuming from the workdir's newest checkpoint) and prints a summary
    nemojax tokenizer train --out tok.json [--vocab-size 4096 --kind stdlib ...]
        fits a byte-level BPE on a corpus and saves it as a Hugging Face tokenizer.json
    nemojax generate --checkpoint DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens 128 --temperature 0
                     --top-k 0 --top-p 1 --repetition-penalty 1 --seed 0 --stop STR ... --speculative K
                     --chat --system TEXT --chat-template FILE --thinking on|off --thinking-budget N
                     --tokenizer PATH|byte --dtype float32 --no-stream]
        generates from a Hugging Face checkpoint folder (config.json + safetensors + tokenizer.json) or a
        `nemojax train` workdir (run.json + orbax checkpoints; the newest step). Greedy unless --temperature > 0.
        --chat sends each prompt as a user message (after --system) through a chat template (--chat-template, else the
        one beside the tokenizer.json, else a plain "role: content" fallback); --thinking sets the reasoning toggle and
        --thinking-budget N forces "</think>" after N thinking tokens (arXiv 2505.00949; Nano 2). With one prompt the
        completion is streamed to stdout as it is generated (unless --no-stream); otherwise each completion is
        printed at the end, a chat reply that thought as "<think>\n{reasoning}\n</think>\n{answer}" (the tags
        written out even when they are special tokens, which streaming drops). Only completions go to stdout; a
        one-line summary (tokens, seconds including compilation, tokens/s, finish reason, draft acceptance) goes to
        stderr.

Errors: a user error (a bad config override or value, a missing config file or checkpoint, a workdir that holds
a run of another configuration, a loss that became NaN) ends the job with one line on stderr,
`nemojax <job>: error: <message>`, and exit status 2, as argparse does for bad arguments; any other exception is a
bug and keeps its traceback. `--debug`, before or after the job name (`nemojax --debug train ...` or
`nemojax train --debug ...`), re-raises user errors too, with their traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from nemojax import presets
from nemojax.model import Model, param_count

# Config names, found by `config_files.resolve`: ./configs/<name> when the working directory has one (a checkout),
# else the copy shipped inside the package (a plain `pip install`).
DEMO_CONFIG = "configs/small_hybrid.py"
COMPRESS_CONFIG = "configs/minitron_small.py"
ELASTIC_CONFIG = "configs/elastic_small.py"
QUANT_CONFIG = "configs/nvfp4_qad.py"


def _demo(args: argparse.Namespace) -> None:
    from nemojax.jobs.demo import run_demo

    run_demo(args.workdir, args.config, args.overrides,
             compress_config=None if args.no_compress else args.compress_config,
             compress_overrides=args.compress_override or [],
             quant_config=None if args.no_quantize else args.quant_config,
             quant_overrides=args.quant_override or [], progress=not args.no_progress)


def _quantize(args: argparse.Namespace) -> None:
    from nemojax.jobs import quantize as pipeline

    config = _compress_args(args)
    teacher_path = args.teacher or config.teacher
    teacher = _load_teacher(teacher_path)
    summary = pipeline.quantize_job(config, teacher, args.workdir, teacher_path=teacher_path)
    print(pipeline.table([("teacher", summary["teacher"]), (f"{config.recipe} PTQ", summary["ptq"])]))
    print(f"saved {Path(args.workdir) / pipeline.PTQ_DIR} in {summary['seconds']:.0f} s")


def _qad(args: argparse.Namespace) -> None:
    from nemojax.jobs import quantize as pipeline

    config = _compress_args(args)
    teacher_path = args.teacher or pipeline.recorded_teacher(args.workdir) or config.teacher
    teacher = _load_teacher(teacher_path)
    summary = pipeline.qad_job(config, teacher, args.workdir, progress=not args.no_progress,
                               stop_after=args.stop_after)
    if "stopped_at" in summary:
        return  # the fit loop said where it stopped; rerun to resume
    print(pipeline.table([("teacher", summary["teacher"]), ("PTQ", summary["ptq"]), ("QAD", summary["qad"])]))
    print(f"saved {Path(args.workdir) / pipeline.QAD_DIR} after {summary['steps']} steps in "
          f"{summary['seconds']:.0f} s")


def _compress_args(args: argparse.Namespace):
    from nemojax import config_files

    return config_files.load(args.config, args.overrides)


def _load_teacher(path: str) -> Model:
    """The teacher checkpoint's model; an unusable one is a user error whose message starts with "teacher: "."""
    from nemojax.infer.load import load_checkpoint

    try:
        return load_checkpoint(path, tokenizer="byte")[0]
    except ValueError as error:
        raise ValueError(f"teacher: {error}") from error


def _prune(args: argparse.Namespace) -> None:
    from nemojax.jobs import minitron as pipeline

    config = _compress_args(args)
    teacher_path = args.teacher or config.teacher
    teacher = _load_teacher(teacher_path)
    summary = pipeline.prune_job(config, teacher, args.workdir, teacher_path=teacher_path)
    t, p = summary["teacher"], summary["pruned"]
    print(f"teacher {teacher_path}: {t['params']:,} parameters, validation loss {t['val_loss']:.3f} nats/token")
    print(f"pruned: {p['params']:,} parameters ({p['params'] / t['params']:.0%}; {pipeline.size_change(t, p)}), "
          f"validation loss {p['val_loss']:.3f} nats/token")
    print(f"saved {Path(args.workdir) / pipeline.PRUNED_DIR} in {summary['seconds']:.0f} s")


def _elastify(args: argparse.Namespace) -> None:
    from nemojax.jobs import elastic as pipeline

    config = _compress_args(args)
    teacher_path = args.teacher or config.teacher
    teacher = _load_teacher(teacher_path)
    summary = pipeline.elastify_job(config, teacher, args.workdir, teacher_path=teacher_path,
                                    progress=not args.no_progress, stop_after=args.stop_after)
    if "stopped_at" in summary:
        return  # the fit loop said where it stopped; rerun to resume
    print(pipeline.table(summary))
    print(f"saved {Path(args.workdir) / pipeline.ELASTIC_DIR} (every nested model, "
          f"{summary['checkpoint_bytes']:,} bytes) and budget_<b>/ after {summary['steps']} steps in "
          f"{summary['seconds']:.0f} s")


def _distill(args: argparse.Namespace) -> None:
    from nemojax.jobs import minitron as pipeline

    config = _compress_args(args)
    teacher_path = args.teacher or pipeline.recorded_teacher(args.workdir) or config.teacher
    teacher = _load_teacher(teacher_path)
    summary = pipeline.distill_job(config, teacher, args.workdir, teacher_path=teacher_path,
                                   progress=not args.no_progress, stop_after=args.stop_after)
    if "stopped_at" in summary:
        return  # the fit loop said where it stopped; rerun to resume
    print(f"teacher {teacher_path}: {summary['teacher']['params']:,} parameters, validation loss "
          f"{summary['teacher']['val_loss']:.3f} nats/token")
    print(f"student: {summary['distilled']['params']:,} parameters, validation loss "
          f"{summary['pruned']['val_loss']:.3f} -> {summary['distilled']['val_loss']:.3f} nats/token after "
          f"{summary['steps']} distillation steps ({summary['seconds']:.0f} s)")
    print(f"saved {Path(args.workdir) / pipeline.DISTILLED_DIR}; metrics: {Path(args.workdir) / 'metrics.jsonl'}")


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


def _memory(args: argparse.Namespace) -> None:
    from nemojax.infer.memory import cache_bytes, max_context

    config = presets.get(args.preset)
    plan = cache_bytes(config, args.batch, args.context, dtype=args.dtype, weight_dtype=args.dtype, mtp=args.mtp)
    print(f"{args.preset}: batch {args.batch}, context {args.context:,}, {args.dtype} weights and cache "
          "(SSM state float32)")
    print(plan.table())
    if args.budget_gib is not None:
        budget = int(args.budget_gib * 2**30)
        verdict = "fits" if plan.total <= budget else "does not fit"
        longest = max_context(config, args.batch, budget, dtype=args.dtype, weight_dtype=args.dtype, mtp=args.mtp)
        print(f"{verdict} in {args.budget_gib:g} GiB; the longest context that fits: {longest:,} tokens")


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


class _StreamPrinter:
    """The `stream` callback of `generate` for one sequence: decodes every id so far and prints the new suffix.

    Holds back trailing U+FFFD (a UTF-8 character whose bytes have not all arrived), text from a stop string on,
    and an ending that may be the start of a stop string, so what it prints is always a prefix of the final text.
    """

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.printed = ""

    def _write(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def _safe(self, text: str) -> str:
        cut = len(text)
        for stop in self.stops:
            found = text.find(stop)
            if found >= 0:
                cut = min(cut, found)
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return text[:cut].rstrip("\ufffd")

    def __call__(self, step, tokens, active) -> None:
        del step
        if bool(active[0]):
            self.ids.append(int(tokens[0]))
            self._write(self._safe(self.tokenizer.decode(self.ids)))

    def finish(self, text: str) -> None:
        """Prints the rest of the final `text` (stop strings already cut by `generate`) and a newline."""
        self._write(text)
        sys.stdout.write("\n")
        sys.stdout.flush()


def _generate(args: argparse.Namespace) -> None:
    from nemojax.infer.chat import chat, prompt_open_thinking, thinking_budget_for
    from nemojax.infer.generate import generate
    from nemojax.infer.load import load_checkpoint

    if not args.chat:
        for flag, value in (("--system", args.system), ("--thinking", args.thinking),
                            ("--chat-template", args.chat_template)):
            if value is not None:
                raise ValueError(f"{flag} applies to chat prompts; add --chat")
    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise ValueError(f"--chat-template {args.chat_template!r} is not a file")
        template = path.read_text(encoding="utf-8")
    model, tokenizer = load_checkpoint(args.checkpoint, tokenizer=args.tokenizer, dtype=args.dtype)
    stops = list(args.stop or [])
    printer = None
    if len(args.prompt) == 1 and not args.no_stream:
        printer = _StreamPrinter(tokenizer, stops)
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=stops,
                  speculative=args.speculative, stream=printer)
    if args.chat:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        conversations = [[*system, {"role": "user", "content": p}] for p in args.prompt]
        out = chat(model, tokenizer, conversations, template=template, thinking=args.thinking,
                   thinking_budget=args.thinking_budget, **kwargs)
    else:
        budget = None if args.thinking_budget is None else thinking_budget_for(tokenizer, args.thinking_budget)
        out = generate(model, args.prompt, tokenizer=tokenizer, thinking_budget=budget,
                       prompt_open=[prompt_open_thinking(p) for p in args.prompt], **kwargs)
    texts = out.text
    if args.chat:  # the thinking block shown with its tags, which decoding drops when they are special tokens
        texts = [answer if reasoning is None else f"<think>\n{reasoning}\n</think>\n{answer}"
                 for reasoning, answer in zip(out.reasoning, out.answer, strict=True)]
    if printer is not None:
        printer.finish(out.text[0])
    else:
        for i, (prompt, text) in enumerate(zip(args.prompt, texts, strict=True)):
            if len(args.prompt) > 1:
                print(f"--- prompt {i + 1} of {len(args.prompt)}: {prompt!r}")
            print(text, flush=True)
    stats = out.stats
    summary = (f"generate: {int(stats['new_tokens'])} tokens in {stats['seconds']:.2f} s "
               f"({stats['tokens_per_s']:.1f} tokens/s, compilation included), "
               f"finish: {', '.join(out.finish_reason)}")
    if "acceptance_rate" in stats:
        summary += (f", draft acceptance {stats['acceptance_rate']:.2f} ({int(stats['draft_tokens'])} drafts, "
                    f"{stats['tokens_per_round']:.2f} tokens/round)")
    print(summary, file=sys.stderr, flush=True)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=value` (or `--config.a.b value`) overrides from the other arguments; a last
    `--config.a.b` without a value raises ValueError."""
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
                raise ValueError(f"{arg} needs a value (--config.a.b=value or --config.a.b value)")
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
    demo.add_argument("--no-compress", action="store_true", help="skip the prune + distill stage")
    demo.add_argument("--compress-config", default=str(COMPRESS_CONFIG),
                      help="the compression config of the prune + distill stage")
    demo.add_argument("--no-quantize", action="store_true", help="skip the NVFP4 PTQ + QAD stage")
    demo.add_argument("--quant-config", default=str(QUANT_CONFIG),
                      help="the quantization config of the PTQ + QAD stage")
    demo.add_argument("--compress-override", action="append", metavar="KEY=VALUE",
                      help="an override of the compression config (e.g. distill.steps=10); repeatable")
    demo.add_argument("--quant-override", action="append", metavar="KEY=VALUE",
                      help="an override of the quantization config (e.g. qad.steps=10); repeatable")
    demo.set_defaults(run=_demo)
    for name, helptext in (("prune", "Minitron pruning of a teacher checkpoint into workdir/pruned"),
                           ("distill", "distill workdir/pruned from the teacher into workdir/distilled")):
        job = jobs.add_parser(name, help=helptext)
        job.add_argument("--config", default=str(COMPRESS_CONFIG), help="a compression config (get_config())")
        job.add_argument("--workdir", required=True)
        job.add_argument("--teacher", default=None,
                         help="a training workdir or Hugging Face folder (default: config.teacher"
                              + ("" if name == "prune" else ", or the one `prune` recorded") + ")")
        if name == "distill":
            job.add_argument("--no-progress", action="store_true", help="no progress bar")
            job.add_argument("--stop-after", type=int, default=None,
                             help="stop after this many steps (checkpointed in the workdir); run again to resume")
        job.set_defaults(run=_prune if name == "prune" else _distill)
    for name, helptext in (("quantize", "post-training quantization of a teacher into workdir/ptq"),
                           ("qad", "quantization-aware distillation of workdir/ptq into workdir/qad")):
        job = jobs.add_parser(name, help=helptext)
        job.add_argument("--config", default=str(QUANT_CONFIG), help="a quantization config (get_config())")
        job.add_argument("--workdir", required=True)
        job.add_argument("--teacher", default=None,
                         help="a training workdir or Hugging Face folder (default: config.teacher"
                              + ("" if name == "quantize" else ", or the one `quantize` recorded") + ")")
        if name == "qad":
            job.add_argument("--no-progress", action="store_true", help="no progress bar")
            job.add_argument("--stop-after", type=int, default=None,
                             help="stop after this many steps (checkpointed in the workdir); run again to resume")
        job.set_defaults(run=_quantize if name == "quantize" else _qad)
    elastify = jobs.add_parser("elastify", help="Nemotron Elastic: nested submodels of a teacher in one checkpoint")
    elastify.add_argument("--config", default=str(ELASTIC_CONFIG), help="an elastic config (get_config())")
    elastify.add_argument("--workdir", required=True)
    elastify.add_argument("--teacher", default=None,
                          help="a training workdir or Hugging Face folder (default: config.teacher)")
    elastify.add_argument("--no-progress", action="store_true", help="no progress bar")
    elastify.add_argument("--stop-after", type=int, default=None,
                          help="stop after this many steps (checkpointed in the workdir); run again to resume")
    elastify.set_defaults(run=_elastify)
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
    memory = jobs.add_parser("memory", help="inference memory plan: weights + KV + SSM + conv state")
    memory.add_argument("--preset", default="nemotron-nano-9b-v2", choices=presets.names())
    memory.add_argument("--batch", type=int, default=1)
    memory.add_argument("--context", type=int, default=131072)
    memory.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    memory.add_argument("--budget-gib", type=float, default=None, help="say whether it fits in this much memory")
    memory.add_argument("--mtp", action="store_true", help="count the MTP head's caches (speculative decoding)")
    memory.set_defaults(run=_memory)
    train = jobs.add_parser("train", help="train from an ml_collections config file; resumes from the workdir")
    train.add_argument("--config", required=True,
                       help="a Python file with get_config(), or a shipped config by name (tiny, small_hybrid, ...)")
    train.add_argument("--workdir", required=True)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--stop-after", type=int, default=None,
                       help="stop after this many steps of this invocation, with a checkpoint (to resume later)")
    train.set_defaults(run=_train)
    tokenizer = jobs.add_parser("tokenizer", help="tokenizer jobs: `nemojax tokenizer train --help`")
    tokenizer.add_argument("action", choices=["train"])
    tokenizer.add_argument("args", nargs=argparse.REMAINDER)
    tokenizer.set_defaults(run=_tokenizer)
    gen = jobs.add_parser("generate", help="generate text from a Hugging Face checkpoint or a training workdir")
    gen.add_argument("--checkpoint", required=True,
                     help="a Hugging Face checkpoint folder (config.json) or a `nemojax train` workdir (run.json)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 keeps every token")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="a stop string; repeatable")
    gen.add_argument("--speculative", type=int, default=0,
                     help="draft this many tokens per step with the model's MTP head (greedy only)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user message via the chat template")
    gen.add_argument("--system", default=None, help="a system message (with --chat)")
    gen.add_argument("--chat-template", default=None, help="a Jinja chat template file (with --chat)")
    gen.add_argument("--thinking", choices=["on", "off"], default=None, help="the reasoning toggle (with --chat)")
    gen.add_argument("--thinking-budget", type=int, default=None,
                     help="force </think> after this many thinking tokens (at the next newline, within 10%%)")
    gen.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json path, instead of the checkpoint's")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="compute dtype")
    gen.add_argument("--no-stream", action="store_true", help="print the completion only when it is finished")
    gen.set_defaults(run=_generate)
    parser.add_argument("--debug", action="store_true",
                        help="show user errors (bad config, missing file, ...) with their traceback")
    for job in jobs.choices.values():  # also after the job name; SUPPRESS keeps the value given before it
        job.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show user errors with their traceback")
    try:
        argv, overrides = _split_overrides(sys.argv[1:] if argv is None else list(argv))
    except ValueError as error:
        parser.error(str(error))  # usage + "nemojax: error: ...", exit status 2, as for any bad argument
    args = parser.parse_args(argv)
    args.overrides = overrides
    _run_job(args)


# User errors: bad input the user can fix (bad config values and overrides, a config, checkpoint or workdir path
# that is not there, not usable or not writable). CheckpointError is a ValueError; NonFiniteLossError (the loss
# diverged) is checked by `_is_user_error`, imported only then so that light jobs do not import the trainer.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
               PermissionError)
ERROR_EXIT_STATUS = 2  # argparse's status for bad arguments


class JobError(SystemExit):
    """How a job ends on a user error: exit status 2 (`code`), with `str()` the line printed on stderr,
    "nemojax <job>: error: <message>" (so in-process callers and tests can read it)."""

    def __init__(self, line: str):
        super().__init__(line)
        self.code = ERROR_EXIT_STATUS


def _run_job(args: argparse.Namespace) -> None:
    """Resolves the config arguments and runs the job; a user error ends it with one stderr line and exit status
    2 (`JobError`), unless --debug asks for the traceback. Any other exception propagates unchanged."""
    try:
        _resolve_configs(args)
        args.run(args)
    except Exception as error:
        if args.debug or not _is_user_error(error):
            raise
        line = f"nemojax {args.job}: error: {_one_line(error)}"
        print(line, file=sys.stderr, flush=True)
        raise JobError(line) from error


def _is_user_error(error: Exception) -> bool:
    if isinstance(error, USER_ERRORS):
        return True
    if not isinstance(error, FloatingPointError):
        return False
    from nemojax.train.fit import NonFiniteLossError

    return isinstance(error, NonFiniteLossError)


def _one_line(error: Exception) -> str:
    """The error's message on one line: its lines stripped and joined ("; " between them, a space after a line
    ending in ":"), or the exception's class name when the message is empty."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def _resolve_configs(args: argparse.Namespace) -> None:
    """Turns every config argument into the file it names (working directory first, then the shipped configs);
    a name that matches nothing raises ValueError with the places it looked, before any work starts."""
    from nemojax import config_files

    for field in ("config", "compress_config", "quant_config"):
        name = getattr(args, field, None)
        if isinstance(name, str):
            setattr(args, field, str(config_files.resolve(name)))


if __name__ == "__main__":
    main()
