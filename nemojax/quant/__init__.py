"""Model -> Model quantization: named recipes, apply, PTQ calibration, QAT / QAD and NVIDIA-layout export.

    student = quant.apply(model, "nvfp4")                  # a Model whose linear layers fake-quantize
    student = quant.calibrate(student, batches)            # PTQ: calibrated amaxes ("max" or "mse")
    student, history = quant.qad(student, model, data, steps=200)
    quant.save_quantized(student, "out/")                  # NVIDIA's (ModelOpt) checkpoint layout
    quant.weight_bytes(student)                            # the weights' stored size

The number formats themselves (quantize, fake_quant, the quantized matmul, the recipe types) live in
`nemojax.lowp`, below the model's layers; they are re-exported here so `quant.quantize(x, "nvfp4")` keeps working.
`quant.recipes` (and `quant.named_recipes`) is the catalogue of named recipes (`nemojax.lowp.named_recipes`).
"""

from __future__ import annotations

from nemojax.interop.modelopt import load_quantized, quant_config, save_quantized
from nemojax.lowp import (
    FORMATS,
    DelayedScaling,
    FP8State,
    LinearQuant,
    QArray,
    QuantRecipe,
    TensorQuant,
    block_scale_shape,
    current_scaling,
    dequantize,
    fake_matmul,
    fake_quant,
    inverse_rht,
    named_recipes,
    pack_fp4,
    quantize,
    quantized_matmul,
    rht,
    unpack_fp4,
)
from nemojax.lowp import named_recipes as recipes  # the name this catalogue had before; public API
from nemojax.lowp.matmul import matmul
from nemojax.quant.aware import QADConfig, qad, qat
from nemojax.quant.calibration import activation_amaxes, calibrate
from nemojax.quant.mse import mse_amax, nvfp4_mse_block_scales
from nemojax.quant.storage import weight_bytes
from nemojax.quant.transform import apply, quantized_layers, strip

__all__ = [
    "FORMATS", "DelayedScaling", "FP8State", "LinearQuant", "QADConfig", "QArray", "QuantRecipe", "TensorQuant",
    "activation_amaxes", "apply", "block_scale_shape", "calibrate", "current_scaling", "dequantize", "fake_matmul",
    "fake_quant", "inverse_rht", "load_quantized", "matmul", "mse_amax", "named_recipes", "nvfp4_mse_block_scales",
    "pack_fp4", "qad", "qat", "quant_config", "quantize", "quantized_layers", "quantized_matmul", "recipes", "rht",
    "save_quantized", "strip", "unpack_fp4", "weight_bytes",
]
