"""Every Pallas kernel against its XLA reference on the device: time, ratio, achieved TFLOP/s or GB/s beside the
device's peak, and the kernel's error against the reference on the same inputs.

    .venv/bin/python experiments/bench_kernels.py            # GPU: the shapes below, sized for < 6 min on an H200
    .venv/bin/python experiments/bench_kernels.py --quick    # tiny shapes, any backend (interpreted on CPU)
    options: --repeats N  --only ssd_scan,ssd_update,fp8_matmul,nvfp4_matmul,attention  --out PATH

What is compared (each pair on the same inputs, compiled ahead of time, the compile excluded; time = median of
`--repeats` runs after one warm-up, the two sides interleaved):

  ssd_scan      pallas_kernels.ssd_scan (forward) vs nemojax.nn.ssd.ssd_chunked under XLA: the Mamba-2 mixer of a
                bf16 model (x and dt float32 as the mixer passes them, B/C bfloat16), Nemotron-H-8B (H 128, P 64,
                G 8, N 128, chunk 128) at L = 8192 and Nemotron Nano 2 (P 80) at L = 4096. Target: >= 2x at
                L = 8192 on the 8B shape. FLOPs: the chunked algorithm's matmul work (CB once per group,
                the intra-chunk product, the entering-state product and the state update).
  ssd_update    pallas_kernels.ssd_update vs its pure-JAX reference, the state donated on both sides (decode of
                the 8B mixer at batch 1 and 64). Bytes: the float32 state read and written, plus the inputs.
  fp8_matmul    E4M3 x E4M3 with per-tensor scales (bf16 out) vs a bfloat16 jnp.dot of the same shape, and XLA's
                own FP8 dot as a second baseline. Target: >= 1.5x bf16 on the large shapes.
  nvfp4_matmul  W4A16 (packed E2M1 + E4M3 block scales) vs a bfloat16 jnp.dot with bf16 weights: a decode-sized
                M (weight-bandwidth bound: GB/s of the weight bytes) and a prefill-sized M (TFLOP/s).
  attention     pallas_kernels.attention.flash_attention (JAX's Pallas flash attention) vs
                jax.nn.dot_product_attention (XLA, and cuDNN on GPU), causal GQA (32 query / 8 KV heads, d 128).

Peaks come from a table by device kind (H100/H200 SXM dense bf16 989 TFLOP/s, FP8 1979, HBM 3.35 / 4.8 TB/s);
unknown devices print no peak. Results print as a table and go to runs/bench_kernels.json (or --out).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import nemojax
from nemojax.nn.ssd import ssd_chunked
from nemojax.quant.qarray import dequantize, pack_fp4, quantize
from pallas_kernels import dispatch
from pallas_kernels.attention import flash_attention
from pallas_kernels.quant_matmul import fp8_matmul, nvfp4_matmul
from pallas_kernels.ssd_scan import ssd_scan
from pallas_kernels.ssd_update import ssd_update, ssd_update_reference

# device kind (substring) -> (bf16 TFLOP/s, fp8 TFLOP/s, HBM TB/s), dense, SXM parts
PEAKS = {"H200": (989.0, 1979.0, 4.8), "H100": (989.0, 1979.0, 3.35), "A100": (312.0, None, 2.0)}
OPS = ("ssd_scan", "ssd_update", "fp8_matmul", "nvfp4_matmul", "attention")


def peaks() -> tuple[float | None, float | None, float | None]:
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAKS.items() if k in kind), (None, None, None))


def compiled(fn: Callable, *args, donate: tuple[int, ...] = ()) -> Callable:
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


Args = tuple | Callable[[], tuple]


def time_pair(a: Callable, a_args: Args, b: Callable, b_args: Args, repeats: int) -> tuple[float, float]:
    """Median seconds of a(*a_args) and b(*b_args), interleaved, after one warm-up each. Args given as a function
    are rebuilt before every call (outside the timer), so donated buffers are fresh."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for r in range(repeats + 1):
        for i, (fn, make) in enumerate(((a, a_args), (b, b_args))):
            args = make() if callable(make) else make
            jax.block_until_ready(args)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            if r:
                times[i].append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def row(op: str, shape: str, t_kernel: float, t_ref: float, err: float, work: float, unit: str,
        peak: float | None, baseline: str) -> dict:
    rate = work / t_kernel / (1e12 if unit == "TFLOP/s" else 1e9)
    return dict(op=op, shape=shape, kernel_ms=1e3 * t_kernel, ref_ms=1e3 * t_ref, speedup=t_ref / t_kernel,
                rate=rate, unit=unit, peak=peak, of_peak=None if peak is None else rate / peak, rel_err=err,
                baseline=baseline)


# ------------------------------------------------------------------------------------------------- the ops


def bench_ssd_scan(quick: bool, interpret: bool, repeats: int, peak_bf16: float | None,
                   sweep: bool = False) -> list[dict]:
    cases = ([("tiny", 1, 70, 8, 16, 2, 16, 32)] if quick else
             [(name, 1, L, m.num_heads, m.head_dim, m.n_groups, m.state_size, m.chunk_size)
              for name, L in (("nemotron-h-8b", 8192), ("nemotron-nano-9b-v2", 4096))
              for m in [nemojax.presets.get(name).mamba]])
    out = []
    for name, b, L, H, P, G, N, Q in cases:
        ks = jax.random.split(jax.random.key(0), 5)
        x = jax.random.normal(ks[0], (b, L, H, P), jnp.float32)
        dt = jax.nn.softplus(jax.random.normal(ks[1], (b, L, H)) - 2.0)
        A = -jnp.exp(jax.random.uniform(ks[2], (H,), maxval=2.0))
        B = jax.random.normal(ks[3], (b, L, G, N), jnp.bfloat16)
        C = jax.random.normal(ks[4], (b, L, G, N), jnp.bfloat16)
        args = (x, dt, A, B, C)
        ref = compiled(functools.partial(ssd_chunked, chunk_size=Q), *args)
        y_ref, s_ref = ref(*args)
        nc = -(-L // Q)
        flops = 2 * b * nc * (G * Q * Q * N + H * (Q * Q * P + 2 * Q * P * N))
        for label, launch in SSD_SCAN_SWEEP if sweep else SSD_SCAN_SWEEP[:1]:
            try:
                kernel = compiled(functools.partial(ssd_scan, chunk_size=Q, interpret=interpret, **launch), *args)
                y, s = kernel(*args)
            except Exception as e:  # a config that does not compile is a result of the sweep, not its end
                out.append(dict(op="ssd_scan", shape=f"{name} L{L} {label}", error=f"{type(e).__name__}: {e}"[:400]))
                print(f"  ssd_scan {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            err = max(rel_err(y, y_ref), rel_err(s, s_ref))
            t_k, t_r = time_pair(kernel, args, ref, args, repeats)
            out.append(row("ssd_scan", f"{name} b{b} L{L} H{H} P{P} G{G} N{N} Q{Q} {label}", t_k, t_r, err, flops,
                           "TFLOP/s", peak_bf16, "XLA ssd_chunked"))
        if sweep:  # the training path: the kernel forward and the reference's backward vs autodiff of the XLA SSD
            w_y = jax.random.normal(ks[0], x.shape, jnp.float32)
            kernel = compiled(_grads(functools.partial(ssd_scan, chunk_size=Q, interpret=interpret), w_y), *args)
            ref_g = compiled(_grads(functools.partial(ssd_chunked, chunk_size=Q), w_y), *args)
            err = max(rel_err(a, b) for a, b in zip(kernel(*args), ref_g(*args), strict=True))
            t_k, t_r = time_pair(kernel, args, ref_g, args, repeats)
            out.append(row("ssd_scan", f"{name} b{b} L{L} fwd+bwd (dx, ddt, dB, dC)", t_k, t_r, err, 3 * flops,
                           "TFLOP/s", peak_bf16, "XLA ssd_chunked autodiff"))
    return out


def _grads(scan: Callable, w_y: jax.Array) -> Callable:
    """(x, dt, A, B, C) -> the gradients of sum(y * w_y) w.r.t. x, dt, B, C."""
    return jax.grad(lambda *a: jnp.sum(scan(*a)[0] * w_y), argnums=(0, 1, 3, 4))


# (label, ssd_scan launch options): the default first, then the alternatives a --sweep times
SSD_SCAN_SWEEP = [
    ("chunked hb1 w4", dict(algorithm="chunked", block_heads=1, num_warps=4)),
    ("chunked hb1 w8", dict(algorithm="chunked", block_heads=1, num_warps=8)),
    ("chunked hb2 w4", dict(algorithm="chunked", block_heads=2, num_warps=4)),
    ("chunked hb2 w8", dict(algorithm="chunked", block_heads=2, num_warps=8)),
    ("chunked hb4 w8", dict(algorithm="chunked", block_heads=4, num_warps=8)),
    ("fused hb1 w8 stages1", dict(algorithm="fused", block_heads=1, num_warps=8, num_stages=1)),
    ("fused hb1 w4 stages2", dict(algorithm="fused", block_heads=1, num_warps=4, num_stages=2)),
]


def _state_args(key: jax.Array, shape: tuple[int, ...], small: tuple) -> tuple:
    return (jax.random.normal(key, shape, jnp.float32), *small)


def bench_ssd_update(quick: bool, interpret: bool, repeats: int, peak_bw: float | None,
                     sweep: bool = False) -> list[dict]:
    m = nemojax.presets.get("nemotron-h-8b").mamba
    name = "tiny" if quick else "nemotron-h-8b"
    cases = [(2, 8, 16, 2, 16)] if quick else [(b, m.num_heads, m.head_dim, m.n_groups, m.state_size)
                                                for b in (1, 64)]
    out = []
    for b, H, P, G, N in cases:
        ks = jax.random.split(jax.random.key(1), 6)
        small = (jax.random.normal(ks[1], (b, H, P), jnp.bfloat16),
                 jax.nn.softplus(jax.random.normal(ks[2], (b, H))), -jnp.exp(jax.random.normal(ks[3], (H,))),
                 jax.random.normal(ks[4], (b, G, N), jnp.bfloat16), jax.random.normal(ks[5], (b, G, N), jnp.bfloat16),
                 jnp.ones((H,), jnp.float32))
        fresh = functools.partial(_state_args, ks[0], (b, H, P, N), small)  # the state is donated: one per call
        kernel = compiled(functools.partial(ssd_update, interpret=interpret), *fresh(), donate=(0,))
        ref = compiled(ssd_update_reference, *fresh(), donate=(0,))
        (y, s), (y_ref, s_ref) = kernel(*fresh()), ref(*fresh())
        err = max(rel_err(y, y_ref), rel_err(s, s_ref))
        t_k, t_r = time_pair(kernel, fresh, ref, fresh, repeats)
        nbytes = 2 * b * H * P * N * 4 + sum(t.nbytes for t in small) + b * H * P * 4
        out.append(row("ssd_update", f"{name} b{b} H{H} P{P} G{G} N{N}", t_k, t_r, err, nbytes, "GB/s",
                       None if peak_bw is None else 1e3 * peak_bw, "XLA reference (donated state)"))
    return out


def bench_fp8(quick: bool, interpret: bool, repeats: int, peak_fp8: float | None, sweep: bool = False) -> list[dict]:
    cases = [(48, 96, 64)] if quick else [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 4096)]
    out = []
    for M, K, N in cases:
        ka, kb = jax.random.split(jax.random.key(2))
        a, b = jax.random.normal(ka, (M, K), jnp.bfloat16), jax.random.normal(kb, (K, N), jnp.bfloat16)
        qa, qb = quantize(a, "fp8_e4m3"), quantize(b, "fp8_e4m3")
        codes = (qa.data, qb.data, qa.scale, qb.scale)
        kernel = compiled(functools.partial(fp8_matmul, interpret=interpret), *codes)
        bf16 = compiled(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16), a, b)
        xla_fp8 = compiled(lambda a, b, sa, sb: (jnp.dot(a, b, preferred_element_type=jnp.float32) * (sa * sb)
                                                 ).astype(jnp.bfloat16), *codes)
        exact = (qa.data.astype(jnp.float32) @ qb.data.astype(jnp.float32)) * (qa.scale * qb.scale)
        err = rel_err(kernel(*codes), exact)
        flops = 2 * M * N * K
        t_k, t_bf16 = time_pair(kernel, codes, bf16, (a, b), repeats)
        t_k2, t_x8 = time_pair(kernel, codes, xla_fp8, codes, repeats)
        shape = f"M{M} K{K} N{N}"
        out.append(row("fp8_matmul", shape, t_k, t_bf16, err, flops, "TFLOP/s", peak_fp8, "bf16 jnp.dot"))
        out.append(row("fp8_matmul", shape, t_k2, t_x8, err, flops, "TFLOP/s", peak_fp8, "XLA fp8 dot"))
    return out


def bench_nvfp4(quick: bool, interpret: bool, repeats: int, peaks_: tuple, sweep: bool = False) -> list[dict]:
    peak_bf16, _, peak_bw = peaks_
    cases = [(16, 64, 48)] if quick else [(16, 8192, 8192), (8192, 8192, 8192)]
    out = []
    for M, K, N in cases:
        kx, kw = jax.random.split(jax.random.key(3))
        x = jax.random.normal(kx, (M, K), jnp.bfloat16)
        w = jax.random.normal(kw, (N, K), jnp.float32)  # torch layout [out, in]
        q = quantize(w, "nvfp4", axis=1)
        packed, scale, g = pack_fp4(q.data), q.scale, q.global_scale
        w_bf16 = dequantize(q, jnp.bfloat16)  # the same weights, exact in bf16 up to S_dec's rounding
        kernel = compiled(functools.partial(nvfp4_matmul, interpret=interpret), x, packed, scale, g)
        bf16 = compiled(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                         preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                        x, w_bf16)
        err = rel_err(kernel(x, packed, scale, g), bf16(x, w_bf16))
        t_k, t_r = time_pair(kernel, (x, packed, scale, g), bf16, (x, w_bf16), repeats)
        if M <= 64:  # decode-sized: bound by reading the weights
            work, unit = packed.nbytes + scale.nbytes + x.nbytes, "GB/s"
            peak = None if peak_bw is None else 1e3 * peak_bw
        else:
            work, unit, peak = 2 * M * N * K, "TFLOP/s", peak_bf16
        out.append(row("nvfp4_matmul", f"M{M} K{K} N{N}", t_k, t_r, err, work, unit, peak, "bf16 dot, bf16 W"))
    return out


def bench_attention(quick: bool, interpret: bool, repeats: int, peak_bf16: float | None,
                    sweep: bool = False) -> list[dict]:
    cases = [(1, 70, 4, 2, 32)] if quick else [(1, 4096, 32, 8, 128), (1, 8192, 32, 8, 128)]
    out = []
    for b, L, Hq, Hkv, d in cases:
        ks = jax.random.split(jax.random.key(4), 3)
        q = jax.random.normal(ks[0], (b, L, Hq, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, L, Hkv, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, L, Hkv, d), jnp.bfloat16)
        scale = d ** -0.5
        kernel = compiled(functools.partial(flash_attention, scale=scale, interpret=interpret), q, k, v)
        refs = {"jax.nn.dot_product_attention xla": "xla"}
        if jax.default_backend() == "gpu":
            refs["jax.nn.dot_product_attention cudnn"] = "cudnn"
        flops = 2 * 2 * b * Hq * d * L * L / 2  # QK^T and PV, the causal half
        for label, impl in refs.items():
            ref = compiled(functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=True,
                                             implementation=impl), q, k, v)
            err = rel_err(kernel(q, k, v), ref(q, k, v))
            t_k, t_r = time_pair(kernel, (q, k, v), ref, (q, k, v), repeats)
            out.append(row("attention", f"b{b} L{L} Hq{Hq} Hkv{Hkv} d{d}", t_k, t_r, err, flops, "TFLOP/s",
                           peak_bf16, label))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run; interpreted on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 10, quick 1)")
    parser.add_argument("--only", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--sweep", action="store_true",
                        help="also time each kernel's alternative block / launch configurations (tuning runs)")
    parser.add_argument("--out", default="runs/bench_kernels.json")
    args = parser.parse_args()
    only = [op for op in args.only.split(",") if op]
    if unknown := sorted(set(only) - set(OPS)):
        parser.error(f"--only has {unknown}; allowed: {OPS}")
    repeats = args.repeats or (1 if args.quick else 10)
    interpret = dispatch.interpret()
    if interpret and not args.quick:
        parser.error("no accelerator: the full shapes need a GPU; use --quick for an interpreted smoke run")
    peak_bf16, peak_fp8, peak_bw = peaks()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"interpret={interpret}, repeats={repeats}", flush=True)
    runners = {
        "ssd_scan": lambda: bench_ssd_scan(args.quick, interpret, repeats, peak_bf16, args.sweep),
        "ssd_update": lambda: bench_ssd_update(args.quick, interpret, repeats, peak_bw, args.sweep),
        "fp8_matmul": lambda: bench_fp8(args.quick, interpret, repeats, peak_fp8, args.sweep),
        "nvfp4_matmul": lambda: bench_nvfp4(args.quick, interpret, repeats, (peak_bf16, peak_fp8, peak_bw),
                                            args.sweep),
        "attention": lambda: bench_attention(args.quick, interpret, repeats, peak_bf16, args.sweep),
    }
    rows: list[dict] = []
    header = f"{'op':13} {'shape':56} {'kernel ms':>10} {'ref ms':>9} {'speedup':>8} {'rate':>16} {'of peak':>8} " \
             f"{'rel err':>8}  baseline"
    print(header)
    for op in only:
        t0 = time.perf_counter()
        try:
            new = runners[op]()
        except Exception as e:  # one kernel failing on a device must not hide the others' numbers
            print(f"{op:13} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append(dict(op=op, error=f"{type(e).__name__}: {e}"))
            continue
        for r in new:
            if "error" in r:  # a sweep config that failed; printed when it failed
                continue
            peak = "" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}%"
            print(f"{r['op']:13} {r['shape']:56} {r['kernel_ms']:10.3f} {r['ref_ms']:9.3f} {r['speedup']:7.2f}x "
                  f"{r['rate']:9.1f} {r['unit']:>6} {peak:>8} {r['rel_err']:8.1e}  {r['baseline']}", flush=True)
        rows.extend(new)
        print(f"  ({op}: {time.perf_counter() - t0:.0f} s)", flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                                    jax=jax.__version__, quick=args.quick, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
