"""How many bytes a model's weights take once saved: the figure a quantization recipe is chosen to shrink."""

from __future__ import annotations

from flax.traverse_util import flatten_dict

from nemojax.lowp.recipe import NOT_LINEAR
from nemojax.model import Model

# stored bits per element, the block scales included (NVFP4: one FP8 scale per 16 values; MXFP8: one E8M0 per 32)
BITS = {"nvfp4": 4.5, "nvfp4_2d": 4.5, "fp8_e4m3": 8.0, "fp8_e5m2": 8.0, "mxfp8": 8.25, "mxfp4": 4.25}


def weight_bytes(model: Model) -> int:
    """Bytes of the model's weights as stored: packed low-precision weights + their scales for the linear layers its
    recipe quantizes (`BITS`), bfloat16 for everything else; calibration amaxes are not counted."""
    recipe, total = model.config.runtime.quant, 0.0
    for path, leaf in flatten_dict(model.params).items():
        name = path[-1]
        if name.endswith(("_amax", "_block_scale")):
            continue
        layer = "/".join(path[:-1]) if name == "kernel" else "/".join(path)
        spec = recipe.linear(layer, model.config.pattern) if recipe is not None and (
            name == "kernel" or path[-2] == "experts") and path[-2] not in NOT_LINEAR else None
        per = BITS[spec.weight.fmt] if spec is not None and spec.weight is not None else 16.0
        total += leaf.size * per / 8
    return int(total)
