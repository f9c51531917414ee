"""The package's own exception types, in the lowest module so that every floor (interop, train, quant, ...) can
raise and catch the same classes."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason: a Hugging Face or quantized checkpoint whose tensors do
    not match the config (`nemojax.interop.hf`), or a training workdir that cannot be resumed from
    (`nemojax.train.checkpoint`). A ValueError, since it is bad input to the call that reads it."""
