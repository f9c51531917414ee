"""CPU decode benchmark of nemojax: per-token latency and throughput against transformers, and how decode time and
cache memory grow with the context for the hybrid and for an attention-only model of the same size.

    .venv/bin/python experiments/bench_decode.py                  # full run (context 4096, batch 1 and 16, 1k..32k)
    .venv/bin/python experiments/bench_decode.py --quick          # smoke run (context 512, batch 1 and 4, 1k and 2k)
    options: --context --batch --new-tokens --repeats --threads --contexts --attn --out --plot   (see --help)

What it measures, in one run:

1. Decode at a real context (default 4096 random prompt tokens), float32, on the ~60M-parameter hybrid of
   experiments/bench_forward.py (pattern "M-M*-M-M-M*-M-M-", the same `bench_config()`), with the SAME weights on
   both sides: `Model.init`, exported through `nemojax.interop.hf.to_hf_state_dict` and loaded into
   transformers' `NemotronHForCausalLM` with `strict=True`; every HF Mamba mixer's `time_step_limit` is set to
   (0, inf), the clamp nemojax uses. Each side prefills the prompt once into its own cache (nemojax:
   `infer.extend.prefill` into `init_cache(config, b, context + N)`; transformers: one forward with a fresh
   `DynamicCache`); those prefills are timed once, for information only, and are not part of any decode number.
   Then N greedy decode steps are timed from a copy of that cache (the copy is made outside the timer, since both
   sides consume it):
     nemojax       our own jitted `lax.fori_loop` of `infer.extend.extend` (one token) + `infer.extend.logits` +
                   argmax, the cache donated, compiled ahead of time (compile time reported, excluded);
     transformers  HF's own decode steps: a Python loop of `model(input_ids=token[:, None], cache=cache,
                   use_cache=True)` + argmax under `torch.inference_mode`, on the prefilled `DynamicCache` (sdpa
                   attention by default; the pure-torch Mamba path, since mamba_ssm / causal_conv1d are
                   CUDA-only). This is the headline transformers number.
   Per-token time = loop time / N; at batch b the throughput is b * N / loop time. At batch 1 transformers is
   also timed through `generate(do_sample=False, max_new_tokens=k, use_cache=True)`, per-token time =
   (time with N + 1 new tokens - time with 1) / N so that the prefill cancels; this one includes generate's own
   per-step overhead. Agreement: the first 8 greedy tokens (the prefill's argmax and 7 decode steps) of nemojax,
   of HF's decode loop and of HF's generate at batch 1, how many leading tokens agree over all N + 1, the rows
   that agree at batch b, and the max |logits difference| after the prefill and after one decode step.
   Target: nemojax per-token speed >= 3x transformers' (judged at batch 1 on the headline number; the ratios of
   generate at batch 1 and of the throughput at batch b are printed beside it).
2. Context scaling, batch 1, contexts 1k .. 32k: nemojax per-token decode time (same loop, N steps) and cache
   memory for the hybrid and for an attention-only model of about the same parameter count (pattern "*-" x 12:
   12 attention and 12 relu2-MLP layers, same hidden size, heads and MLP width). Prefilling 32k tokens is too slow
   on a CPU, so these caches are SYNTHETIC: `init_cache(config, 1, context + N)` with `.length` set to `context`
   and every KV entry, conv state and SSM state filled with random normal values (decode does the same work
   whatever the values are). Memory is measured on those real cache arrays with `cache_nbytes` (KV vs Mamba
   conv + SSM) and cross-checked byte for byte with `infer.memory.cache_bytes(config, 1, context + N)`; the
   script checks that the Mamba-layer bytes are identical at every context (flat) and that the KV bytes per
   cached position are constant (linear growth). Target: Mamba-layer cache memory flat in context length.

Every timing is the median of `--repeats` runs after one warm-up run, the compared cases interleaved (a, b, a, b,
...) so that load from other processes hits them alike. Both frameworks get the same CPUs: `--threads N` pins the
process to N cores (XLA's pool follows the affinity mask) and calls `torch.set_num_threads(N)`. A summary is
printed; the numbers go to runs/bench_decode.json and the plots (decode ms/token and cache MiB against context,
log x) to runs/bench_decode.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
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
from transformers import DynamicCache, NemotronHForCausalLM  # noqa: E402

from experiments.bench_forward import bench_config, environment, hf_model, pin_threads, set_dt_limit  # noqa: E402
from nemojax.config import ModelConfig  # noqa: E402
from nemojax.infer.cache import Cache, cache_nbytes, init_cache  # noqa: E402
from nemojax.infer.extend import DECODE_COMPILER_OPTIONS, decode_step, extend, logits, prefill  # noqa: E402
from nemojax.infer.memory import cache_bytes  # noqa: E402
from nemojax.infer.sampling import argmax  # noqa: E402
from nemojax.model import Model  # noqa: E402

SPEED_TARGET = 3.0  # nemojax / transformers per-token decode speed at batch 1
AGREE_TOKENS = 8  # greedy tokens that must agree between the frameworks
ATTENTION_ONLY_PATTERN = "*-" * 12  # ~59.5M params beside the hybrid's ~59.9M
DEFAULT_OUT = REPO_ROOT / "runs" / "bench_decode.json"
MiB = 2**20


def attention_only_config(hybrid: ModelConfig) -> ModelConfig:
    """The hybrid's sizes (hidden, attention heads, MLP width, vocab) with every Mamba layer gone: "*-" x 12."""
    return hybrid.replace(pattern=ATTENTION_ONLY_PATTERN, mamba=None)


def config_dict(config: ModelConfig) -> dict[str, Any]:
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size, "pattern": config.pattern,
            "mamba": None if config.mamba is None else dataclasses.asdict(config.mamba),
            "attention": dataclasses.asdict(config.attention), "intermediate_size": config.intermediate_size,
            "dtype": config.runtime.dtype}


# ----------------------------------------------------------------------------------------------- timing helpers

def timed(cases: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]], repeats: int) -> dict[str, list[float]]:
    """cases: name -> (setup, run). setup() builds fresh inputs outside the timer (here: a copy of a prefilled cache,
    which the run consumes); run(inputs) is timed and must block until its result is ready. One warm-up run each,
    then `repeats` timed runs, interleaved (a, b, a, b, ...). Returns wall seconds per case."""
    for setup, run in cases.values():
        run(setup())
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (setup, run) in cases.items():
            inputs = setup()
            start = time.perf_counter()
            run(inputs)
            times[name].append(time.perf_counter() - start)
    return times


def copy_cache(cache: Cache) -> Cache:
    """A fresh on-device copy of every cache array (the decode loop donates its cache)."""
    return jax.block_until_ready(jax.tree.map(jnp.copy, cache))


# ----------------------------------------------------------------------------------------------- nemojax decode

@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(3,), compiler_options=DECODE_COMPILER_OPTIONS)
def greedy_decode(config: ModelConfig, params: dict, token: jax.Array, cache: Cache,
                  steps: int) -> tuple[jax.Array, Cache]:
    """`steps` greedy decode steps from `cache`: token [b] int32 (the last chosen token, not yet in the cache)
    -> (the next `steps` tokens [b, steps] int32, the cache `steps` longer). Each step is one `extend` by one token,
    the lm_head and an argmax; nothing else (no prefill, no sampling machinery)."""
    b = token.shape[0]
    one = jnp.ones((b,), jnp.int32)

    def body(i: jax.Array, carry: tuple[jax.Array, Cache, jax.Array]) -> tuple[jax.Array, Cache, jax.Array]:
        tok, cache, out = carry
        hidden, cache = extend(config, params, tok[:, None], cache, one)
        nxt = argmax(logits(config, params, hidden[:, 0]))
        return nxt, cache, out.at[:, i].set(nxt)

    _, cache, out = jax.lax.fori_loop(0, steps, body, (token, cache, jnp.zeros((b, steps), jnp.int32)))
    return out, cache


def compile_decode(config: ModelConfig, params: dict, token: jax.Array, cache: Cache,
                   steps: int) -> tuple[Callable[[Cache], tuple[jax.Array, Cache]], float]:
    """AOT-compiled `greedy_decode` for these shapes: (run(cache) -> (tokens, cache), compile seconds)."""
    start = time.perf_counter()
    compiled = greedy_decode.lower(config, params, token, cache, steps).compile()
    compile_s = time.perf_counter() - start
    return (lambda c: jax.block_until_ready(compiled(params, token, c))), compile_s


# ----------------------------------------------------------------------------------------------- transformers decode

def hf_prefill(hf: NemotronHForCausalLM, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """One forward over the prompts into a fresh DynamicCache: (cache, last-position logits [b, V])."""
    with torch.inference_mode():
        out = hf(input_ids=input_ids, cache=DynamicCache(config=hf.config), use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[:, -1]


def hf_greedy_decode(hf: NemotronHForCausalLM, token: torch.Tensor, cache: DynamicCache, steps: int) -> torch.Tensor:
    """HF's decode steps on its own cache (mutated in place): token [b] -> the next `steps` tokens [b, steps]."""
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            token = hf(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1].argmax(-1)
            out.append(token)
    return torch.stack(out, 1)


def hf_generate(hf: NemotronHForCausalLM, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`generate` greedy with exactly `new_tokens` new tokens (no EOS): -> the new tokens [b, new_tokens]."""
    with torch.inference_mode():
        out = hf.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, use_cache=True, eos_token_id=None, pad_token_id=0)
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1] - input_ids.shape[1]} new tokens, expected {new_tokens}")
    return out[:, input_ids.shape[1]:]


def leading_agreement(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens two 1-D token sequences share."""
    differ = np.flatnonzero(a != b)
    return int(differ[0]) if differ.size else int(a.size)


# ----------------------------------------------------------------------------------------------- measurement 1

def bench_context(model: Model, hf: NemotronHForCausalLM, context: int, batch: int, steps: int, repeats: int,
                  generate_repeats: int, seed: int = 0) -> dict[str, Any]:
    """nemojax vs transformers greedy decode from a `context`-token prompt at `batch`: timings and agreement."""
    config, params = model.config, model.params
    tokens_np = np.random.default_rng(seed + batch).integers(0, config.vocab_size, (batch, context))
    tokens = jnp.asarray(tokens_np, jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    input_ids = torch.from_numpy(tokens_np.astype(np.int64))
    res: dict[str, Any] = {"batch": batch, "context": context, "new_tokens": steps}

    empty = init_cache(config, batch, context + steps)
    start = time.perf_counter()
    prefill_compiled = prefill.lower(config, params, tokens, lengths, empty).compile()
    res["nemojax_prefill_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    first_logits, cache = jax.block_until_ready(prefill_compiled(params, tokens, lengths, empty))
    res["nemojax_prefill_once_s"] = time.perf_counter() - start
    del empty
    token0 = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)

    start = time.perf_counter()
    hf_cache, hf_first_logits = hf_prefill(hf, input_ids)
    res["transformers_prefill_once_s"] = time.perf_counter() - start
    hf_token0 = hf_first_logits.argmax(-1)
    res["max_abs_diff_prefill_logits"] = float(np.abs(np.asarray(first_logits) - hf_first_logits.numpy()).max())

    if batch == 1:  # logits after one decode step, each side from a copy of its prefilled cache
        step_logits, _ = decode_step(config, params, token0, copy_cache(cache))
        with torch.inference_mode():
            hf_step_logits = hf(input_ids=hf_token0[:, None], cache=copy.deepcopy(hf_cache), use_cache=True).logits
        res["max_abs_diff_step_logits"] = float(np.abs(np.asarray(step_logits) - hf_step_logits[:, -1].numpy()).max())

    run_jax, res["nemojax_decode_compile_s"] = compile_decode(config, params, token0, copy_cache(cache), steps)
    outputs: dict[str, np.ndarray] = {}

    def jax_run(c: Cache) -> None:
        outputs["nemojax"] = np.asarray(run_jax(c)[0])

    def hf_run(c: DynamicCache) -> None:
        outputs["transformers"] = hf_greedy_decode(hf, hf_token0, c, steps).numpy()

    times = timed({"nemojax": (lambda: copy_cache(cache), jax_run),
                   "transformers": (lambda: copy.deepcopy(hf_cache), hf_run)}, repeats)
    for name, t in times.items():
        res[f"{name}_times_s"] = t
        res[f"{name}_ms_per_token"] = statistics.median(t) / steps * 1e3
        res[f"{name}_tok_s"] = batch * steps / statistics.median(t)
    res["speed_ratio"] = res["transformers_ms_per_token"] / res["nemojax_ms_per_token"]

    new = {"nemojax": np.concatenate([np.asarray(token0)[:, None], outputs["nemojax"]], 1),
           "transformers": np.concatenate([hf_token0.numpy()[:, None], outputs["transformers"]], 1)}
    if batch == 1:
        gen_times = timed({"generate_1": (lambda: None, lambda _: hf_generate(hf, input_ids, 1)),
                           f"generate_{steps + 1}": (lambda: None, lambda _: outputs.__setitem__(
                               "generate", hf_generate(hf, input_ids, steps + 1).numpy()))}, generate_repeats)
        t1, tn = (statistics.median(t) for t in gen_times.values())
        res["generate_times_s"] = gen_times
        res["transformers_generate_ms_per_token"] = (tn - t1) / steps * 1e3
        res["generate_speed_ratio"] = res["transformers_generate_ms_per_token"] / res["nemojax_ms_per_token"]
        new["transformers_generate"] = outputs["generate"]
    res["tokens"] = {name: t.tolist() for name, t in new.items()}
    res["agree_first_tokens"] = AGREE_TOKENS
    res["agreement"] = {}
    for name, t in new.items():
        if name == "nemojax":
            continue
        lead = [leading_agreement(new["nemojax"][i], t[i]) for i in range(batch)]
        res["agreement"][name] = {"leading_tokens_per_row": lead, "of": steps + 1,
                                  f"rows_first_{AGREE_TOKENS}_equal": sum(n >= min(AGREE_TOKENS, steps + 1)
                                                                          for n in lead)}
    return res


# ----------------------------------------------------------------------------------------------- measurement 2

def synthetic_cache(config: ModelConfig, context: int, steps: int, seed: int = 0) -> Cache:
    """`init_cache(config, 1, context + steps)` with length `context` and every array filled with random normal
    values (KV entries, conv and SSM states): a stand-in for a prefilled cache, since decode work does not depend on
    the values."""
    cache = init_cache(config, 1, context + steps)
    leaves, treedef = jax.tree.flatten(cache.layers)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.block_until_ready(Cache(jax.tree.unflatten(treedef, leaves), jnp.full((1,), context, jnp.int32)))


def bench_scaling(models: dict[str, Model], contexts: list[int], steps: int, repeats: int) -> dict[str, Any]:
    """Per context: each model's per-token decode time (interleaved) and its cache bytes, measured and planned."""
    rows = []
    for context in contexts:
        row: dict[str, Any] = {"context": context, "max_len": context + steps}
        cases = {}
        for name, model in models.items():
            cache = synthetic_cache(model.config, context, steps)
            measured = cache_nbytes(cache)
            plan = cache_bytes(model.config, 1, context + steps)
            planned = {"kv": plan.kv, "ssm": plan.ssm, "conv": plan.conv}
            token = jnp.zeros((1,), jnp.int32)
            run, compile_s = compile_decode(model.config, model.params, token, copy_cache(cache), steps)
            cases[name] = (lambda c=cache: copy_cache(c), run)
            row[name] = {"bytes": measured, "plan_bytes": planned, "plan_matches": measured == planned,
                         "mamba_bytes": measured["ssm"] + measured["conv"], "compile_s": compile_s}
        for name, t in timed(cases, repeats).items():
            row[name]["times_s"] = t
            row[name]["ms_per_token"] = statistics.median(t) / steps * 1e3
        rows.append(row)
        print(f"  context {context:>6}: " + "  ".join(
            f"{name} {row[name]['ms_per_token']:6.2f} ms/token, cache {sum(row[name]['bytes'].values()) / MiB:7.2f} MiB"
            for name in models), flush=True)

    checks = {}
    for name in models:
        mamba = {row[name]["mamba_bytes"] for row in rows}
        kv_per_position = {row[name]["bytes"]["kv"] / row["max_len"] for row in rows}
        checks[name] = {"mamba_bytes_flat": len(mamba) == 1, "mamba_bytes": sorted(mamba),
                        "kv_linear": len(kv_per_position) == 1, "kv_bytes_per_position": sorted(kv_per_position),
                        "plan_matches": all(row[name]["plan_matches"] for row in rows)}
    return {"rows": rows, "checks": checks, "synthetic_cache": True}


# ----------------------------------------------------------------------------------------------- plot

def plot(scaling: dict[str, Any], models: dict[str, Model], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = scaling["rows"]
    ctx = [row["context"] for row in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, model in models.items():
        label = f"{name} ({model.num_params / 1e6:.1f}M, {model.config.pattern})"
        ax_t.plot(ctx, [row[name]["ms_per_token"] for row in rows], "o-", label=label)
        ax_m.plot(ctx, [sum(row[name]["bytes"].values()) / MiB for row in rows], "o-", label=f"{name} total")
        if any(row[name]["mamba_bytes"] for row in rows):
            ax_m.plot(ctx, [row[name]["bytes"]["kv"] / MiB for row in rows], "s--", label=f"{name} KV")
            ax_m.plot(ctx, [row[name]["mamba_bytes"] / MiB for row in rows], "^--", label=f"{name} Mamba conv + SSM")
    ax_t.set(xscale="log", xlabel="context (tokens)", ylabel="decode ms / token (batch 1)",
             title="nemojax decode time, float32 CPU")
    ax_t.set_ylim(bottom=0)
    ax_m.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="cache MiB (batch 1)",
             title="cache memory (measured arrays)")
    for ax in (ax_t, ax_m):
        ax.set_xticks(ctx, [f"{c // 1024}k" if c >= 1024 else str(c) for c in ctx])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("synthetic caches (random KV / state values) at each context", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=None, help="prompt length of measurement 1 (default 4096; 512 "
                   "with --quick)")
    p.add_argument("--batch", type=int, default=None, help="throughput batch of measurement 1 (default 16; 4 with "
                   "--quick); batch 1 is always run")
    p.add_argument("--new-tokens", type=int, default=None, help="timed decode steps N (default 32; 8 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="cores for XLA and torch (default: all available)")
    p.add_argument("--contexts", type=str, default=None, help="comma-separated scaling contexts (default "
                   "1024,2048,4096,8192,16384,32768; 1024,2048 with --quick)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attention (default sdpa)")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument("--plot", type=Path, default=None, help="PNG output (default: the JSON path with .png)")
    args = p.parse_args(argv)
    args.context = args.context or (512 if args.quick else 4096)
    args.batch = args.batch or (4 if args.quick else 16)
    args.new_tokens = args.new_tokens or (8 if args.quick else 32)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.contexts = [int(c) for c in (args.contexts or ("1024,2048" if args.quick else
                                                        "1024,2048,4096,8192,16384,32768")).split(",")]
    args.plot = args.plot or args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    threads = pin_threads(args.threads)
    env, load_before = environment(threads)

    hybrid = Model.init(bench_config(), 0)
    attn_only = Model.init(attention_only_config(hybrid.config), 1)
    models = {"hybrid": hybrid, "attention-only": attn_only}
    hf = hf_model(hybrid, args.attn)
    n_mixers = set_dt_limit(hf, (0.0, math.inf))
    hf.generation_config.eos_token_id = None  # greedy for exactly max_new_tokens, like nemojax with eos_ids=()
    print(f"hybrid: {hybrid.num_params:,} params, pattern {hybrid.config.pattern}; attention-only: "
          f"{attn_only.num_params:,} params, pattern {attn_only.config.pattern}; hidden {hybrid.config.hidden_size}, "
          f"float32; transformers attention={args.attn}, dt clamp (0, inf) on {n_mixers} HF mixers")

    steps = args.new_tokens
    decode = {}
    for batch in dict.fromkeys((1, args.batch)):
        print(f"decode at context {args.context}, batch {batch}, {steps} new tokens ...", flush=True)
        r = bench_context(hybrid, hf, args.context, batch, steps, args.repeats, min(args.repeats, 3))
        decode[f"batch_{batch}"] = r
        print(f"  prefill once (not in the decode numbers): nemojax {r['nemojax_prefill_once_s']:.1f} s (compile "
              f"{r['nemojax_prefill_compile_s']:.1f} s excluded), transformers {r['transformers_prefill_once_s']:.1f} "
              f"s; decode loop compile {r['nemojax_decode_compile_s']:.1f} s (excluded)")
        diffs = f"prefill logits max |diff| {r['max_abs_diff_prefill_logits']:.2g}"
        if "max_abs_diff_step_logits" in r:
            diffs += f", after one decode step {r['max_abs_diff_step_logits']:.2g}"
        print(f"  {diffs}")
        for name, a in r["agreement"].items():
            print(f"  greedy tokens nemojax vs {name}: first {AGREE_TOKENS} equal in "
                  f"{a[f'rows_first_{AGREE_TOKENS}_equal']}/{batch} row(s); leading agreement "
                  f"{min(a['leading_tokens_per_row'])}..{max(a['leading_tokens_per_row'])} of {a['of']}")

    contexts = args.contexts
    print(f"context scaling, batch 1, {steps} new tokens, SYNTHETIC caches (init_cache(config, 1, context + {steps}), "
          "length = context, random KV / state values; no prefill) ...", flush=True)
    scaling = bench_scaling(models, contexts, steps, args.repeats)

    def verdict(ok: bool) -> str:
        return "ok" if ok else "BELOW TARGET"

    b1, bb = decode["batch_1"], decode[f"batch_{args.batch}"]
    print(f"\nsummary (median of {args.repeats}, {threads} thread(s), float32, hybrid {hybrid.num_params / 1e6:.1f}M "
          f"params, context {args.context}, {steps} decode steps):")
    print(f"  batch 1     nemojax {b1['nemojax_ms_per_token']:.2f} ms/token   transformers "
          f"{b1['transformers_ms_per_token']:.2f} ms/token (decode steps)  speed ratio {b1['speed_ratio']:.2f}x  "
          f"(target >= {SPEED_TARGET:.0f}x: "
          f"{verdict(b1['speed_ratio'] >= SPEED_TARGET)})")
    print(f"              transformers generate {b1['transformers_generate_ms_per_token']:.2f} ms/token "
          f"((N+1 - 1 new tokens) / N)  ratio {b1['generate_speed_ratio']:.2f}x")
    if args.batch != 1:
        print(f"  batch {args.batch:<4}  nemojax {bb['nemojax_tok_s']:.0f} tok/s "
              f"({bb['nemojax_ms_per_token']:.1f} ms/step)   transformers {bb['transformers_tok_s']:.0f} tok/s "
              f"({bb['transformers_ms_per_token']:.1f} ms/step)  "
              f"ratio {bb['speed_ratio']:.2f}x")
    for key, r in decode.items():
        for name, a in r["agreement"].items():
            print(f"  greedy agreement {key.replace('_', ' ')} vs {name}: first {AGREE_TOKENS} tokens equal in "
                  f"{a[f'rows_first_{AGREE_TOKENS}_equal']}/{r['batch']} row(s)")
    names = list(models)
    print(f"  context scaling, batch 1 (synthetic caches, max_len = context + {steps}):")
    print(f"    {'context':>7} " + " ".join(f"{n + ' ms/tok':>22}" for n in names)
          + f" {'hybrid KV MiB':>14} {'hybrid Mamba MiB':>17} {'attn-only KV MiB':>17}")
    for row in scaling["rows"]:
        print(f"    {row['context']:>7} " + " ".join(f"{row[n]['ms_per_token']:>22.2f}" for n in names)
              + f" {row['hybrid']['bytes']['kv'] / MiB:>14.2f} {row['hybrid']['mamba_bytes'] / MiB:>17.3f}"
              f" {row['attention-only']['bytes']['kv'] / MiB:>17.2f}")
    first, last = scaling["rows"][0], scaling["rows"][-1]
    for n in names:
        print(f"    {n}: decode {last[n]['ms_per_token'] / first[n]['ms_per_token']:.2f}x slower at "
              f"{last['context']} than at {first['context']} (context x{last['context'] / first['context']:.0f})")
    hc = scaling["checks"]["hybrid"]
    checks = scaling["checks"]
    print(f"  Mamba-layer cache (conv + SSM) {hc['mamba_bytes'][0]:,} bytes at every context: "
          f"flat={hc['mamba_bytes_flat']}  (target flat: {verdict(hc['mamba_bytes_flat'])}); KV linear in max_len: "
          + ", ".join(f"{n} {checks[n]['kv_linear']} ({checks[n]['kv_bytes_per_position'][0]:,.0f} B/position)"
                      for n in names))
    print("  cache_nbytes(real arrays) == cache_bytes(plan) at every context: "
          + ", ".join(f"{n} {scaling['checks'][n]['plan_matches']}" for n in names))
    if args.context in contexts:
        row = next(r for r in scaling["rows"] if r["context"] == args.context)
        print(f"  hybrid at {args.context}: synthetic cache {row['hybrid']['ms_per_token']:.2f} ms/token vs prefilled "
              f"cache {b1['nemojax_ms_per_token']:.2f} ms/token")

    env["loadavg_before"], env["loadavg_after"] = list(load_before), list(os.getloadavg())
    env["wall_s"] = time.perf_counter() - wall_start
    report = {
        "argv": sys.argv[1:] if argv is None else argv, "env": env,
        "models": {n: {"num_params": m.num_params, "config": config_dict(m.config),
                       "weights_bytes": cache_bytes(m.config, 1, 1).weights} for n, m in models.items()},
        "methods": {
            "nemojax_decode": "AOT-compiled jitted lax.fori_loop of N x (extend by one token + logits + argmax) "
                              "from a copy of the prefilled cache (donated); per token = median / N",
            "transformers_decode": "Python loop of N x (NemotronHForCausalLM(token, cache=DynamicCache, use_cache=True)"
                                   " + argmax) from a deepcopy of the prefilled cache, torch.inference_mode",
            "transformers_generate": "(median time of generate(max_new_tokens=N+1) - of generate(1)) / N, batch 1",
            "prefill": "timed once per side, not part of any decode number",
            "scaling": "synthetic caches: init_cache(config, 1, context + N), length = context, random values",
        },
        "hf_mixers_dt_limit_reset": n_mixers, "decode": decode, "scaling": scaling,
        "targets": {"speed_ratio_batch_1": SPEED_TARGET, "mamba_cache_flat": True},
        "targets_met": {"speed_ratio_batch_1": b1["speed_ratio"] >= SPEED_TARGET,
                        "mamba_cache_flat": hc["mamba_bytes_flat"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(scaling, models, args.plot)
    print(f"wrote {args.out} and {args.plot} (wall {env['wall_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
