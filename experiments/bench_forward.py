"""CPU forward-pass benchmark of nemojax: prefill against transformers, and chunked against sequential SSD.

    .venv/bin/python experiments/bench_forward.py                 # full run (seq 2048, SSD L 4096)
    .venv/bin/python experiments/bench_forward.py --quick         # smoke run (seq 512, SSD L 1024, 2 repeats)
    options: --seq --batch --repeats --threads --ssd-len --attn {sdpa,eager} --out   (see --help)

What it measures, in one run:

1. Prefill throughput (tokens/s) of nemojax's jitted forward (`nemojax.model.forward`, float32, CPU) against
   transformers' `NemotronHForCausalLM` (torch float32, `torch.inference_mode`, `use_cache=False`, sdpa attention
   by default, the pure-torch Mamba-2 path since mamba_ssm / causal_conv1d are CUDA-only) on the same ~60M
   parameter hybrid config (pattern "M-M*-M-M-M*-M-M-": Mamba-2, attention and relu2-MLP layers) with the SAME
   weights: `Model.init`, exported through `nemojax.interop.hf.to_hf_state_dict` and loaded into torch with
   `strict=True`.
   Before timing, every HF Mamba mixer's `time_step_limit` is set to (0, inf), the reference clamp nemojax uses
   (transformers clamps dt at time_step_min; docs/numerics.md 3), and the max |logits difference| is reported, so
   both sides run the same computation. XLA compile time is measured separately (AOT lower + compile) and is not
   part of the timings. Both frameworks get the same CPUs: `--threads N` pins the process to N cores (XLA's
   thread pool follows the affinity mask) and calls `torch.set_num_threads(N)`; the default N is every core the
   process may use.
2. `ssd_chunked` (chunk 128) against `ssd_sequential` (a `lax.scan` over time), both jitted, forward only, at
   batch 1, L 4096, H 32 heads of P 64, G 8 groups, state N 128, plus their relative error.

Every timing is the median of `--repeats` runs after one warm-up run; the two sides of each comparison run
interleaved (a, b, a, b, ...) so that load from other processes hits both alike. A summary block is printed and
the same numbers are written to runs/bench_forward.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402

from nemojax.config import AttentionConfig, MambaConfig, ModelConfig  # noqa: E402
from nemojax.interop import hf as interop_hf  # noqa: E402
from nemojax.model import Model, forward  # noqa: E402
from nemojax.nn.ssd import ssd_chunked, ssd_sequential  # noqa: E402

PREFILL_TARGET = 1.5  # nemojax / transformers tokens/s
SSD_TARGET = 20.0  # sequential time / chunked time
LOAD_WARNING = 0.5  # 1-min load average above which the run is flagged as noisy
DEFAULT_OUT = REPO_ROOT / "runs" / "bench_forward.json"


@dataclasses.dataclass(frozen=True)
class SSDShape:
    """SSD problem size: x [batch, length, heads, head_dim], B/C [batch, length, groups, state]."""

    batch: int = 1
    length: int = 4096
    heads: int = 32
    head_dim: int = 64
    groups: int = 8
    state: int = 128
    chunk: int = 128


def bench_config() -> ModelConfig:
    """The ~60M-parameter hybrid used for the prefill comparison (vocab 32000, hidden 512, 16 layers)."""
    return ModelConfig(
        vocab_size=32000,
        hidden_size=512,
        pattern="M-M*-M-M-M*-M-M-",
        mamba=MambaConfig(num_heads=16, head_dim=64, state_size=64, n_groups=8, chunk_size=128),
        attention=AttentionConfig(num_heads=8, num_kv_heads=2, head_dim=64),
        intermediate_size=1536,
    )


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of `repeats` calls of each fn (which must block until its result is ready), after one warm-up
    call each. The fns run interleaved (a, b, a, b, ...) so that load from other processes hits both alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def hf_model(model: Model, attn_implementation: str) -> NemotronHForCausalLM:
    """transformers' NemotronHForCausalLM (float32, eval mode) holding exactly `model`'s weights."""
    hf_config = NemotronHConfig(**model.config.to_hf(), attn_implementation=attn_implementation)
    with torch.device("meta"):
        hf = NemotronHForCausalLM(hf_config)
    # Hub names use `backbone.`; transformers-native names use `model.` (no MoE here, so no expert stacking).
    state_dict = {name.replace("backbone.", "model.", 1): torch.from_numpy(np.array(tensor))
                  for name, tensor in interop_hf.to_hf_state_dict(model).items()}
    hf.load_state_dict(state_dict, strict=True, assign=True)
    return hf.eval()


def set_dt_limit(hf: NemotronHForCausalLM, limit: tuple[float, float]) -> int:
    """Sets every Mamba mixer's dt clamp; returns how many mixers were changed."""
    mixers = [m for m in hf.modules() if hasattr(m, "time_step_limit")]
    for mixer in mixers:
        mixer.time_step_limit = limit
    return len(mixers)


def bench_prefill(seq: int, batch: int, repeats: int, attn_implementation: str, seed: int = 0) -> dict[str, Any]:
    """nemojax vs transformers prefill on `bench_config()` with shared weights; timings, agreement, compile time."""
    config = bench_config()
    model = Model.init(config, seed)
    tokens_np = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq))
    tokens = jnp.asarray(tokens_np, jnp.int32)

    start = time.perf_counter()
    compiled = forward.lower(config, model.params, tokens).compile()
    compile_s = time.perf_counter() - start
    logits_jax = np.asarray(compiled(model.params, tokens))

    hf = hf_model(model, attn_implementation)
    input_ids = torch.from_numpy(tokens_np.astype(np.int64))

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return hf(input_ids=input_ids, use_cache=False).logits

    default_limit = (hf.config.time_step_min, math.inf)
    logits_hf_default = run_hf().numpy()
    n_mixers = set_dt_limit(hf, (0.0, math.inf))
    logits_hf = run_hf().numpy()
    times = timed({"nemojax": lambda: compiled(model.params, tokens).block_until_ready(), "transformers": run_hf},
                  repeats)
    jax_times, hf_times = times["nemojax"], times["transformers"]
    jax_s, hf_s = statistics.median(jax_times), statistics.median(hf_times)
    return {
        "config": {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "pattern": config.pattern,
                   "mamba": dataclasses.asdict(config.mamba), "attention": dataclasses.asdict(config.attention),
                   "intermediate_size": config.intermediate_size},
        "num_params": model.num_params,
        "seq": seq,
        "batch": batch,
        "attn_implementation": attn_implementation,
        "nemojax_compile_s": compile_s,
        "nemojax_s": jax_s,
        "nemojax_times_s": jax_times,
        "transformers_s": hf_s,
        "transformers_times_s": hf_times,
        "nemojax_tok_s": batch * seq / jax_s,
        "transformers_tok_s": batch * seq / hf_s,
        "ratio": hf_s / jax_s,
        "hf_mixers_dt_limit_reset": n_mixers,
        "max_abs_logit": float(np.abs(logits_hf).max()),
        "max_abs_diff": float(np.abs(logits_jax - logits_hf).max()),
        "max_abs_diff_hf_default_clamp": float(np.abs(logits_jax - logits_hf_default).max()),
        "hf_default_time_step_limit": list(default_limit),
    }


def ssd_inputs(s: SSDShape, seed: int = 0) -> tuple[jax.Array, ...]:
    """Realistic SSD inputs: dt log-uniform in [1e-3, 1e-1] (the dt_bias init range), A = -(1..H)."""
    kx, kdt, kb, kc = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (s.batch, s.length, s.heads, s.head_dim), jnp.float32)
    u = jax.random.uniform(kdt, (s.batch, s.length, s.heads), jnp.float32)
    dt = jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    A = -jnp.arange(1, s.heads + 1, dtype=jnp.float32)
    B = jax.random.normal(kb, (s.batch, s.length, s.groups, s.state), jnp.float32)
    C = jax.random.normal(kc, (s.batch, s.length, s.groups, s.state), jnp.float32)
    return x, dt, A, B, C


def _rel_err(got: jax.Array, want: jax.Array) -> float:
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def bench_ssd(s: SSDShape, repeats: int) -> dict[str, Any]:
    """Jitted ssd_chunked vs ssd_sequential on one input: timings, compile times and relative errors."""
    args = ssd_inputs(s)
    results: dict[str, Any] = {"shape": dataclasses.asdict(s)}
    outputs, runs = {}, {}
    fns = {"chunked": jax.jit(lambda *a: ssd_chunked(*a, chunk_size=s.chunk)), "sequential": jax.jit(ssd_sequential)}
    for name, fn in fns.items():
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        results[f"{name}_compile_s"] = time.perf_counter() - start
        outputs[name] = compiled(*args)
        runs[name] = lambda c=compiled: jax.block_until_ready(c(*args))
    for name, times in timed(runs, repeats).items():
        results[f"{name}_s"] = statistics.median(times)
        results[f"{name}_times_s"] = times
    (y_c, state_c), (y_s, state_s) = outputs["chunked"], outputs["sequential"]
    results["ratio"] = results["sequential_s"] / results["chunked_s"]
    results["rel_err_y"] = _rel_err(y_c, y_s)
    results["rel_err_final_state"] = _rel_err(state_c, state_s)
    return results


def pin_threads(threads: int | None) -> int:
    """Restricts this process to `threads` cores (XLA sizes its pool from the affinity mask) and torch to as many
    intra-op threads; returns the thread count both use."""
    available = sorted(os.sched_getaffinity(0))
    n = len(available) if threads is None else threads
    if not 1 <= n <= len(available):
        raise SystemExit(f"--threads {n}: this process may use {len(available)} cores")
    os.sched_setaffinity(0, available[:n])
    torch.set_num_threads(n)
    return n


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=None, help="prefill length (default 2048; 512 with --quick)")
    p.add_argument("--batch", type=int, default=1, help="prefill batch (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="cores for XLA and torch (default: all available)")
    p.add_argument("--ssd-len", type=int, default=None, help="SSD sequence length (default 4096; 1024 with --quick)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attention (default sdpa)")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    args.seq = args.seq or (512 if args.quick else 2048)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.ssd_len = args.ssd_len or (1024 if args.quick else 4096)
    return args


def environment(threads: int) -> tuple[dict[str, Any], tuple[float, float, float]]:
    """The run's software and CPU facts for the JSON report, and the load average before it; prints both (with a
    warning when other processes load the CPU). Shared by the CPU benchmarks that compare against torch."""
    load_before = os.getloadavg()
    env = {
        "threads": threads, "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
    }
    print(f"threads: XLA and torch both on {threads} core(s) (os.cpu_count()={os.cpu_count()}); "
          f"torch.get_num_threads()={torch.get_num_threads()}; jax backend {jax.default_backend()}")
    if load_before[0] > LOAD_WARNING:
        print(f"warning: 1-min load average {load_before[0]:.2f} before starting: other processes are using the CPU, "
              "timings will be noisy (torch's thread barriers suffer more from it than XLA)")
    return env, load_before


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = pin_threads(args.threads)
    env, load_before = environment(threads)

    prefill = bench_prefill(args.seq, args.batch, args.repeats, args.attn)
    print(f"prefill config: {prefill['num_params']:,} params, pattern {prefill['config']['pattern']}, "
          f"seq {args.seq}, batch {args.batch}, float32, transformers attention={args.attn}")
    print(f"  logits max |nemojax - transformers| = {prefill['max_abs_diff']:.3g} "
          f"(HF dt clamp set to (0, inf) on {prefill['hf_mixers_dt_limit_reset']} mixers; "
          f"{prefill['max_abs_diff_hf_default_clamp']:.3g} with HF's default clamp; "
          f"max |logit| {prefill['max_abs_logit']:.3g})")
    print(f"  nemojax compile {prefill['nemojax_compile_s']:.2f} s (excluded)")

    shape = SSDShape(length=args.ssd_len)
    ssd = bench_ssd(shape, args.repeats)
    print(f"ssd shape: batch {shape.batch}, L {shape.length}, H {shape.heads}, P {shape.head_dim}, "
          f"G {shape.groups}, N {shape.state}, chunk {shape.chunk}, float32")
    print(f"  relative error chunked vs sequential: y {ssd['rel_err_y']:.2e}, "
          f"final state {ssd['rel_err_final_state']:.2e}; compile chunked {ssd['chunked_compile_s']:.2f} s, "
          f"sequential {ssd['sequential_compile_s']:.2f} s (excluded)")

    def verdict(ratio: float, target: float) -> str:
        return "ok" if ratio >= target else "BELOW TARGET"

    print(f"\nsummary (median of {args.repeats}, {threads} thread(s)):")
    print(f"  prefill  nemojax {prefill['nemojax_tok_s']:.0f} tok/s  transformers {prefill['transformers_tok_s']:.0f} "
          f"tok/s  ratio {prefill['ratio']:.2f}x  (target >= {PREFILL_TARGET}x: "
          f"{verdict(prefill['ratio'], PREFILL_TARGET)})")
    print(f"  ssd      chunked {ssd['chunked_s'] * 1e3:.1f} ms  sequential {ssd['sequential_s'] * 1e3:.1f} ms  "
          f"ratio {ssd['ratio']:.2f}x  (target >= {SSD_TARGET:.0f}x: {verdict(ssd['ratio'], SSD_TARGET)})")

    env["loadavg_before"], env["loadavg_after"] = list(load_before), list(os.getloadavg())
    report = {"argv": sys.argv[1:] if argv is None else argv, "env": env, "prefill": prefill, "ssd": ssd,
              "targets": {"prefill_ratio": PREFILL_TARGET, "ssd_ratio": SSD_TARGET}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
