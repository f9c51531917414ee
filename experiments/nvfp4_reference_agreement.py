"""Agreement of nemojax.quant.quantize (NVFP4) with the numpy TE-order oracle and the ModelOpt formula.

For each tensor category (nemojax.lowp.reference.CATEGORIES) a [rows, 1024] tensor of ~1M elements is quantized by
the JAX quantizer ("nvfp4" 1x16 and "nvfp4_2d" 16x16) and by the slow numpy oracles; the script prints the element
code, block scale and dequantized-value mismatch rates and writes runs/nvfp4_reference_agreement/results.json.

    .venv/bin/python experiments/nvfp4_reference_agreement.py [--rows 1024] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.lowp import reference as R
from nemojax.lowp.qarray import quantize


def jax_vs_te(x: np.ndarray, fmt: str) -> dict[str, float]:
    tile = (16, 16) if fmt == "nvfp4_2d" else (1, 16)
    ref = R.nvfp4_te(x, tile)
    q = jax.jit(lambda v: quantize(v, fmt))(jnp.asarray(x))
    codes = np.asarray(jax.lax.bitcast_convert_type(q.data, jnp.uint4).astype(jnp.uint8))
    s_dec = np.float32(0.0) if ref["s_dec"] < np.finfo(np.float32).tiny else ref["s_dec"]  # XLA:CPU flushes
    xhat_ref = ref["xhat"] if s_dec else np.zeros_like(ref["xhat"])
    return {
        "element_mismatch_rate": float(np.mean(R.e2m1_values(codes) != R.e2m1_values(ref["codes"]))),
        "scale_mismatch_rate": float(np.mean(np.asarray(q.scale.astype(jnp.float32)) != ref["scale"])),
        "global_scale_equal": bool(float(q.global_scale) == s_dec),
        "xhat_mismatch_rate": float(np.mean(np.asarray(q.dequantize()) != xhat_ref)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/nvfp4_reference_agreement/results.json")
    args = ap.parse_args()
    shape = (args.rows, args.cols)
    results = {"shape": list(shape), "seed": args.seed, "categories": {}}
    head = f"{'category':16s} {'TE 1x16 elem':>12s} {'TE 16x16 elem':>13s} {'TE scale':>9s} " \
           f"{'MO elem':>9s} {'MO scale ulp':>12s} {'MO xhat':>9s} {'flushed':>8s}"
    print(head)
    for cat in R.CATEGORIES:
        x = R.make_tensor(cat, shape, seed=args.seed)
        te1 = jax_vs_te(x, "nvfp4")
        te2 = jax_vs_te(x, "nvfp4_2d")
        mo = R.modelopt_vs_te(x)
        results["categories"][cat] = {"te_order_1d": te1, "te_order_2d": te2, "modelopt_vs_te": mo}
        print(f"{cat:16s} {te1['element_mismatch_rate']:12.2e} {te2['element_mismatch_rate']:13.2e} "
              f"{max(te1['scale_mismatch_rate'], te2['scale_mismatch_rate']):9.2e} {mo['code_mismatch_rate']:9.2e} "
              f"{mo['scale_max_ulp']:12d} {mo['xhat_mismatch_rate']:9.2e} {mo['flushed_block_rate']:8.3f}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
