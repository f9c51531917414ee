"""Every Pallas kernel against its XLA reference on the device: time, ratio, achieved TFLOP/s or GB/s beside the
device's peak, and the kernel's error against the reference on the same inputs.

    .venv/bin/python experiments/bench_kernels.py            # GPU: the shapes below, sized for < 6 min on an H200
    .venv/bin/python experiments/bench_kernels.py --quick    # tiny shapes, any backend (interpreted on CPU)
    options: --repeats N  --only ssd_scan,ssd_update,fp8_matmul,nvfp4_matmul,attention,decode_attention  --sweep
             --out PATH

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
                jax.nn.dot_product_attention (XLA, and cuDNN on GPU), causal GQA (32 query / 8 KV heads, d 128);
                and over packed documents vs nemojax's XLA segment mask.
  decode_attention  pallas_kernels.decode_attention (split-K, reads the filled cache only) vs the XLA cached
                attention, one decode step over a 32k cache filled to 4k and to 32k.

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
from nemojax.lowp.qarray import dequantize, pack_fp4, quantize
from nemojax.nn.attention import cached_attention, causal_attention
from nemojax.nn.ssd import ssd_chunked
from nemojax.nn.state import KVCache
from pallas_kernels import dispatch
from pallas_kernels.attention import flash_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.quant_matmul import DECODE_M, fp8_matmul, nvfp4_default_config, nvfp4_matmul
from pallas_kernels.ssd_scan import ssd_scan
from pallas_kernels.ssd_update import ssd_update, ssd_update_reference

# device kind (substring) -> (bf16 TFLOP/s, fp8 TFLOP/s, HBM TB/s), dense, SXM parts
PEAKS = {"H200": (989.0, 1979.0, 4.8), "H100": (989.0, 1979.0, 3.35), "A100": (312.0, None, 2.0)}
# attention includes attention_packed
OPS = ("ssd_scan", "ssd_update", "fp8_matmul", "nvfp4_matmul", "attention", "decode_attention")


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
        peak: float | None, baseline: str, impl: str = "pallas") -> dict:
    """One result: `impl` (the implementation timed, as pallas_kernels.dispatch names it) against `baseline`."""
    rate = work / t_kernel / (1e12 if unit == "TFLOP/s" else 1e9)
    return dict(op=op, impl=impl, shape=shape, kernel_ms=1e3 * t_kernel, ref_ms=1e3 * t_ref,
                speedup=t_ref / t_kernel, rate=rate, unit=unit, peak=peak,
                of_peak=None if peak is None else rate / peak, rel_err=err, baseline=baseline)


def try_config(op: str, label: str, fn: Callable, args: Args, out: list[dict],
               donate: tuple[int, ...] = ()) -> tuple[Callable, object] | None:
    """(compiled fn, its outputs), or None with an error row appended to `out`: a config that does not compile is
    a result of a sweep, not its end. Args given as a function are rebuilt for each call (donated buffers)."""
    make = args if callable(args) else lambda: args
    try:
        kernel = compiled(fn, *make(), donate=donate)
        return kernel, kernel(*make())
    except Exception as e:
        out.append(dict(op=op, shape=label, error=f"{type(e).__name__}: {e}"[:400]))
        print(f"  {op} {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


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
            fn = functools.partial(ssd_scan, **{"chunk_size": Q, "interpret": interpret, **launch})
            if (tried := try_config("ssd_scan", f"{name} L{L} {label}", fn, args, out)) is None:
                continue
            kernel, (y, s) = tried
            err = max(rel_err(y, y_ref), rel_err(s, s_ref))
            t_k, t_r = time_pair(kernel, args, ref, args, repeats)
            out.append(row("ssd_scan", f"{name} b{b} L{L} H{H} P{P} G{G} N{N} Q{Q} {label}", t_k, t_r, err, flops,
                           "TFLOP/s", peak_bf16, "XLA ssd_chunked"))
        if not quick:  # the training path: the kernels' forward and backward vs autodiff of the XLA chunked SSD
            w_y = jax.random.normal(ks[0], x.shape, jnp.float32)
            kernel = compiled(_grads(functools.partial(ssd_scan, chunk_size=Q, interpret=interpret), w_y), *args)
            ref_g = compiled(_grads(functools.partial(ssd_chunked, chunk_size=Q), w_y), *args)
            err = max(rel_err(a, b) for a, b in zip(kernel(*args), ref_g(*args), strict=True))
            t_k, t_r = time_pair(kernel, args, ref_g, args, repeats)
            out.append(row("ssd_scan", f"{name} b{b} L{L} fwd+bwd (dx, ddt, dB, dC)", t_k, t_r, err, 4 * flops,
                           "TFLOP/s", peak_bf16, "XLA ssd_chunked autodiff"))
    return out


def _grads(scan: Callable, w_y: jax.Array) -> Callable:
    """(x, dt, A, B, C) -> the gradients of sum(y * w_y) w.r.t. x, dt, B, C."""
    return jax.grad(lambda *a: jnp.sum(scan(*a)[0] * w_y), argnums=(0, 1, 3, 4))


# (label, ssd_scan launch options): the default first, then the alternatives a --sweep times
SSD_SCAN_SWEEP = [
    ("fused hb1 w8", dict(algorithm="fused", block_heads=1, num_warps=8)),
    ("fused hb2 w8", dict(algorithm="fused", block_heads=2, num_warps=8)),
    ("chunked hb2 w8", dict(algorithm="chunked", block_heads=2, num_warps=8)),
]


def _state_args(key: jax.Array, shape: tuple[int, ...], small: tuple) -> tuple:
    return (jax.random.normal(key, shape, jnp.float32), *small)


def bench_ssd_update(quick: bool, interpret: bool, repeats: int, peak_bw: float | None,
                     sweep: bool = False) -> list[dict]:
    """Defaults on the 8B mixer at batch 1 and 64 and on Nano 2 (P 80: overhanging P blocks) at batch 64; with
    sweep, every (block_p, num_warps) of the grid below as its own row (the default is block_p 32, 4 warps)."""
    name8, nano = ("tiny", "tiny-p5") if quick else ("nemotron-h-8b", "nemotron-nano-9b-v2")
    m8, mn = nemojax.presets.get("nemotron-h-8b").mamba, nemojax.presets.get("nemotron-nano-9b-v2").mamba
    if quick:
        cases = [(name8, (2, 8, 16, 2, 16)), (nano, (1, 4, 5, 2, 8))]
    else:
        cases = [(name8, (b, m8.num_heads, m8.head_dim, m8.n_groups, m8.state_size)) for b in (1, 64)]
        cases.append((nano, (64, mn.num_heads, mn.head_dim, mn.n_groups, mn.state_size)))
    configs = [dict()]  # the defaults
    if sweep:
        configs += ([dict(block_p=4, num_warps=1), dict(block_p=8, num_warps=2)] if quick else
                    [dict(block_p=bp, num_warps=w) for bp, w in ((16, 2), (16, 4), (32, 2), (32, 8), (64, 4),
                                                                 (64, 8))])
    out = []
    for name, (b, H, P, G, N) in cases:
        ks = jax.random.split(jax.random.key(1), 6)
        small = (jax.random.normal(ks[1], (b, H, P), jnp.bfloat16),
                 jax.nn.softplus(jax.random.normal(ks[2], (b, H))), -jnp.exp(jax.random.normal(ks[3], (H,))),
                 jax.random.normal(ks[4], (b, G, N), jnp.bfloat16), jax.random.normal(ks[5], (b, G, N), jnp.bfloat16),
                 jnp.ones((H,), jnp.float32))
        fresh = functools.partial(_state_args, ks[0], (b, H, P, N), small)  # the state is donated: one per call
        ref = compiled(ssd_update_reference, *fresh(), donate=(0,))
        y_ref, s_ref = ref(*fresh())
        nbytes = 2 * b * H * P * N * 4 + sum(t.nbytes for t in small) + b * H * P * 4
        for cfg in configs:
            tag = "".join(f" {k}={v}" for k, v in cfg.items()) or " defaults"
            fn = functools.partial(ssd_update, interpret=interpret, **cfg)
            if (tried := try_config("ssd_update", f"{name} b{b}{tag}", fn, fresh, out, donate=(0,))) is None:
                continue
            kernel, (y, s) = tried
            err = max(rel_err(y, y_ref), rel_err(s, s_ref))
            t_k, t_r = time_pair(kernel, fresh, ref, fresh, repeats)
            out.append(row("ssd_update", f"{name} b{b} H{H} P{P} G{G} N{N}{tag}", t_k, t_r, err, nbytes, "GB/s",
                           None if peak_bw is None else 1e3 * peak_bw, "XLA reference (donated state)"))
    return out


def bench_fp8(quick: bool, interpret: bool, repeats: int, peak_fp8: float | None, sweep: bool = False) -> list[dict]:
    """The default (the Pallas kernel) against bf16 and XLA's plain FP8 dot; with sweep, XLA's FP8 GEMM forms
    (fp8_matmul impl xla / xla_out / xla_dot, b [K, N] or [N, K]) and Pallas launch configs, each against bf16.
    All forms at the square 8192 shape (the target), two at the others, to keep the compiles few."""
    cases = [(48, 96, 64)] if quick else [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 4096)]
    pallas_cfgs = ([dict(block_m=16, block_n=32, block_k=32, num_warps=2, num_stages=2)] if quick else
                   [dict(num_warps=4), dict(block_n=256, block_k=64), dict(b_layout="nk", num_stages=4)])
    out = []
    for M, K, N in cases:
        ka, kb = jax.random.split(jax.random.key(2))
        a, b = jax.random.normal(ka, (M, K), jnp.bfloat16), jax.random.normal(kb, (K, N), jnp.bfloat16)
        qa, qb = quantize(a, "fp8_e4m3"), quantize(b, "fp8_e4m3")
        codes = (qa.data, qb.data, qa.scale, qb.scale)
        codes_nk = (qa.data, jnp.asarray(qb.data.T), qa.scale, qb.scale)  # the weight stored [N, K]
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
        if not sweep:
            continue
        full = quick or (M, K, N) == (8192, 8192, 8192)
        variants = [dict(impl=i, b_layout=lay) for i in ("xla", "xla_out", "xla_dot") for lay in ("kn", "nk")]
        if not full:
            variants = [dict(impl="xla", b_layout="nk"), dict(impl="xla_dot", b_layout="nk")]
        variants += pallas_cfgs if full else []
        for cfg in variants:
            args = codes_nk if cfg.get("b_layout") == "nk" else codes
            tag = " ".join(f"{k}={v}" for k, v in cfg.items())
            tried = try_config("fp8_matmul", f"{shape} {tag}", functools.partial(fp8_matmul, interpret=interpret,
                                                                                 **cfg), args, out)
            if tried is None:
                continue
            fn, y = tried
            err = rel_err(y, exact)
            t_v, t_bf16 = time_pair(fn, args, bf16, (a, b), repeats)
            out.append(row("fp8_matmul", f"{shape} {tag}", t_v, t_bf16, err, flops, "TFLOP/s", peak_fp8,
                           "bf16 jnp.dot"))
    return out


def bench_nvfp4(quick: bool, interpret: bool, repeats: int, peaks_: tuple, sweep: bool = False) -> list[dict]:
    """W4A16 with its per-M default config (quant_matmul.nvfp4_default_config) against a bf16 dot with bf16
    weights; with sweep, the compare/select decode and other (block_m, block_n, block_k, num_warps, num_stages)
    per regime (each a change from the default) as their own rows, all measured by pallas_kernels.resources for
    sm_90a at 35-150 KB of shared memory (bf16 x; only the 4-warp prefill row, the old default, spills)."""
    peak_bf16, _, peak_bw = peaks_
    cases = [(16, 64, 48), (80, 64, 48)] if quick else [(16, 8192, 8192), (8192, 8192, 8192)]
    if quick:
        decode_cfgs = prefill_cfgs = [dict(decode="arith"),
                                      dict(block_m=16, block_n=16, block_k=32, num_warps=2, num_stages=2)]
    else:
        decode_cfgs = [dict(decode="arith"), dict(block_n=64, block_k=256), dict(block_n=16, block_k=512),
                       dict(block_k=256, num_stages=4), dict(num_warps=2), dict(block_n=64, num_stages=2)]
        prefill_cfgs = [dict(decode="arith"), dict(num_warps=4), dict(block_m=64, block_k=128, num_warps=4),
                        dict(block_k=128)]
    out = []
    for M, K, N in cases:
        kx, kw = jax.random.split(jax.random.key(3))
        x = jax.random.normal(kx, (M, K), jnp.bfloat16)
        w = jax.random.normal(kw, (N, K), jnp.float32)  # torch layout [out, in]
        q = quantize(w, "nvfp4", axis=1)
        packed, scale, g = pack_fp4(q.data), q.scale, q.global_scale
        w_bf16 = dequantize(q, jnp.bfloat16)  # the same weights, exact in bf16 up to S_dec's rounding
        bf16 = compiled(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())),
                                                         preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                        x, w_bf16)
        y_bf16 = bf16(x, w_bf16)
        if M <= DECODE_M:  # decode-sized: bound by reading the weights
            work, unit = packed.nbytes + scale.nbytes + x.nbytes, "GB/s"
            peak = None if peak_bw is None else 1e3 * peak_bw
        else:
            work, unit, peak = 2 * M * N * K, "TFLOP/s", peak_bf16
        configs = [dict()] + ((decode_cfgs if M <= DECODE_M else prefill_cfgs) if sweep else [])
        for cfg in configs:
            full = {**nvfp4_default_config(M, x.dtype), "decode": "e4m3", **cfg}
            tag = ("defaults" if not cfg else "cfg") + \
                " bm{block_m} bn{block_n} bk{block_k} w{num_warps} s{num_stages} {decode}".format(**full)
            tried = try_config("nvfp4_matmul", f"M{M} K{K} N{N} {tag}",
                               functools.partial(nvfp4_matmul, interpret=interpret, **cfg),
                               (x, packed, scale, g), out)
            if tried is None:
                continue
            kernel, y = tried
            err = rel_err(y, y_bf16)
            t_k, t_r = time_pair(kernel, (x, packed, scale, g), bf16, (x, w_bf16), repeats)
            out.append(row("nvfp4_matmul", f"M{M} K{K} N{N} {tag}", t_k, t_r, err, work, unit, peak,
                           "bf16 dot, bf16 W"))
    return out


def _packed_flash(q, k, v, segment_ids, *, scale: float, interpret: bool):
    return flash_attention(q, k, v, scale=scale, interpret=interpret, segment_ids=segment_ids)


def _packed_xla(q, k, v, segment_ids, *, scale: float):
    return causal_attention(q, k, v, scale, segment_ids=segment_ids)


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
        flops = 2 * 2 * b * Hq * d * L * L / 2  # QK^T and PV, the causal half
        shape = f"b{b} L{L} Hq{Hq} Hkv{Hkv} d{d}"
        xla = compiled(functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=True,
                                         implementation="xla"), q, k, v)
        impls = {"pallas": functools.partial(flash_attention, scale=scale, interpret=interpret)}
        if jax.default_backend() == "gpu":
            impls["cudnn"] = functools.partial(jax.nn.dot_product_attention, scale=scale, is_causal=True,
                                               implementation="cudnn")
        for impl, fn in impls.items():
            kernel = compiled(fn, q, k, v)
            err = rel_err(kernel(q, k, v), xla(q, k, v))
            t_k, t_r = time_pair(kernel, (q, k, v), xla, (q, k, v), repeats)
            out.append(row("attention", shape, t_k, t_r, err, flops, "TFLOP/s", peak_bf16,
                           "jax.nn.dot_product_attention xla", impl=impl))
        # packed documents (4 of them, unequal): the Pallas kernel's segment ids vs nemojax's XLA segment mask
        cuts = np.array([0, L // 8, L // 2, L // 2 + L // 5])
        segments = jnp.asarray(np.searchsorted(cuts, np.arange(L), side="right")[None].repeat(b, 0), jnp.int32)
        packed = (q, k, v, segments)
        kernel = compiled(functools.partial(_packed_flash, scale=scale, interpret=interpret), *packed)
        ref = compiled(functools.partial(_packed_xla, scale=scale), *packed)
        err = rel_err(kernel(*packed), ref(*packed))
        t_k, t_r = time_pair(kernel, packed, ref, packed, repeats)
        out.append(row("attention_packed", shape + " 4 docs", t_k, t_r, err, flops, "TFLOP/s", peak_bf16,
                       "nemojax causal_attention (XLA, segment mask)"))
    return out


def _xla_decode(q, k, v, cache_k, cache_v, lengths, *, scale: float):
    return cached_attention(q[:, None], k[:, None], v[:, None], KVCache(cache_k, cache_v), lengths, scale)[:, 0]


def bench_decode_attention(quick: bool, interpret: bool, repeats: int, peak_bw: float | None,
                           sweep: bool = False) -> list[dict]:
    """One decode step's attention (GQA 32 / 8, d 128, batch 8) over a 32k cache filled to 4k and to 32k: the
    split-K kernel reads only the filled part; the XLA cached attention reads the whole cache. GB/s of the filled
    K and V bytes."""
    del sweep
    cases = [(2, 4, 2, 32, 64, (40, 64))] if quick else [(8, 32, 8, 128, 32768, (4096, 32768))]
    out = []
    for b, Hq, Hkv, d, S, fills in cases:
        ks = jax.random.split(jax.random.key(5), 5)
        q = jax.random.normal(ks[0], (b, Hq, d), jnp.bfloat16)
        k, v = (jax.random.normal(key, (b, Hkv, d), jnp.bfloat16) for key in ks[1:3])
        cache = KVCache(*(jax.random.normal(key, (b, Hkv, S, d), jnp.bfloat16) for key in ks[3:5]))
        kernel = compiled(functools.partial(decode_attention, scale=d ** -0.5, interpret=interpret), q, k, v,
                          cache.k, cache.v, jnp.zeros((b,), jnp.int32))
        ref = compiled(functools.partial(_xla_decode, scale=d ** -0.5), q, k, v, cache.k, cache.v,
                       jnp.zeros((b,), jnp.int32))
        for fill in fills:
            args = (q, k, v, cache.k, cache.v, jnp.full((b,), fill - 1, jnp.int32))
            err = rel_err(kernel(*args), ref(*args))
            t_k, t_r = time_pair(kernel, args, ref, args, repeats)
            out.append(row("decode_attention", f"b{b} Hq{Hq} Hkv{Hkv} d{d} cache {S} filled {fill}", t_k, t_r, err,
                           2 * b * Hkv * fill * d * 2, "GB/s", None if peak_bw is None else 1e3 * peak_bw,
                           "nemojax cached_attention (XLA, whole cache)"))
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
        "decode_attention": lambda: bench_decode_attention(args.quick, interpret, repeats, peak_bw, args.sweep),
    }
    rows: list[dict] = []
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every op, so a run cut short by a timeout keeps what it measured
        path.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                                        jax=jax.__version__, date=time.strftime("%Y-%m-%d"), quick=args.quick,
                                        sweep=args.sweep, rows=rows), indent=1))

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
            write()
            continue
        for r in new:
            if "error" in r:  # a sweep config that failed; printed when it failed
                continue
            peak = "" if r["of_peak"] is None else f"{100 * r['of_peak']:.0f}%"
            print(f"{r['op']:13} {r['shape']:56} {r['kernel_ms']:10.3f} {r['ref_ms']:9.3f} {r['speedup']:7.2f}x "
                  f"{r['rate']:9.1f} {r['unit']:>6} {peak:>8} {r['rel_err']:8.1e}  {r['baseline']}", flush=True)
        rows.extend(new)
        write()
        print(f"  ({op}: {time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
