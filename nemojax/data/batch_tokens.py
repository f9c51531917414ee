"""The token ids of one batch, for the methods that only read tokens (importance, calibration).

    tokens = batch_tokens(batch, "importance")    # -> np.ndarray [B, L] integer

One batch type runs through every method that takes data: the data pipeline's dict (`nemojax.data.make_dataset`
yields {"tokens", "targets", "loss_mask", "segment_ids", "positions"}, each [B, L]); distillation, QAD, QAT and
fine-tuning need its targets and loss mask, while forward-only methods read its "tokens". Those also take a bare
[B, L] integer token array (or nested lists), as calibration data usually is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ALLOWED = ("the data pipeline's dict batch (with 'tokens' [B, L], as nemojax.data.make_dataset yields) or a "
           "[B, L] array of integer tokens")


def batch_tokens(batch: Any, where: str) -> np.ndarray:
    """`batch`'s token ids as an integer array [B, L]. `where` names the caller in errors.

    Raises ValueError naming the batch's type (keys, shape, dtype) and what is allowed for anything else."""
    if isinstance(batch, Mapping):
        if "tokens" not in batch:
            raise ValueError(f"{where}: batch dict has keys {sorted(map(str, batch))}, no 'tokens'; allowed: "
                             f"{ALLOWED}")
        what, tokens = "batch['tokens']", batch["tokens"]
    elif isinstance(batch, str | bytes) or batch is None:
        raise ValueError(f"{where}: batch={batch!r:.40} is invalid; allowed: {ALLOWED}")
    else:
        what, tokens = "batch", batch
    try:
        tokens = np.asarray(tokens)
    except (TypeError, ValueError) as error:  # ragged nested lists, objects numpy cannot read
        raise ValueError(f"{where}: {what} of type {type(tokens).__name__} is not an array ({error}); allowed: "
                         f"{ALLOWED}") from error
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{where}: {what} of shape {list(tokens.shape)} and dtype {tokens.dtype} is invalid; "
                         f"allowed: {ALLOWED}")
    return tokens
