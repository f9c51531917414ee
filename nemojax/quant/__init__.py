"""Low precision: FP8 / NVFP4 / MX formats, fake quantization, PTQ, QAT, QAD and the FP8 / NVFP4 training recipes.

    q = quant.quantize(x, "nvfp4")                        # QArray: E2M1 codes, E4M3 block scales, FP32 global scale
    x_hat = q.dequantize()
    student = quant.apply(model, "nvfp4")                  # a Model whose linear layers fake-quantize
    student = quant.calibrate(student, batches)            # PTQ: calibrated amaxes ("max" or "mse")
    student, history = quant.qad(student, model, data, steps=200)
    quant.save_quantized(student, "out/")                  # NVIDIA's (ModelOpt) checkpoint layout

The number formats and recipes depend on JAX alone (the model's layers use them); the transforms over `Model`
values load lazily, so `nemojax.nn` can import this package without a cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

from nemojax.quant import recipes
from nemojax.quant.recipe import LinearQuant, QuantRecipe, TensorQuant

_LAZY = {
    # numerics (JAX only)
    "FORMATS": "formats", "QArray": "qarray", "quantize": "qarray", "dequantize": "qarray",
    "pack_fp4": "qarray", "unpack_fp4": "qarray", "block_scale_shape": "qarray", "fake_quant": "fake",
    "rht": "hadamard", "inverse_rht": "hadamard", "DelayedScaling": "fp8", "FP8State": "fp8",
    "current_scaling": "fp8", "mse_amax": "mse", "nvfp4_mse_block_scales": "mse", "matmul": "training",
    "fake_matmul": "training", "quantized_matmul": "training",
    # transforms over Model values
    "apply": "transform", "strip": "transform", "quantized_layers": "transform", "calibrate": "calibration",
    "activation_amaxes": "calibration", "qad": "aware", "qat": "aware", "QADConfig": "aware",
    "save_quantized": "export", "load_quantized": "export", "quant_config": "export",
}

__all__ = ["LinearQuant", "QuantRecipe", "TensorQuant", "recipes", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nemojax.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nemojax.quant.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
