"""CPU cost of the elastic model's masked forward against the plain forward of the full model and of each extracted
nested submodel (Nemotron Elastic, arXiv 2511.16664: training runs every budget through one masked model; serving
runs the extracted prefix slices).

    .venv/bin/python experiments/bench_elastic.py            # demo hybrid (22.1M params), a few minutes on 2 cores
    .venv/bin/python experiments/bench_elastic.py --tiny     # test scale (the suite runs it)
    options: --shapes --repeats --elastic --out   (see --help)

Model: configs/small_hybrid.py (the demo hybrid, pattern "M-M*-M-M-M*-M-", hidden 512; --tiny: configs/tiny.py),
random init, float32, importance-ordered by `elastic.permute` on random-token activations, every width axis
elastic. The size of each budget (1.0 / 0.75 / 0.5 of the parameters) is the homogeneous choice whose exact
parameter count is nearest the budget (ties: the larger hidden size), or, with --elastic DIR, the routers' choice
of that checkpoint (`elastic.save`, e.g. runs/elastic_nested/nested from experiments/elastic_nested.py), whose
weights are then used.

What runs, per shape [batch, seq], each jit-compiled ahead of time (compile excluded), one warm-up call, then the
median of --repeats calls, all functions interleaved (a, b, c, a, b, c, ...) so load from other processes hits all
alike:

- plain: `nemojax.model.forward` of the full model (prefill logits).
- masked b: `elastic.forward` under the prefix masks of budget b, the sizes traced: ONE executable serves every
  budget (what the elastic training step runs), so its cost cannot fall with the budget.
- extracted b: `nemojax.model.forward` of `elastic.slice_sizes` (the deployed submodel).
- with --grad: value and gradient of the mean logit for plain and masked (the training side; no target).

Targets (issue 16 acceptance): masked / plain <= 1.1 at every budget; extracted 0.5 faster than plain. Each shape
gets its verdict (and with --grad, masked grad / plain grad <= 1.1: the training step). The masks act on the
activations (`nemojax.nn.live`: a multiply over tokens x width, fused into the surrounding ops); the params are
never copied. The masked logits are checked against the extracted model's (float32,
relative 1e-5). Prints the CPU model beside the figures and writes experiments/results/elastic/bench_elastic.json
(--tiny: bench_elastic_tiny.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nemojax  # noqa: E402
from nemojax import config_files, elastic  # noqa: E402
from nemojax.compress.importance import importance  # noqa: E402
from nemojax.model import Model  # noqa: E402
from nemojax.model import forward as plain_forward  # noqa: E402
from nemojax.train.loop import model_config  # noqa: E402

BUDGETS = (1.0, 0.75, 0.5)
MASKED_TARGET = 1.1  # masked forward / plain forward of the full model, at most
RTOL = 1e-5
RESULTS = REPO_ROOT / "experiments" / "results" / "elastic"  # own folder: the device-bench tests read results/*.json
CONFIGS = {False: REPO_ROOT / "configs" / "small_hybrid.py", True: REPO_ROOT / "configs" / "tiny.py"}
LOAD_WARNING = 0.5  # 1-min load average above which the timings are flagged as noisy


# ------------------------------------------------------------------------------------------------ the model


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo) and core count."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"


def nearest_sizes(config: Any, choices: elastic.Choices, budget: float) -> dict[str, int]:
    """The homogeneous sizes (one choice per axis) whose exact parameter count is nearest budget x the full count;
    ties go to the larger hidden size, then to the earlier (larger) choices."""
    full = nemojax.param_count(config)
    axes = list(choices)
    best = None
    for combo in itertools.product(*(choices[a] for a in axes)):
        sizes = dict(zip(axes, combo, strict=True))
        gap = abs(elastic.count_exact(config, sizes) / full - budget)
        key = (round(gap, 9), -sizes.get("hidden", 0), [-v for v in combo])
        if best is None or key < best[0]:
            best = (key, sizes)
    return best[1]


def bench_model(tiny: bool, elastic_dir: str | None, seq: int) -> tuple[Model, dict[float, dict[str, int]], str]:
    """(the importance-ordered full model, {budget: sizes}, where the sizes came from)."""
    if elastic_dir:
        em = elastic.load(elastic_dir)
        sizes = {b: {a: int(v) for a, v in em.sizes(b).items()} for b in BUDGETS}
        return em.model, sizes, f"routers of {elastic_dir}"
    config = model_config(config_files.load(CONFIGS[tiny], []))
    model = Model.init(config, 0)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, seq))
    permuted = elastic.permute(model, importance(model, [tokens]))
    choices = elastic.default_choices(config)
    return permuted, {b: nearest_sizes(config, choices, b) for b in BUDGETS}, "nearest homogeneous choice"


# ------------------------------------------------------------------------------------------------- timing


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of `repeats` calls of each fn (which blocks until its result is ready), after one warm-up
    call each, interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _rel_err(got: Any, want: Any) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def bench_shape(model: Model, sizes: dict[float, dict[str, int]], batch: int, seq: int, repeats: int,
                grad: bool) -> dict[str, Any]:
    """Timings (median seconds), ratios to the plain forward, compile seconds and logit agreement at one shape."""
    config = model.config
    params = model.params
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq)), jnp.int32)
    traced = {b: {a: jnp.asarray(v, jnp.int32) for a, v in s.items()} for b, s in sizes.items()}
    compile_s: dict[str, float] = {}

    def compiled(name: str, fn: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        out = jax.jit(fn).lower(*args).compile()
        compile_s[name] = time.perf_counter() - start
        return out

    plain = compiled("plain", lambda p, t: plain_forward(config, p, t), params, tokens)
    masked = compiled("masked", lambda p, t, s: elastic.forward(config, p, t, s).logits, params, tokens, traced[1.0])
    extracted = {b: elastic.slice_sizes(model, s) for b, s in sizes.items()}
    runs = {b: compiled(f"extracted {b:g}", lambda p, t, c=m.config: plain_forward(c, p, t), m.params, tokens)
            for b, m in extracted.items()}

    agreement = {f"{b:g}": _rel_err(masked(params, tokens, traced[b]), runs[b](extracted[b].params, tokens))
                 for b in sizes}
    fns: dict[str, Callable[[], Any]] = {"plain": lambda: plain(params, tokens).block_until_ready()}
    for b in sizes:
        fns[f"masked {b:g}"] = lambda b=b: masked(params, tokens, traced[b]).block_until_ready()
        fns[f"extracted {b:g}"] = lambda b=b: runs[b](extracted[b].params, tokens).block_until_ready()
    if grad:
        plain_grad = compiled("plain grad", jax.value_and_grad(lambda p, t: plain_forward(config, p, t).mean()),
                              params, tokens)
        masked_grad = compiled("masked grad", jax.value_and_grad(
            lambda p, t, s: elastic.forward(config, p, t, s).logits.mean()), params, tokens, traced[1.0])
        fns["plain grad"] = lambda: jax.block_until_ready(plain_grad(params, tokens))
        fns["masked grad 0.5"] = lambda: jax.block_until_ready(masked_grad(params, tokens, traced[0.5]))
    times = timed(fns, repeats)
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["plain"]
    ratios = {name: value / base for name, value in median.items()}
    masked_worst = max(ratios[f"masked {b:g}"] for b in sizes)
    verdicts = {"masked_within_target": masked_worst <= MASKED_TARGET,
                "extracted_0.5_faster": median["extracted 0.5"] < base}
    if grad:
        ratios["masked grad 0.5"] = median["masked grad 0.5"] / median["plain grad"]  # against the plain step
        verdicts["masked_grad_within_target"] = ratios["masked grad 0.5"] <= MASKED_TARGET
    # the same architecture compiled as a plain model: a second baseline, which shows how far two compilations of
    # one computation drift apart on this machine
    same = median["masked 1"] / median["extracted 1"]
    return {"batch": batch, "seq": seq, "median_s": median, "times_s": times, "ratio_to_plain": ratios,
            "masked_worst_ratio": masked_worst, "masked_1_over_extracted_1": same, "verdicts": verdicts,
            "compile_s": compile_s, "logits_rel_err_masked_vs_extracted": agreement,
            "params": {f"{b:g}": m.num_params for b, m in extracted.items()}}


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="test scale: configs/tiny.py, small shapes, 2 repeats")
    p.add_argument("--shapes", help="comma-separated BATCHxSEQ prefill shapes (default 1x256,4x512; --tiny 2x64)")
    p.add_argument("--repeats", type=int, help="timed calls per function (default 7; 2 with --tiny)")
    p.add_argument("--grad", action=argparse.BooleanOptionalAction, default=None,
                   help="also time value-and-grad, plain against masked (default on; off with --tiny)")
    p.add_argument("--elastic", help="an elastic checkpoint (elastic.save) whose weights and router sizes to use")
    p.add_argument("--out", type=Path, help="JSON output (default experiments/results/elastic/bench_elastic.json, "
                   "bench_elastic_tiny.json with --tiny)")
    args = p.parse_args(argv)
    shapes = args.shapes or ("2x64" if args.tiny else "1x256,4x512")
    try:
        args.shapes = [tuple(int(n) for n in s.lower().split("x")) for s in shapes.split(",")]
        if any(len(s) != 2 or min(s) <= 0 for s in args.shapes):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--shapes {shapes!r}: must be comma-separated BATCHxSEQ with positive sizes") from None
    args.repeats = args.repeats or (2 if args.tiny else 7)
    args.grad = (not args.tiny) if args.grad is None else args.grad
    args.out = args.out or RESULTS / f"bench_elastic{'_tiny' if args.tiny else ''}.json"
    return args


def summary(report: dict[str, Any]) -> str:
    lines = [f"bench_elastic on {report['env']['cpu']}, jax {report['env']['jax']} ({report['env']['backend']}); "
             f"model {report['model']['config']} {report['model']['params']:,} params; sizes: "
             f"{report['model']['sizes_from']}"]
    for b, s in report["model"]["sizes"].items():
        lines.append(f"  budget {b}: {report['shapes'][0]['params'][b]:,} params  {s}")
    for r in report["shapes"]:
        lines.append(f"shape {r['batch']}x{r['seq']} (median of {report['repeats']}; ratio to the full model's plain "
                     "forward):")
        for name, value in r["median_s"].items():
            lines.append(f"  {name:16} {value * 1e3:9.2f} ms  {r['ratio_to_plain'][name]:6.3f}x")
        v = r["verdicts"]
        grad = "" if "masked_grad_within_target" not in v else \
            f"masked grad <= {MASKED_TARGET}x plain grad: {'ok' if v['masked_grad_within_target'] else 'MISSED'}; "
        lines.append(f"  masked <= {MASKED_TARGET}x plain: {'ok' if v['masked_within_target'] else 'MISSED'} "
                     f"(worst {r['masked_worst_ratio']:.3f}x; masked 1 / extracted 1 "
                     f"{r['masked_1_over_extracted_1']:.3f}x); {grad}extracted 0.5 faster than plain: "
                     f"{'ok' if v['extracted_0.5_faster'] else 'MISSED'}; logits masked vs extracted rel err max "
                     f"{max(r['logits_rel_err_masked_vs_extracted'].values()):.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_before = os.getloadavg()
    env = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
           "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    print(f"CPU: {env['cpu']}; jax {env['jax']} on {env['backend']}")
    if load_before[0] > LOAD_WARNING:
        print(f"warning: 1-min load average {load_before[0]:.2f} before starting: other processes are using the CPU, "
              "the timings will be noisy")
    model, sizes, source = bench_model(args.tiny, args.elastic, max(s for _, s in args.shapes))
    results = []
    for batch, seq in args.shapes:
        results.append(bench_shape(model, sizes, batch, seq, args.repeats, args.grad))
        bad = {b: e for b, e in results[-1]["logits_rel_err_masked_vs_extracted"].items() if not e < RTOL}
        if bad:
            raise SystemExit(f"masked logits differ from the extracted model's (rel err {bad} > {RTOL}): the timings "
                             "would compare different computations")
    env["loadavg_before"], env["loadavg_after"] = list(load_before), list(os.getloadavg())
    report = {"argv": sys.argv[1:] if argv is None else argv, "env": env, "repeats": args.repeats,
              "targets": {"masked_over_plain_max": MASKED_TARGET, "extracted_0.5_over_plain_below": 1.0},
              "model": {"config": str(CONFIGS[args.tiny].relative_to(REPO_ROOT)) if not args.elastic else args.elastic,
                        "params": model.num_params, "sizes_from": source,
                        "sizes": {f"{b:g}": s for b, s in sizes.items()}},
              "shapes": results}
    print(summary(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
