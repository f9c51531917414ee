"""Training throughput and MFU of the small hybrid (configs/small_hybrid.py) on this machine's CPU, and what limits it.

    .venv/bin/python experiments/bench_train.py                   # full run: baseline, sweep and layer breakdown
    .venv/bin/python experiments/bench_train.py --quick           # baseline, forward and grad only, 3 steps
    options: --batch --seq --steps --dtype --remat --out   (see --help)

What it measures, in one process on one device (XLA's CPU backend uses every core the process may use):

1. The matmul peak: a jitted `jnp.dot` of two 4096 x 4096 matrices (float32, and bfloat16 when any case runs in
   bfloat16), the best of several runs, in FLOPs/s, measured before and after the model timings (this shared VM's
   speed drifts; the higher of the two is the peak, the more conservative MFU). It is the "peak" of MFU here: what
   XLA's own best kernel reaches on this CPU, not the data-sheet number. Each case also re-measures the peak right
   after its own timings ("local peak"); its MFU against that one is robust to other jobs sharing the CPU, and a
   case whose local peak is under 80% of the global one is flagged "busy" (its timings are suspect).
2. The train step of `nemojax.train.loop.build` (AdamW, z-loss, donated state) on synthetic random token
   batches (no data pipeline): the median of `--steps` timed steps after two warm-up steps (each step blocks
   until ready). tokens/s = batch x seq / median; model FLOPs/s = `train_flops_per_token(config, seq)` x tokens/s
   (3 x forward matmul and mixing FLOPs, remat recompute not counted); MFU = model FLOPs/s / measured peak,
   printed against the 35% target. The forward pass alone (`run.evaluate`) and forward + backward without the
   optimizer update are timed the same way, to split the step.
3. Unless --quick: the sweep (the other compute dtype, remat "full", half and double batch, longer sequences at
   equal tokens), and a layer breakdown: the model's layer kinds trained alone (Mamba-2 x6, attention x2,
   relu2 MLP x6, as many as the small hybrid has) and a head-only model (embedding, lm_head, loss and AdamW with
   one negligible MLP); each stack's time is its step time minus the head-only time, with its own FLOPs and
   achieved FLOP rate, which shows where the time goes; then the Mamba-2 mixer's parts at the model's shapes
   (chunked SSD, causal depthwise conv, in/out projections; forward and forward + backward, times the number of
   Mamba layers).

The summary is printed and everything is written to runs/bench_train.json.
"""

from __future__ import annotations

import argparse
import dataclasses
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

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from nemojax import config_files  # noqa: E402
from nemojax.config import ModelConfig  # noqa: E402
from nemojax.nn.mamba2 import causal_conv1d  # noqa: E402
from nemojax.nn.ssd import ssd_chunked  # noqa: E402
from nemojax.train import loop, sharding  # noqa: E402
from nemojax.train.flops import forward_flops_per_token, train_flops_per_token  # noqa: E402
from nemojax.train.step import lm_loss  # noqa: E402

MFU_TARGET = 0.35
CONFIG = REPO_ROOT / "configs" / "small_hybrid.py"
DEFAULT_OUT = REPO_ROOT / "runs" / "bench_train.json"
PEAK_SIZE = 4096
BUSY_FRACTION = 0.8  # a case whose local peak is below this fraction of the global peak ran on a busy CPU
LOAD_WARNING = 0.5  # 1-min load average above which the run is flagged as noisy
WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked training setup: shapes, precision, remat, and optionally a different layer pattern."""

    name: str
    batch: int
    seq: int
    dtype: str = "float32"
    remat: str = "none"
    pattern: str | None = None
    intermediate_size: int | None = None


# ----------------------------------------------------------------------------------------------- measurement


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = WARMUP_STEPS) -> tuple[float, list[float]]:
    """Median wall seconds of `repeats` calls of `fn` (which must block until its result is ready) after
    `warmup` untimed calls; also returns every timing."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def matmul_peak(dtype: str, n: int = PEAK_SIZE, repeats: int = 5) -> dict[str, float]:
    """FLOPs/s of the best of `repeats` jitted [n, n] x [n, n] matmuls in `dtype` (2 n^3 FLOPs each)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    _, times = median_time(lambda: dot(a, b).block_until_ready(), repeats, warmup=1)
    return {"dtype": dtype, "n": n, "best_s": min(times), "flops_per_s": 2.0 * n ** 3 / min(times)}


def model_config_dict(case: Case) -> ml_collections.ConfigDict:
    """configs/small_hybrid.py with the case's shapes, dtype, remat and layer pattern, on a 1-device mesh."""
    config = config_files.load(CONFIG)
    config.train.batch_size, config.train.seq_len = case.batch, case.seq
    overrides = config.model.overrides
    config.model.runtime.dtype, config.model.runtime.remat = case.dtype, case.remat
    overrides.max_position_embeddings = max(case.seq, overrides.max_position_embeddings)
    if case.pattern is not None:
        overrides.pattern = case.pattern
    if case.intermediate_size is not None:
        overrides.intermediate_size = case.intermediate_size
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1})
    return config


def synthetic_batch(case: Case, vocab_size: int, sharding_: jax.sharding.NamedSharding,
                    seed: int = 0) -> dict[str, jax.Array]:
    """Random tokens (targets = tokens shifted by one), every position counted by the loss."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (case.batch, case.seq + 1), dtype=np.int32)
    positions = np.broadcast_to(np.arange(case.seq, dtype=np.int32), (case.batch, case.seq))
    batch = {"tokens": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((case.batch, case.seq), np.float32),
             "segment_ids": np.ones((case.batch, case.seq), np.int32), "positions": positions}
    return {k: jax.device_put(np.ascontiguousarray(v), sharding_) for k, v in batch.items()}


def rates(mcfg: ModelConfig, case: Case, seconds: float, forward_only: bool = False) -> dict[str, float]:
    """tokens/s and model FLOPs/s of one timed call (MFU is added once the peak is final, see `add_mfu`)."""
    per_token = (forward_flops_per_token if forward_only else train_flops_per_token)(mcfg, case.seq)
    tokens_per_s = case.batch * case.seq / seconds
    return {"seconds": seconds, "tokens_per_s": tokens_per_s, "model_flops_per_token": per_token,
            "model_flops_per_s": per_token * tokens_per_s}


TIMED_KEYS = ("train", "forward", "forward_backward")


def add_mfu(result: dict[str, Any], peaks: dict[str, float]) -> None:
    """Sets the global peak of the case's dtype, the busy flag, and the MFU of each timing against the global
    and the local peak."""
    peak = result["peak_flops_per_s"] = peaks[result["case"]["dtype"]]
    result["busy"] = result["local_peak_flops_per_s"] < BUSY_FRACTION * peak
    for key in TIMED_KEYS:
        if key in result:
            result[key]["mfu"] = result[key]["model_flops_per_s"] / peak
            result[key]["mfu_local"] = result[key]["model_flops_per_s"] / result["local_peak_flops_per_s"]


def bench_case(case: Case, steps: int, parts: bool = False) -> dict[str, Any]:
    """Times the train step of `case` (and, with `parts`, its forward and forward + backward)."""
    config = model_config_dict(case)
    run = loop.build(config)
    mcfg = run.model_config
    result: dict[str, Any] = {"case": dataclasses.asdict(case), "pattern": mcfg.pattern}
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.RULES):
        batch = synthetic_batch(case, mcfg.vocab_size, run.batch_sharding)
        state = run.init(jax.random.PRNGKey(0))
        result["params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
        start = time.perf_counter()
        step = run.step.lower(state, batch).compile()
        result["compile_s"] = time.perf_counter() - start
        holder = {"state": state}

        def train_step() -> None:
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready((holder["state"], metrics))

        seconds, times = median_time(train_step, steps)
        result["train"] = {**rates(mcfg, case, seconds), "times_s": times}
        if parts:
            params = holder["state"].params
            result["forward"] = time_forward(run, params, batch, mcfg, case, steps)
            result["forward_backward"] = time_grad(config, params, batch, mcfg, case, steps)
    result["local_peak_flops_per_s"] = matmul_peak(case.dtype, repeats=3)["flops_per_s"]
    return result


def time_forward(run: loop.Run, params: Any, batch: dict[str, jax.Array], mcfg: ModelConfig, case: Case,
                 steps: int) -> dict[str, Any]:
    """The jitted eval step (forward + loss, no gradients)."""
    seconds, times = median_time(lambda: jax.block_until_ready(run.evaluate(params, batch)), steps)
    return {**rates(mcfg, case, seconds, forward_only=True), "times_s": times}


def time_grad(config: ml_collections.ConfigDict, params: Any, batch: dict[str, jax.Array], mcfg: ModelConfig,
              case: Case, steps: int) -> dict[str, Any]:
    """value_and_grad of the training loss (forward + backward, no optimizer update)."""
    loss_fn = lm_loss(mcfg, z_loss=config.train.z_loss)
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    rng = jax.random.key(0)
    seconds, times = median_time(lambda: jax.block_until_ready(grad(params, batch, rng)), steps)
    return {**rates(mcfg, case, seconds), "times_s": times}


# ----------------------------------------------------------------------------------------------- experiments


def sweep_cases(base: Case) -> list[Case]:
    """Single changes to the baseline: dtype, remat, batch, and sequence length at equal tokens per step."""
    other = "bfloat16" if base.dtype == "float32" else "float32"
    tokens = base.batch * base.seq
    cases = [
        dataclasses.replace(base, name=f"dtype {other}", dtype=other),
        dataclasses.replace(base, name="remat full", remat="full"),
        dataclasses.replace(base, name=f"batch {base.batch * 2}", batch=base.batch * 2),
    ]
    if base.batch >= 2:
        cases.append(dataclasses.replace(base, name=f"batch {base.batch // 2}", batch=base.batch // 2))
    for factor in (4, 8):
        seq = base.seq * factor
        if tokens % seq == 0:
            cases.append(dataclasses.replace(base, name=f"seq {seq} x batch {tokens // seq}", seq=seq,
                                             batch=tokens // seq))
    return cases


def breakdown_cases(base: Case, pattern: str) -> list[Case]:
    """Each layer kind of `pattern` alone (as many layers as the model has), and a head-only model."""
    names = {"M": "Mamba-2", "*": "attention", "-": "relu2 MLP", "E": "MoE"}
    cases = [dataclasses.replace(base, name="head only", pattern="-", intermediate_size=8)]
    for kind in dict.fromkeys(pattern):
        count = pattern.count(kind)
        cases.append(dataclasses.replace(base, name=f"{names[kind]} x{count}", pattern=kind * count))
    return cases


def breakdown_table(results: list[dict[str, Any]], full: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-stack seconds (step minus head-only), its share of the full step, FLOPs and FLOP rate."""
    head = results[0]["train"]
    rows = [{"part": "head (embed, lm_head, loss, AdamW)", "seconds": head["seconds"],
             "flops_per_token": head["model_flops_per_token"]}]
    for r in results[1:]:
        t = r["train"]
        rows.append({"part": r["case"]["name"], "seconds": t["seconds"] - head["seconds"],
                     "flops_per_token": t["model_flops_per_token"] - head["model_flops_per_token"]})
    total = full["train"]["seconds"]
    tokens = full["case"]["batch"] * full["case"]["seq"]
    peak = full["peak_flops_per_s"]
    for row in rows:
        row["share_of_step"] = row["seconds"] / total
        row["share_of_flops"] = row["flops_per_token"] / full["train"]["model_flops_per_token"]
        flops_per_s = row["flops_per_token"] * tokens / row["seconds"] if row["seconds"] > 0 else float("nan")
        row["flops_per_s"], row["fraction_of_peak"] = flops_per_s, flops_per_s / peak
    return rows


def mamba_parts(case: Case, steps: int) -> dict[str, Any]:
    """Forward and forward + backward ms of the Mamba-2 mixer's parts at the model's shapes, summed over its
    Mamba layers (float32 inputs; the SSD runs in float32 whatever the compute dtype)."""
    mcfg = loop.model_config(model_config_dict(case))
    m, layers = mcfg.mamba, mcfg.pattern.count("M")
    b, L, D = case.batch, case.seq, mcfg.hidden_size
    H, P, G, N = m.num_heads, m.head_dim, m.n_groups, m.state_size
    keys = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(keys[0], (b, L, H, P))
    dt = jax.random.uniform(keys[1], (b, L, H), minval=1e-3, maxval=0.1)
    A = -jnp.arange(1, H + 1, dtype=jnp.float32)
    B, C = (jax.random.normal(k, (b, L, G, N)) for k in keys[2:4])
    xbc = jax.random.normal(keys[4], (b, L, m.conv_dim))
    w, bias = jax.random.normal(keys[5], (m.conv_kernel, m.conv_dim)), jnp.zeros((m.conv_dim,))
    u = jax.random.normal(keys[6], (b * L, D))
    w_in = jax.random.normal(keys[7], (D, m.in_proj_size)) * 0.02
    w_out = jax.random.normal(keys[7], (m.inner_size, D)) * 0.02

    def ssd_fn(*a: jax.Array) -> jax.Array:
        return ssd_chunked(*a, chunk_size=m.chunk_size)[0]

    def proj_fn(u: jax.Array, w_in: jax.Array, w_out: jax.Array) -> jax.Array:
        """in_proj [b*L, D] -> [b*L, in_proj_size], then out_proj of its first inner_size columns -> [b*L, D]."""
        return (u @ w_in)[:, :m.inner_size] @ w_out

    parts = {"chunked SSD": (ssd_fn, (x, dt, A, B, C)), "causal conv1d": (causal_conv1d, (xbc, w, bias)),
             "in/out projections": (proj_fn, (u, w_in, w_out))}
    out = {}
    for name, (fn, args) in parts.items():
        def loss(*a: jax.Array, fn: Callable = fn) -> jax.Array:
            return jnp.sum(jnp.square(fn(*a)))

        fwd, bwd = jax.jit(fn), jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))
        out[name] = {"forward_s": layers * _call_time(fwd, args, steps),
                     "forward_backward_s": layers * _call_time(bwd, args, steps)}
    return {"layers": layers, "parts": out}


def _call_time(fn: Callable, args: tuple[jax.Array, ...], steps: int) -> float:
    return median_time(lambda: jax.block_until_ready(fn(*args)), steps)[0]


# ----------------------------------------------------------------------------------------------- reporting


def line(r: dict[str, Any], key: str = "train") -> str:
    c, t = r["case"], r[key]
    mfu = f"  MFU {t['mfu']:6.1%} (local {t['mfu_local']:6.1%})" if "mfu" in t else ""
    mfu += "  busy" if r.get("busy") else ""
    return (f"{c['name']:<26} b{c['batch']:>3} L{c['seq']:>5} {c['dtype']:<8} remat {c['remat']:<5} "
            f"{t['seconds'] * 1e3:9.1f} ms  {t['tokens_per_s']:9.0f} tok/s  "
            f"{t['model_flops_per_s'] / 1e9:7.1f} GFLOP/s{mfu}")


def print_summary(report: dict[str, Any]) -> None:
    peaks = report["peaks"]
    print("\nmatmul peak (best jitted 4096^3 dot, before / after the timings; the higher is used): " + ", ".join(
        f"{d} {p['before']['flops_per_s'] / 1e9:.1f} / {p['after']['flops_per_s'] / 1e9:.1f} GFLOP/s"
        for d, p in peaks.items()))
    base = report["baseline"]
    print(f"model: configs/small_hybrid.py, {base['params']:,} params, pattern {base['pattern']}")
    print("\n" + line(base) + f"   (compile {base['compile_s']:.1f} s, excluded)")
    for key, label in (("forward", "  forward only"), ("forward_backward", "  forward + backward")):
        if key in base:
            t = base[key]
            print(f"{label:<26} {t['seconds'] * 1e3:9.1f} ms  {t['tokens_per_s']:9.0f} tok/s  "
                  f"{t['model_flops_per_s'] / 1e9:7.1f} GFLOP/s  MFU {t['mfu']:6.1%} (local {t['mfu_local']:6.1%})"
                  f"  ({t['seconds'] / base['train']['seconds']:.0%} of the step)")
    mfu, local = base["train"]["mfu"], base["train"]["mfu_local"]
    print(f"\nMFU {mfu:.1%} (local peak: {local:.1%}) vs target {MFU_TARGET:.0%}: ratio {mfu / MFU_TARGET:.2f} "
          f"({'ok' if mfu >= MFU_TARGET else 'BELOW TARGET'}){'; the CPU was busy, rerun' if base['busy'] else ''}")
    if report.get("sweep"):
        print("\nsweep (one change each from the baseline):")
        for r in report["sweep"]:
            print("  " + line(r))
    if report.get("breakdown"):
        busy = " (some cases ran on a busy CPU: shares are suspect)" if any(
            r["busy"] for r in report["breakdown"]["cases"]) else ""
        print(f"\nlayer breakdown (each kind trained alone; stack time = its step - head-only step){busy}:")
        for row in report["breakdown"]["rows"]:
            print(f"  {row['part']:<36} {row['seconds'] * 1e3:9.1f} ms  {row['share_of_step']:6.1%} of step  "
                  f"{row['share_of_flops']:6.1%} of FLOPs  {row['flops_per_s'] / 1e9:7.1f} GFLOP/s "
                  f"({row['fraction_of_peak']:.1%} of peak)")
        parts = sum(row["seconds"] for row in report["breakdown"]["rows"])
        print(f"  sum of parts {parts * 1e3:.1f} ms vs full step {base['train']['seconds'] * 1e3:.1f} ms")
    if report.get("mamba_parts"):
        mp = report["mamba_parts"]
        print(f"\nMamba-2 mixer parts, x{mp['layers']} layers (forward / forward + backward):")
        for name, t in mp["parts"].items():
            print(f"  {name:<36} {t['forward_s'] * 1e3:9.1f} ms / {t['forward_backward_s'] * 1e3:9.1f} ms  "
                  f"({t['forward_backward_s'] / base['train']['seconds']:.1%} of the step)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8, as the config)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default 256, as the config)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5; 3 with --quick)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="baseline compute dtype")
    p.add_argument("--remat", default="none", help="baseline remat policy (default none, as the config)")
    p.add_argument("--quick", action="store_true", help="baseline, forward and forward+backward only")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 5)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_before = os.getloadavg()
    if load_before[0] > LOAD_WARNING:
        print(f"warning: 1-min load average {load_before[0]:.2f}: the CPU was busy within the last minute, "
              "timings may be noisy")
    base = Case("baseline", args.batch, args.seq, args.dtype, args.remat)
    sweep = [] if args.quick else sweep_cases(base)
    dtypes_used = sorted({base.dtype, *(c.dtype for c in sweep)})
    repeats = 3 if args.quick else 5
    before = {d: matmul_peak(d, repeats=repeats) for d in dtypes_used}
    for d, p in before.items():
        print(f"matmul peak {d}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)

    report: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "target_mfu": MFU_TARGET}
    report["baseline"] = bench_case(base, args.steps, parts=True)
    print(line(report["baseline"]), flush=True)
    report["sweep"] = []
    for case in sweep:
        report["sweep"].append(bench_case(case, args.steps))
        print(line(report["sweep"][-1]), flush=True)
    breakdown = []
    if not args.quick:
        for case in breakdown_cases(base, report["baseline"]["pattern"]):
            breakdown.append(bench_case(case, args.steps))
            print(line(breakdown[-1]), flush=True)
        if "M" in report["baseline"]["pattern"]:
            report["mamba_parts"] = mamba_parts(base, args.steps)

    after = {d: matmul_peak(d, repeats=repeats) for d in dtypes_used}
    report["peaks"] = {d: {"before": before[d], "after": after[d],
                           "flops_per_s": max(before[d]["flops_per_s"], after[d]["flops_per_s"])}
                       for d in dtypes_used}
    peaks = {d: p["flops_per_s"] for d, p in report["peaks"].items()}
    for result in [report["baseline"], *report["sweep"], *breakdown]:
        add_mfu(result, peaks)
    if breakdown:
        report["breakdown"] = {"cases": breakdown, "rows": breakdown_table(breakdown, report["baseline"])}
    report["env"] = {"cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                     "jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                     "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}
    print_summary(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
