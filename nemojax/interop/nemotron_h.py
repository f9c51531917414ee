"""The NemotronH family: `ModelConfig`, the `NemotronH` module and its checkpoint names (Hub spelling:
`backbone.layers.{i}.`, `mtp.layers.{j}.`, untied `lm_head.`; other spellings normalised by `checkpoint_name`)."""

from __future__ import annotations

from nemojax import families
from nemojax.config import ModelConfig
from nemojax.interop.naming import checkpoint_name
from nemojax.models.hybrid import NemotronH

FAMILY = families.register_family(families.Family(
    model_type="nemotron_h", config=ModelConfig, module=NemotronH,
    prefixes={"embeddings": "backbone.embeddings.", "norm_f": "backbone.norm_f.", "lm_head": "lm_head."},
    layer_prefixes={"layers": "backbone.layers.", "mtp": "mtp.layers."},
    linears=("lm_head", "eh_proj"), normalize_name=checkpoint_name,
))
