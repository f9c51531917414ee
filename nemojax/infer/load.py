"""Load a model and its tokenizer for inference from either kind of checkpoint folder.

    model, tokenizer = load_checkpoint("path/to/hf_checkpoint")     # config.json + safetensors (+ tokenizer.json)
    model, tokenizer = load_checkpoint("runs/tiny")                 # a `nemojax train` workdir (run.json + orbax)

A training workdir holds `run.json` ({"model": the architecture, `dataclasses.asdict(ModelConfig)` without its
runtime, "param_dtype", "quant": the training recipe or null, "seq_len", "data": {..., "tokenizer": "byte" or a
path}}) and orbax checkpoints of the TrainState under `checkpoints/<step>/state`. Only the `params` subtree of the
newest (or the given) step is read; the optimizer state is never loaded. The compute dtype is an inference choice
(default float32, right for CPUs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, MTPConfig, Runtime
from nemojax.data.tokenizers import Tokenizer, load_tokenizer
from nemojax.lowp.recipe import QuantRecipe
from nemojax.model import Model
from nemojax.train.checkpoint import RUN_FILE, read_run

HF_CONFIG = "config.json"
HF_TOKENIZER = "tokenizer.json"
CHECKPOINT_DIR = "checkpoints"  # orbax CheckpointManager root inside a workdir
STATE_ITEM = "state"  # the TrainState item of each step

_SUB_CONFIGS = {"mamba": MambaConfig, "attention": AttentionConfig, "moe": MoEConfig, "mtp": MTPConfig}


def _fields(cls: type, d: Any, where: str) -> dict[str, Any]:
    """`d` as a dict of `cls`'s fields; ValueError naming `where` for anything else."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}={d!r} is invalid: must be a dict of {cls.__name__} fields")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; {cls.__name__} has {sorted(names)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in d]
    if missing:
        raise ValueError(f"{where} lacks the required fields {missing} of {cls.__name__}")
    return dict(d)


def model_config_from_dict(d: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The inverse of `dataclasses.asdict(config)` (also after a JSON round trip): sub-config dicts become their
    dataclasses, lists become tuples. Fields missing from `d` (the runtime, which run.json keeps apart) take their
    defaults; `overrides` replace any field. Unknown fields raise ValueError naming them."""
    fields = _fields(ModelConfig, d, "model")
    runtime = fields.get("runtime")
    if isinstance(runtime, Mapping):
        runtime = _fields(Runtime, runtime, "model.runtime")
        if isinstance(runtime.get("quant"), Mapping):
            runtime["quant"] = QuantRecipe.from_dict(runtime["quant"])
        fields["runtime"] = Runtime(**runtime)
    for name, cls in _SUB_CONFIGS.items():
        sub = fields.get(name)
        if sub is None or isinstance(sub, cls):
            continue
        sub = _fields(cls, sub, f"model.{name}")
        if name == "mamba" and "time_step_limit" in sub:
            # json writes inf as Infinity (read back by json.loads); accept the string spellings too
            sub["time_step_limit"] = tuple(math.inf if str(v).lower() in ("inf", "infinity") else float(v)
                                           for v in sub["time_step_limit"])
        fields[name] = cls(**sub)
    fields.update(overrides)
    return ModelConfig(**fields)


def _newest_step(workdir: Path, step: int | None) -> Path:
    root = workdir / CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and (p / STATE_ITEM).is_dir()) \
        if root.is_dir() else []
    if not steps:
        raise ValueError(f"{workdir}: no checkpoint under {root} (no <step>/{STATE_ITEM} folder); train first")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"step={step} is not saved in {root}; it has steps {steps}")
    return root / str(step) / STATE_ITEM


def restore_params(workdir: str | Path, config: ModelConfig, step: int | None = None) -> dict:
    """The params of a workdir's newest (or the given) TrainState checkpoint, as arrays on the default device,
    laid out like `abstract_params(config)`. Raises ValueError naming the folder when they cannot be read."""
    import jax
    import orbax.checkpoint as ocp

    from nemojax.model import abstract_params

    path = _newest_step(Path(workdir).absolute(), step)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                                     abstract_params(config))}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    try:
        restored = ocp.PyTreeCheckpointer().restore(path, args=args)
    except Exception as error:  # orbax raises many types for a tree that does not fit; say where and why
        raise ValueError(f"{path}: cannot restore the params of the model in run.json "
                         f"({type(error).__name__}: {error})") from error
    params = restored["params"]
    if jax.tree.structure(params) != jax.tree.structure(target["params"]):
        raise ValueError(f"{path}: the saved params do not have the structure of the model in run.json")
    return params


def _workdir_tokenizer(workdir: Path, run: Mapping[str, Any]) -> Tokenizer:
    spec = run.get("data", {}).get("tokenizer") if isinstance(run.get("data"), Mapping) else None
    if spec is None:
        raise ValueError(f"{workdir / RUN_FILE} has no data.tokenizer; pass a tokenizer ('byte' or a path)")
    if spec == "byte":
        return load_tokenizer("byte")
    for candidate in (Path(spec), workdir / spec):
        if candidate.exists():
            return load_tokenizer(candidate)
    raise ValueError(f"{workdir / RUN_FILE}: data.tokenizer={spec!r} is not found (tried it as given and relative "
                     f"to {workdir}); pass a tokenizer ('byte' or a path)")


def load_checkpoint(path: str | Path, *, tokenizer: str | Path | None = None, dtype: str = "float32",
                    step: int | None = None) -> tuple[Model, Tokenizer]:
    """(model, tokenizer) of a Hugging Face checkpoint folder or a `nemojax train` workdir.

    path: a folder with config.json (`nemojax.load_hf`; the tokenizer is its tokenizer.json) or with run.json (the
      newest checkpoint's params, or `step`'s; the tokenizer is run.json's data.tokenizer).
    tokenizer: "byte" or a tokenizer.json path (or its folder), used instead of the checkpoint's own.
    dtype: the compute dtype of the loaded model ("float32", "bfloat16", "float16").
    Raises ValueError naming the folder and what it lacks.
    """
    from nemojax.interop.hf import load_hf

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is not a folder")
    if (folder / HF_CONFIG).is_file():
        if step is not None:
            raise ValueError(f"step={step} applies to training workdirs; {folder} is a Hugging Face checkpoint")
        try:
            model = load_hf(folder, runtime={"dtype": dtype})
        except FileNotFoundError as error:
            raise ValueError(f"{folder}: {error}") from error
        if tokenizer is None:
            if not (folder / HF_TOKENIZER).is_file():
                raise ValueError(f"{folder} has no {HF_TOKENIZER}; pass a tokenizer ('byte' or a tokenizer.json path)")
            tokenizer = folder
    elif (folder / RUN_FILE).is_file():
        run = read_run(folder / RUN_FILE)
        if not isinstance(run.get("model"), Mapping):
            raise ValueError(f"{folder / RUN_FILE} has no model config (the 'model' entry)")
        quant = run.get("quant")
        runtime = Runtime(dtype=dtype, param_dtype=run.get("param_dtype", "float32"),
                          quant=QuantRecipe.from_dict(quant) if isinstance(quant, Mapping) else None)
        config = model_config_from_dict(run["model"], runtime=runtime)
        model = Model(config, restore_params(folder, config, step))
        if tokenizer is None:
            return model, _workdir_tokenizer(folder.absolute(), run)
    else:
        raise ValueError(f"checkpoint {str(path)!r} is neither a Hugging Face checkpoint (no {HF_CONFIG}) nor a "
                         f"training workdir (no {RUN_FILE})")
    return model, load_tokenizer(tokenizer)
