"""Hugging Face checkpoint folders, both directions: config.json + (sharded) safetensors <-> Model.

    model = load_hf("ckpt/")            # config.json, model.safetensors or model.safetensors.index.json + shards
    save_hf(model, "out/")              # Hub naming, one tensor per expert, each tensor in its param's dtype

The tensor naming and checks are `nemojax.interop.state_dict`'s; a folder in NVIDIA ModelOpt's quantized layout is
read by `nemojax.interop.modelopt`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nemojax.errors import CheckpointError
from nemojax.interop import modelopt
from nemojax.interop.safetensors_file import (
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_NAME,
    WEIGHTS_NAME,
    finish_interrupted_save,
    read_json,
    read_safetensors,
    save_folder,
    write_tensors,
)
from nemojax.interop.state_dict import config_from_hf, model_from_state_dict, state_dict_from_params, to_hf_state_dict
from nemojax.model import Model

# the one import a user of Hugging Face checkpoints needs
__all__ = ["CONFIG_NAME", "INDEX_NAME", "WEIGHTS_NAME", "CheckpointError", "config_from_hf", "load_hf",
           "model_from_state_dict", "save_hf", "state_dict_from_params", "to_hf_state_dict", "write_hf"]


def load_hf(directory: str | os.PathLike, *, strict: bool = False, **config_overrides: Any) -> Model:
    """Loads `config.json` and its safetensors weights. `config_overrides` (e.g. runtime={"dtype": "bfloat16"})
    go to `ModelConfig.from_hf`; weights are cast to the config's param dtype (router kernel and bias stay fp32),
    only between floating dtypes. A ModelOpt quantized checkpoint (`modelopt.is_quantized`: `nemojax quantize` /
    `qad` output, or NVIDIA's) is read by `modelopt.load_quantized`: a fake-quantized Model whose kernels are the
    dequantized weights.

    A save into `directory` that was killed after its commit point is completed first (`finish_interrupted_save`).
    Tensors holding NaN or inf are named in a warning, or with `strict=True` in a CheckpointError; bad JSON, a
    truncated shard or an integer tensor for a float param raise a CheckpointError naming the file or tensor.
    """
    directory = Path(directory)
    finish_interrupted_save(directory)
    hf_config = read_json(directory / CONFIG_NAME)
    if modelopt.is_quantized(directory, hf_config):
        return modelopt.load_quantized(directory, strict=strict, **config_overrides)
    config = config_from_hf(hf_config, **config_overrides)
    return model_from_state_dict(config, read_safetensors(directory), strict=strict)


def save_hf(model: Model, directory: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Writes `config.json` and safetensors (sharded with an index above `max_shard_bytes`) into `directory`.

    Only these files are written (other files of the folder, e.g. a tokenizer, stay) and own files of a previous
    save that this one lacks (old shards, an index, hf_quant_config.json) are removed. Files are staged inside
    `directory` and committed through a journal (`safetensors_file.save_folder`), so a save that fails or is
    killed at any point leaves the old or the new checkpoint loadable. Raises CheckpointError, before writing,
    for a `directory` that is a symlink, a regular file or a training workdir (run.json or checkpoints/ inside).
    """
    return save_folder(directory, lambda staging: write_hf(model, staging, max_shard_bytes))


def write_hf(model: Model, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes config.json and the safetensors of `model` into `folder` as they are, with no save protocol: the
    `fill` of `save_folder` for savers that add files of their own to a checkpoint (`nemojax.elastic.save`)."""
    hf_config = {**model.config.to_hf(), "torch_dtype": model.config.runtime.param_dtype}  # the tensors' dtype
    (folder / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2))
    write_tensors(folder, state_dict_from_params(model.config, model.params), max_shard_bytes)
