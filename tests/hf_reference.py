"""Builds the transformers reference (torch, CPU, float32) of a nemojax Model on the same weights."""

from __future__ import annotations

import math

import jax
import numpy as np
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

import nemojax
from nemojax.interop import hf as interop_hf


def hf_config(config: nemojax.ModelConfig) -> NemotronHConfig:
    hf = NemotronHConfig(**config.to_hf())
    hf._attn_implementation = "eager"
    return hf


def torch_state_dict(model: nemojax.Model) -> dict[str, torch.Tensor]:
    """The model's tensors in transformers-native naming: `model.` prefix, experts stacked [E, out, in]."""
    per_expert: dict[str, list[tuple[int, np.ndarray]]] = {}
    out = {}
    for name, tensor in interop_hf.to_hf_state_dict(model).items():
        if name.startswith("mtp."):
            continue  # transformers has no MTP head
        name = "model." + name[len("backbone."):] if name.startswith("backbone.") else name
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            stacked = ".".join(parts[:i + 1] + [parts[i + 2]])
            per_expert.setdefault(stacked, []).append((int(parts[i + 1]), tensor))
            continue
        out[name] = torch.from_numpy(np.asarray(tensor, np.float32).copy())
    for name, items in per_expert.items():
        out[name] = torch.from_numpy(np.stack([t for _, t in sorted(items, key=lambda x: x[0])]).astype(np.float32))
    return out


def neutralise_dt_floor(hf_model: NemotronHForCausalLM) -> None:
    """transformers' torch path clamps dt at time_step_min; the reference kernels clamp at time_step_limit
    = (0, inf) (docs/numerics.md 3). Put every mixer on the reference behaviour."""
    for layer in hf_model.model.layers:
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, math.inf)


def reference_model(model: nemojax.Model) -> NemotronHForCausalLM:
    """transformers NemotronHForCausalLM (float32, eval mode) holding `model`'s weights."""
    hf = NemotronHForCausalLM(hf_config(model.config)).float().eval()
    missing, unexpected = hf.load_state_dict(torch_state_dict(model), strict=False)
    if missing or unexpected:
        raise AssertionError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    neutralise_dt_floor(hf)
    return hf


def reference_logits(hf: NemotronHForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.float().numpy()


def perturbed(model: nemojax.Model, seed: int = 0, scale: float = 0.05) -> nemojax.Model:
    """Moves every weight away from its initial value (norm scales, A_log, D, dt_bias, biases included), so a
    parity test cannot pass by two implementations agreeing on an initialisation constant."""
    leaves, treedef = jax.tree.flatten_with_path(model.params)
    rng = np.random.default_rng(seed)
    new = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        x = np.asarray(leaf, np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if "A_log" in name:
            x = np.log(rng.uniform(0.5, 8.0, x.shape)).astype(np.float32)
        elif "dt_bias" in name:
            # down to softplus(-9) ~ 1e-4, below the 1e-3 dt floor of transformers' torch path (docs/numerics.md 3)
            x = rng.uniform(-9.0, 1.0, x.shape).astype(np.float32)
        elif "scale" in name or "'D'" in name:
            x = x + 0.2 * noise
        else:
            x = x + scale * noise
        new.append(jax.numpy.asarray(x, leaf.dtype))
    return model.replace(params=jax.tree.unflatten(treedef, new))

