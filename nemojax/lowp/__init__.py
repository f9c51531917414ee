"""Number formats below everything else: FP8 / NVFP4 / MX codes and scales, fake quantization with straight-through
gradients, the quantized / fake-quantized matmul a linear layer runs, the random Hadamard transform and the per-linear
recipe types (`QuantRecipe`, `LinearQuant`, `TensorQuant`) that `ModelConfig.runtime.quant` carries.

    q = lowp.quantize(x, "nvfp4")             # QArray: E2M1 codes, E4M3 block scales, FP32 global scale
    y = lowp.matmul.matmul(x, w, spec)        # x: [..., K] @ w: [K, N] in the formats of a LinearQuant

JAX (and numpy / ml_dtypes) only: nothing here imports the rest of nemojax, so `nemojax.config` and `nemojax.nn`
can use it. Transforms over whole models (apply a named recipe, calibrate, QAT / QAD, export) are `nemojax.quant`.
(`nemojax.lowp.matmul` is the module; its function `matmul` is not re-exported here so the name stays the
module's.)
"""

from nemojax.lowp.fake import fake_quant
from nemojax.lowp.formats import FORMATS
from nemojax.lowp.fp8 import DelayedScaling, FP8State, current_scaling
from nemojax.lowp.hadamard import inverse_rht, rht
from nemojax.lowp.matmul import fake_matmul, quantized_matmul
from nemojax.lowp.qarray import QArray, block_scale_shape, dequantize, pack_fp4, quantize, unpack_fp4
from nemojax.lowp.recipe import LinearQuant, QuantRecipe, TensorQuant

__all__ = ["FORMATS", "DelayedScaling", "FP8State", "LinearQuant", "QArray", "QuantRecipe", "TensorQuant",
           "block_scale_shape", "current_scaling", "dequantize", "fake_matmul", "fake_quant", "inverse_rht",
           "pack_fp4", "quantize", "quantized_matmul", "rht", "unpack_fp4"]
