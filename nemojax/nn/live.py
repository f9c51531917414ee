"""What a masked (elastic) forward tells the modules it runs: the "elastic" variable collection.

`nemojax.elastic` runs the full-size params multiplied by prefix masks, so every shape stays static and one compiled
step serves every nested submodel. Multiplying params by zero makes the dead channels zero, which is all most layers
need; the few that look at a whole width read the live size here instead: an RMSNorm averages over its live channels
only, the Mamba gated norm over each group's live channels, the MoE router never picks a dead expert, and a block
scales its residual branch by its depth gate. Without the collection (every plain forward) nothing changes."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

COLLECTION = "elastic"


def live(module: nn.Module, name: str) -> Any:
    """The value `name` of the "elastic" collection in `module`'s scope, or None outside a masked forward."""
    return module.get_variable(COLLECTION, name) if module.has_variable(COLLECTION, name) else None
