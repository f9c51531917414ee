"""Slow numpy oracles for the NVFP4 / MX quantizers (numpy + ml_dtypes only; tests and experiments, not training).

Independent of the JAX code: float32 numpy arithmetic in the op order of the source being mirrored, the E2M1
rounding from TE's explicit threshold table (not a dtype cast), the E4M3 cast from ml_dtypes after a clip, and the
E8M0 round-up exponent from the fp32 bits. numpy does not flush subnormals; XLA:CPU does, so results can differ
only where an fp32 intermediate is subnormal (amax below ~1e-35), which the tests avoid.

- `nvfp4_te`: TransformerEngine's reference_nvfp4.py order (docs/formats.md 4, steps 1-6; 1x16 or 16x16 tiles).
- `nvfp4_modelopt`: ModelOpt's NVFP4QTensor formula (g = A/2688, d_b = e4m3(a_b/(6 g)), zero scales -> 1).
- `e8m0_code`: NVIDIA round-up E8M0 exponent (docs/formats.md 3).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], F32)


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """f32 [...] (already clipped to +-6 or not) -> uint8 E2M1 codes [...] by TE's threshold table (RNE, saturating).

    Magnitude thresholds: <=0.25 -> 0, <0.75 -> 0.5, <=1.25 -> 1, <1.75 -> 1.5, <=2.5 -> 2, <3.5 -> 3, <=5 -> 4,
    else 6; the sign bit (code + 8) is set for negative values including -0.
    """
    v = np.asarray(v, F32)
    a = np.abs(v)
    mag = np.full(a.shape, 7, np.uint8)
    for code, hi, inclusive in [(0, 0.25, True), (1, 0.75, False), (2, 1.25, True), (3, 1.75, False),
                                (4, 2.5, True), (5, 3.5, False), (6, 5.0, True)][::-1]:
        sel = a <= hi if inclusive else a < hi
        mag = np.where(sel, np.uint8(code), mag)
    return np.where(np.signbit(v), mag + 8, mag).astype(np.uint8)


def e2m1_values(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [...] -> f32 values [...]."""
    return E2M1_VALUES[np.asarray(codes, np.int64)]


def e4m3(x: np.ndarray) -> np.ndarray:
    """f32 [...] -> f32 values of the RNE float8_e4m3fn cast after clipping to +-448 (ml_dtypes)."""
    return np.clip(np.asarray(x, F32), -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(F32)


def e8m0_code(amax: np.ndarray, elem_max: float) -> np.ndarray:
    """Round-up E8M0 code [...] (int32) of the block scale for amax [...] (NVIDIA rule on the bits of amax/elem_max)."""
    with np.errstate(all="ignore"):
        r = np.asarray(amax, F32) / F32(elem_max)
    bits = r.view(np.uint32)
    e = ((bits >> 23) & 0xFF).astype(np.int32)
    m = bits & 0x7FFFFF
    up = np.where(e == 0, m > 0x400000, (m != 0) & (e < 254))
    return (e + up.astype(np.int32)).astype(np.int32)


def _blocks(x: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """[m, n] -> [m/ty, n/tx, ty*tx] blocks."""
    ty, tx = tile
    m, n = x.shape
    if m % ty or n % tx:
        raise ValueError(f"x.shape={x.shape}; allowed: divisible by the tile {tile}")
    return x.reshape(m // ty, ty, n // tx, tx).transpose(0, 2, 1, 3).reshape(m // ty, n // tx, ty * tx)


def _unblocks(b: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    ty, tx = tile
    mb, nb, _ = b.shape
    return b.reshape(mb, nb, ty, tx).transpose(0, 2, 1, 3).reshape(mb * ty, nb * tx)


def nvfp4_te(x: np.ndarray, tile: tuple[int, int] = (1, 16), amax: float | None = None) -> dict[str, np.ndarray]:
    """TE-order NVFP4 of x f32 [m, n] with (1,16) or (16,16) tiles.

    Returns codes uint8 [m, n], scale f32 [m/ty, n/tx] (E4M3 values), s_enc, s_dec f32 (), xhat f32 [m, n].
    """
    x = np.asarray(x, F32)
    with np.errstate(all="ignore"):
        A = F32(np.max(np.abs(x), initial=0.0)) if amax is None else F32(amax)
        s_enc = np.minimum(F32(448.0) * F32(6.0) / A, FLT_MAX).astype(F32)
        if s_enc == 0:
            s_enc = F32(1.0)
        s_dec = F32(F32(1.0) / s_enc)
        mult = F32(s_enc * np.reciprocal(F32(6.0)))  # TE folds 1/6 into the global multiplier
        xb = _blocks(x, tile)
        a_b = np.max(np.abs(xb), axis=-1, keepdims=True)
        d = e4m3(np.minimum(a_b * mult, FLT_MAX))
        e = np.minimum(F32(1.0) / (d * s_dec), FLT_MAX).astype(F32)
        v = np.clip(xb * e, F32(-6.0), F32(6.0)).astype(F32)
        codes = e2m1_codes(v)
        xhat = ((e2m1_values(codes) * d) * s_dec).astype(F32)
    return {"codes": _unblocks(codes, tile), "scale": d[..., 0], "s_enc": s_enc, "s_dec": s_dec,
            "xhat": _unblocks(xhat, tile)}


def nvfp4_modelopt(x: np.ndarray, amax: float | None = None) -> dict[str, np.ndarray]:
    """ModelOpt-formula NVFP4 of x f32 [m, n] (1x16 blocks).

    g = A / (6*448); d_b = e4m3(a_b / (6 g)), zero d_b -> 1; q = e2m1(x / (d_b g)); xhat = q d_b g.
    Returns codes uint8 [m, n], scale f32 [m, n/16], g f32 (), xhat f32 [m, n]. An all-zero tensor gives zeros.
    """
    x = np.asarray(x, F32)
    A = F32(np.max(np.abs(x), initial=0.0)) if amax is None else F32(amax)
    g = F32(A / F32(6.0 * 448.0))
    xb = _blocks(x, (1, 16))
    with np.errstate(all="ignore"):
        a_b = np.max(np.abs(xb), axis=-1, keepdims=True)
        d = e4m3(a_b / (F32(6.0) * g)) if g > 0 else np.zeros_like(a_b)
        d = np.where(d == 0, F32(1.0), d).astype(F32)
        denom = (d * g).astype(F32)
        v = np.where(denom > 0, xb / np.where(denom > 0, denom, F32(1.0)), F32(0.0)).astype(F32)
        codes = e2m1_codes(np.clip(v, -6, 6))
        xhat = ((e2m1_values(codes) * d) * g).astype(F32)
    return {"codes": _unblocks(codes, (1, 16)), "scale": d[..., 0], "g": g, "xhat": _unblocks(xhat, (1, 16))}


def mx_reference(x: np.ndarray, elem_max: float, elem_dtype) -> dict[str, np.ndarray]:
    """MX quantization of x f32 [m, n] (n % 32 == 0): round-up E8M0 code [m, n/32], xhat f32 [m, n].

    elem_dtype: ml_dtypes.float8_e4m3fn (MXFP8) or "e2m1" (MXFP4, threshold table).
    """
    x = np.asarray(x, F32)
    xb = _blocks(x, (1, 32)).astype(np.float64)
    code = e8m0_code(np.max(np.abs(xb), axis=-1, keepdims=True).astype(F32), elem_max)
    scale = np.ldexp(1.0, code - 127)
    v = np.clip(xb / scale, -elem_max, elem_max).astype(F32)  # exact: division by a power of two
    q = e2m1_values(e2m1_codes(v)) if elem_dtype == "e2m1" else v.astype(elem_dtype).astype(F32)
    return {"code": code[..., 0], "xhat": _unblocks((q * scale).astype(F32), (1, 32))}


# ------------------------------------------------------------------------------------------ comparison helpers

CATEGORIES = ("normal", "student_t", "lognormal", "all_equal", "single_spike", "denormal_range", "mixed_rows",
              "tiny", "all_zero")


def make_tensor(category: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Test tensor f32 [m, n] of one of CATEGORIES.

    denormal_range: blocks whose scales land in the E4M3 subnormal range (a_b ~ 1e-6..1e-3 of the tensor amax)
    plus one large element; mixed_rows: rows scaled by 10^U(-8, 3); tiny: amax ~1e-30 (fp32-normal throughout).
    """
    rng = np.random.default_rng(seed)
    m, n = shape
    if category == "normal":
        x = rng.standard_normal(shape)
    elif category == "student_t":
        x = rng.standard_t(2, shape)
    elif category == "lognormal":
        x = rng.lognormal(0.0, 3.0, shape) * rng.choice([-1.0, 1.0], shape)
    elif category == "all_equal":
        x = np.full(shape, 0.7)
    elif category == "single_spike":
        x = rng.standard_normal(shape) * 1e-3
        x[rng.integers(m), rng.integers(n)] = 1e3
    elif category == "denormal_range":
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-6, -3, (m, n // 16)).repeat(16, 1)
        x[0, 0] = 1.0
    elif category == "mixed_rows":
        x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-8, 3, (m, 1))
    elif category == "tiny":
        x = rng.standard_normal(shape) * 1e-30
    elif category == "all_zero":
        x = np.zeros(shape)
    else:
        raise ValueError(f"category={category!r}; allowed: {CATEGORIES}")
    return x.astype(F32)


def e4m3_ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|code(a) - code(b)| for non-negative E4M3 values a, b (f32 arrays of equal shape), as int [...]."""
    ca = np.asarray(a, F32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int32)
    cb = np.asarray(b, F32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8).astype(np.int32)
    return np.abs(ca - cb)


def modelopt_vs_te(x: np.ndarray) -> dict[str, float]:
    """Compare the ModelOpt formula with the TE order on x f32 [m, n] (1x16 blocks).

    Blocks that TE flushes (d_b = 0) are left out: ModelOpt sets their scale to 1 by design. Returns the fraction
    of such flushed blocks, the max E4M3 ulp distance of the other block scales, and the element-code and
    dequantized-value mismatch rates over the other blocks.
    """
    te, mo = nvfp4_te(x), nvfp4_modelopt(x)
    live_b = te["scale"] > 0
    live = np.repeat(live_b, 16, axis=-1)
    n_live = max(int(live.sum()), 1)
    return {
        "flushed_block_rate": float(1 - live_b.mean()),
        "scale_max_ulp": int(e4m3_ulp_distance(te["scale"][live_b], mo["scale"][live_b]).max(initial=0)),
        "scale_mismatch_rate": float(np.mean(te["scale"][live_b] != mo["scale"][live_b])) if live_b.any() else 0.0,
        "code_mismatch_rate": float(np.sum((te["codes"] != mo["codes"]) & live) / n_live),
        "xhat_mismatch_rate": float(np.sum((te["xhat"] != mo["xhat"]) & live) / n_live),
    }
