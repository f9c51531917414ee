"""CPU benchmark of `nemojax.compress.importance` on a ~60M hybrid (issue 5, point 4: under 2 minutes).

    .venv/bin/python experiments/bench_importance.py                # full run: 256 sequences of 512 tokens
    .venv/bin/python experiments/bench_importance.py --quick        # smoke run: 32 sequences
    options: --seqs --seq-len --batch --lm-seqs --threads --out   (see --help)

What it measures, in one run:

1. `importance(model, batches, layer_metrics=("block",))` (the default agg "mean_l2", float32) on
   `bench_config()` of experiments/bench_forward.py (vocab 32000, hidden 512, 16 layers, pattern
   "M-M*-M-M-M*-M-M-"), over `--seqs` sequences of `--seq-len` tokens in batches of `--batch`. The tokens are
   RANDOM ids uniform in the model's vocab (seed 0): the stdlib corpus through nemojax.data's byte tokenizer
   needs vocab 260, and the cost of the forward does not depend on which ids are fed. The run starts from cold
   jit caches (`jax.clear_caches()`), so its end-to-end wall time includes XLA compilation; the batch iterator
   records when each batch is pulled, so compile = first batch's interval - median of the other intervals, and
   run = end-to-end - compile. The target is end-to-end under 120 s.
2. For reference, the plain jitted forward (`nemojax.model.forward`, logits included) over the same batches,
   compiled beforehand (AOT), so importance's overhead for its statistics can be read off. Note that
   importance never materialises the logits (XLA drops the unused lm_head), so it may be cheaper than this;
   the same forward of a vocab-260 variant of the model (same trunk, negligible lm_head, token ids taken
   mod 260) is timed too, as the fair baseline for the statistics' overhead.
3. Not part of the target: `layer_metrics=("block", "lm_loss", "logits_mse")` on the first `--lm-seqs`
   sequences, in batches of at most half of them so that compile and run can be split (one extra forward per
   layer, plus the reference forward, per batch); reported separately, with its run time extrapolated to all
   `--seqs`.

The 1-min load average is printed before and after: the machine's cores are shared, so timings are noisy when
it is high. A summary block is printed and the same numbers are written to runs/bench_importance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))
EXPERIMENTS = Path(__file__).resolve().parent
if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nemojax.compress import importance  # noqa: E402
from nemojax.model import Model, forward  # noqa: E402

TARGET_S = 120.0  # end-to-end seconds for 256 x 512 tokens (issue 5, point 4)
LOAD_WARNING = 0.5
DEFAULT_OUT = REPO_ROOT / "runs" / "bench_importance.json"


def bench_config():
    """bench_forward.py's ~60M hybrid, imported lazily (that module imports torch and transformers)."""
    from bench_forward import bench_config as config
    return config()


class TimedBatches:
    """Iterates over `tokens` [n, L] in batches of `batch` rows, recording the time each batch is pulled.

    importance() pulls batch i+1 only after batch i's statistics are on the host, so the intervals between pulls
    (and from the last pull to the end of the call) are the per-batch wall times."""

    def __init__(self, tokens: np.ndarray, batch: int) -> None:
        self.tokens, self.batch = tokens, batch
        self.pulls: list[float] = []

    def __iter__(self) -> Iterator[np.ndarray]:
        for start in range(0, self.tokens.shape[0], self.batch):
            self.pulls.append(time.perf_counter())
            yield self.tokens[start:start + self.batch]


def run_importance(model: Model, tokens: np.ndarray, batch: int, metrics: tuple[str, ...]) -> dict[str, Any]:
    """One cold-cache importance() call; end-to-end, compile and run seconds, per-batch intervals."""
    jax.clear_caches()
    batches = TimedBatches(tokens, batch)
    start = time.perf_counter()
    scores = importance(model, batches, layer_metrics=metrics)
    end = time.perf_counter()
    marks = batches.pulls + [end]
    intervals = np.diff(marks).tolist()
    steady = statistics.median(intervals[1:]) if len(intervals) > 1 else 0.0
    compile_s = max(intervals[0] - steady, 0.0)
    total = end - start
    n_tok = int(tokens.size)
    return {
        "layer_metrics": list(metrics),
        "sequences": int(tokens.shape[0]),
        "tokens": n_tok,
        "batch": batch,
        "end_to_end_s": total,
        "compile_s": compile_s,
        "run_s": total - compile_s,
        "batch_median_s": steady,
        "batch_intervals_s": intervals,
        "tok_s_run": n_tok / (total - compile_s),
        "tok_s_end_to_end": n_tok / total,
        "score_arrays": len(scores),
        "layer_block": np.asarray(scores["layer/block"]).tolist(),
    }


def run_forward(model: Model, tokens: np.ndarray, batch: int) -> dict[str, Any]:
    """Plain jitted forward over the same batches (AOT compile timed apart), blocking on each batch's logits."""
    config = model.config
    first = jnp.asarray(tokens[:batch])
    start = time.perf_counter()
    compiled = forward.lower(config, model.params, first).compile()
    compile_s = time.perf_counter() - start
    compiled(model.params, first).block_until_ready()  # warm-up
    start = time.perf_counter()
    for i in range(0, tokens.shape[0], batch):
        compiled(model.params, jnp.asarray(tokens[i:i + batch])).block_until_ready()
    run_s = time.perf_counter() - start
    return {"compile_s": compile_s, "run_s": run_s, "tok_s": tokens.size / run_s}


def pin_threads(threads: int | None) -> int:
    available = sorted(os.sched_getaffinity(0))
    n = len(available) if threads is None else threads
    if not 1 <= n <= len(available):
        raise SystemExit(f"--threads {n}: this process may use {len(available)} cores")
    os.sched_setaffinity(0, available[:n])
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=None, help="calibration sequences (default 256; 32 with --quick)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--batch", type=int, default=8, help="sequences per importance batch (default 8)")
    p.add_argument("--lm-seqs", type=int, default=None,
                   help="sequences for the lm_loss/logits_mse timing, 0 = skip (default 16; 8 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="cores for XLA (default: all available)")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    args.seqs = args.seqs or (32 if args.quick else 256)
    if args.lm_seqs is None:
        args.lm_seqs = 8 if args.quick else 16
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = pin_threads(args.threads)
    load_before = os.getloadavg()
    env = {"threads": threads, "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
           "jax": jax.__version__, "jax_backend": jax.default_backend(), "python": platform.python_version()}
    print(f"threads: XLA on {threads} core(s); jax backend {jax.default_backend()}; "
          f"1-min load average {load_before[0]:.2f}")
    if load_before[0] > LOAD_WARNING:
        print("warning: other processes are using the CPU; timings will be noisy (and pessimistic)")

    config = bench_config()
    model = Model.init(config, 0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (args.seqs, args.seq_len)).astype(np.int32)
    print(f"model: {model.num_params:,} params, pattern {config.pattern}, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, {config.runtime.dtype} compute")
    print(f"data: {args.seqs} sequences x {args.seq_len} tokens of random ids in [0, {config.vocab_size}), "
          f"batches of {args.batch}")

    imp = run_importance(model, tokens, args.batch, ("block",))
    print(f"importance(block): end-to-end {imp['end_to_end_s']:.1f} s = compile {imp['compile_s']:.1f} s "
          f"+ run {imp['run_s']:.1f} s ({imp['batch_median_s']:.2f} s/batch median)")
    fwd = run_forward(model, tokens, args.batch)
    print(f"plain forward: run {fwd['run_s']:.1f} s (compile {fwd['compile_s']:.1f} s, excluded)")
    trunk_model = Model.init(config.replace(vocab_size=260), 0)
    trunk = run_forward(trunk_model, tokens % 260, args.batch)
    trunk["num_params"] = trunk_model.num_params
    print(f"plain forward, vocab-260 variant ({trunk_model.num_params:,} params): run {trunk['run_s']:.1f} s "
          f"(compile {trunk['compile_s']:.1f} s, excluded)")

    lm = None
    if args.lm_seqs > 0:
        n = min(args.lm_seqs, args.seqs)
        lm_batch = min(args.batch, max(1, n // 2))  # at least two batches, so compile and run can be split
        lm = run_importance(model, tokens[:n], lm_batch, ("block", "lm_loss", "logits_mse"))
        lm["extrapolated_run_s"] = lm["run_s"] * args.seqs / n
        print(f"importance(block, lm_loss, logits_mse) on {n} sequences: end-to-end {lm['end_to_end_s']:.1f} s "
              f"= compile {lm['compile_s']:.1f} s + run {lm['run_s']:.1f} s")

    scale = 256 * 512 / tokens.size  # the target's token count over this run's
    ratio = imp["end_to_end_s"] / TARGET_S
    load_after = os.getloadavg()
    print(f"\nsummary ({threads} thread(s), load average {load_before[0]:.2f} -> {load_after[0]:.2f}):")
    print(f"  importance(block)  {imp['tokens']:,} tokens  end-to-end {imp['end_to_end_s']:.1f} s  "
          f"(compile {imp['compile_s']:.1f} s + run {imp['run_s']:.1f} s)  {imp['tok_s_run']:.0f} tok/s run")
    if scale != 1.0:
        est = imp["compile_s"] + imp["run_s"] * scale
        print(f"  estimated for 256 x 512 tokens: {est:.1f} s = {est / TARGET_S:.2f} x the {TARGET_S:.0f} s target "
              f"({'ok' if est < TARGET_S else 'OVER TARGET'})")
    else:
        print(f"  vs target: {ratio:.2f} x the {TARGET_S:.0f} s target "
              f"({'ok' if imp['end_to_end_s'] < TARGET_S else 'OVER TARGET'})")
    print(f"  plain forward      run {fwd['run_s']:.1f} s  {fwd['tok_s']:.0f} tok/s  "
          f"-> importance run = {imp['run_s'] / fwd['run_s']:.2f} x the forward's run time")
    print(f"  trunk forward      run {trunk['run_s']:.1f} s  {trunk['tok_s']:.0f} tok/s  (vocab 260: no lm_head cost) "
          f"-> importance run = {imp['run_s'] / trunk['run_s']:.2f} x (the statistics' overhead)")
    if lm is not None:
        print(f"  + lm_loss, logits_mse ({lm['sequences']} seqs, not in the target): run {lm['run_s']:.1f} s "
              f"({lm['tok_s_run']:.0f} tok/s), ~{lm['extrapolated_run_s']:.0f} s for {args.seqs} seqs")

    env["loadavg_before"], env["loadavg_after"] = list(load_before), list(load_after)
    report = {"argv": sys.argv[1:] if argv is None else argv, "env": env,
              "model": {"num_params": model.num_params, "pattern": config.pattern, "hidden_size": config.hidden_size,
                        "vocab_size": config.vocab_size, "num_layers": config.num_layers,
                        "dtype": config.runtime.dtype},
              "data": {"sequences": args.seqs, "seq_len": args.seq_len, "tokens": "random ids, seed 0"},
              "importance_block": imp, "forward": fwd, "forward_vocab260": trunk, "importance_all_metrics": lm,
              "target_s": TARGET_S, "ratio_to_target": ratio, "scale_to_target_tokens": scale}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
