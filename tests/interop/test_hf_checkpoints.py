"""Checkpoint interop: save_hf / load_hf round trips, transformers loading our files and we loading theirs, and
the errors a checkpoint that does not fit its config must raise."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import NemotronHForCausalLM

import nemojax
from nemojax.interop import hf, safetensors_file
from tests.hf_reference import neutralise_dt_floor, perturbed, reference_logits, reference_model
from tests.interop.test_hf_parity import CASES, RTOL

TOKENS = np.random.default_rng(0).integers(0, 300, (2, 21))


def _same_params(a: nemojax.Model, b: nemojax.Model) -> bool:
    la, lb = jax.tree.leaves_with_path(a.params), jax.tree.leaves_with_path(b.params)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        x.dtype == y.dtype and bool(jnp.array_equal(x, y)) for (_, x), (_, y) in zip(la, lb, strict=True))


@pytest.fixture(scope="module")
def latent_model() -> nemojax.Model:
    return perturbed(nemojax.Model.init(CASES["latent_moe"], 0), seed=4)


def test_load_of_save_is_exact(tmp_path, latent_model):
    """load_hf(save_hf(m)) gives back the same config and bit-identical params."""
    nemojax.save_hf(latent_model, tmp_path / "ckpt")
    loaded = nemojax.load_hf(tmp_path / "ckpt")
    # The MoE dispatch is a run-time choice, not part of the checkpoint: it comes back as "auto".
    assert loaded.config == latent_model.config.replace(runtime={"moe_impl": "auto"})
    assert _same_params(loaded, latent_model)


def test_bfloat16_round_trip_keeps_router_in_float32(tmp_path):
    """A bf16 model saves bf16 tensors except the router (fp32, docs/numerics.md 8) and reloads exactly."""
    config = CASES["latent_moe"].replace(runtime={"dtype": "bfloat16", "param_dtype": "bfloat16"})
    model = perturbed(nemojax.Model.init(config, 0), seed=5)
    nemojax.save_hf(model, tmp_path / "bf16")
    from safetensors import safe_open

    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="flax") as f:
        dtypes = {name: f.get_tensor(name).dtype for name in f.keys()}
    assert dtypes["backbone.layers.1.mixer.gate.e_score_correction_bias"] == jnp.float32
    assert dtypes["backbone.layers.0.mixer.in_proj.weight"] == jnp.bfloat16
    loaded = nemojax.load_hf(tmp_path / "bf16", runtime={"dtype": "bfloat16", "param_dtype": "bfloat16"})
    assert _same_params(loaded, model)


def test_transformers_loads_save_hf_output(tmp_path, latent_model):
    """transformers' from_pretrained reads our directory (config.json + safetensors) and gives our logits."""
    nemojax.save_hf(latent_model, tmp_path / "ckpt")
    theirs = NemotronHForCausalLM.from_pretrained(tmp_path / "ckpt", attn_implementation="eager").float().eval()
    neutralise_dt_floor(theirs)
    from_state_dict = reference_logits(reference_model(latent_model), TOKENS)
    from_files = reference_logits(theirs, TOKENS)
    np.testing.assert_array_equal(from_files, from_state_dict)
    ours = np.asarray(latent_model(TOKENS))
    assert np.max(np.abs(ours - from_files)) / np.max(np.abs(from_files)) < RTOL


def test_load_hf_reads_transformers_save_pretrained(tmp_path, latent_model):
    """A directory written by transformers' save_pretrained loads into the identical params."""
    reference_model(latent_model).save_pretrained(tmp_path / "theirs")
    loaded = nemojax.load_hf(tmp_path / "theirs")
    assert _same_params(loaded, latent_model)


def test_sharded_save_writes_an_index(tmp_path, latent_model):
    """Small max_shard_bytes splits the weights over several files listed in model.safetensors.index.json."""
    nemojax.save_hf(latent_model, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / hf.INDEX_NAME).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((tmp_path / "sharded" / f).exists() for f in files)
    assert not (tmp_path / "sharded" / hf.WEIGHTS_NAME).exists()
    assert _same_params(nemojax.load_hf(tmp_path / "sharded"), latent_model)


def test_native_names_and_stacked_experts(latent_model):
    """`model.`-prefixed names with stacked [E, out, in] experts, and a `language_model.` prefix, load the same."""
    state = hf.to_hf_state_dict(latent_model)
    native = {}
    for name, tensor in state.items():
        native[name.replace("backbone.", "model.", 1)] = tensor
    for layer in (1, 4):
        for proj in ("up_proj", "down_proj"):
            stem = f"model.layers.{layer}.mixer.experts"
            experts = [native.pop(f"{stem}.{e}.{proj}.weight") for e in range(6)]
            native[f"{stem}.{proj}"] = torch.from_numpy(np.stack(experts))
    assert _same_params(hf.model_from_state_dict(latent_model.config, native), latent_model)
    prefixed = {"language_model." + k: v for k, v in state.items()}
    prefixed["language_model.backbone.embedding.weight"] = prefixed.pop("language_model.backbone.embeddings.weight")
    assert _same_params(hf.model_from_state_dict(latent_model.config, prefixed), latent_model)


@pytest.mark.parametrize("fault, message", [
    ("missing", "missing tensors: backbone.layers.2.mixer.A_log"),
    ("extra", "unexpected tensors: backbone.layers.9.mixer.D"),
    ("shape", "tensor backbone.layers.3.mixer.q_proj.weight has shape [96, 63], expected [96, 64]"),
])
def test_mismatched_checkpoint_names_the_tensor(latent_model, fault, message):
    """Missing, unexpected and mis-shaped tensors fail with a CheckpointError naming each one."""
    state = hf.to_hf_state_dict(latent_model)
    if fault == "missing":
        del state["backbone.layers.2.mixer.A_log"]
    elif fault == "extra":
        state["backbone.layers.9.mixer.D"] = np.zeros(8, np.float32)
    else:
        state["backbone.layers.3.mixer.q_proj.weight"] = np.zeros((96, 63), np.float32)
    with pytest.raises(nemojax.CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        hf.model_from_state_dict(latent_model.config, state)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, latent_model, monkeypatch):
    """A save that dies part-way leaves the earlier checkpoint readable and unchanged, with no debris."""
    target = tmp_path / "ckpt"
    nemojax.save_hf(latent_model, target)
    before = sorted(p.name for p in target.iterdir())

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_file, "save_file", broken_save)
    other = perturbed(latent_model, seed=9)
    with pytest.raises(OSError, match="disk full"):
        nemojax.save_hf(other, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert _same_params(nemojax.load_hf(target), latent_model)


def test_mtp_tensors_are_optional():
    """A Super-style model keeps its MTP head through a round trip; without mtp.* tensors it loads without one,
    and a config without MTP ignores them."""
    config = nemojax.presets.get("nemotron-3-super-120b-a12b-tiny")
    model = perturbed(nemojax.Model.init(config, 0), seed=6)
    state = hf.to_hf_state_dict(model)
    assert "mtp.layers.0.eh_proj.weight" in state and "mtp.layers.1.final_layernorm.weight" in state
    assert _same_params(hf.model_from_state_dict(config, state), model)
    trunk = hf.model_from_state_dict(config, {k: v for k, v in state.items() if not k.startswith("mtp.")})
    assert trunk.config.mtp is None and "mtp" not in trunk.params
    np.testing.assert_array_equal(np.asarray(trunk(TOKENS % 512)), np.asarray(model(TOKENS % 512)))
    no_mtp = hf.model_from_state_dict(config.replace(mtp=None), state)
    assert _same_params(no_mtp, trunk)
    partial = {k: v for k, v in state.items() if k != "mtp.layers.0.eh_proj.weight"}
    with pytest.raises(nemojax.CheckpointError, match="mtp.layers.0.eh_proj.weight"):
        hf.model_from_state_dict(config, partial)


def test_rope_model_keeps_rope_through_save_and_load(tmp_path):
    """A RoPE variant saved and loaded gives the same logits (and differs from the same weights without RoPE)."""
    config = nemojax.presets.get("nemotron-h-8b-tiny")
    config = config.replace(attention={"rope_theta": 1e4})
    model = nemojax.Model.init(config, 1)
    hf.save_hf(model, tmp_path / "rope")
    back = nemojax.load_hf(tmp_path / "rope")
    assert back.config.attention.rope_theta == 1e4
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 12))
    np.testing.assert_array_equal(np.asarray(back(tokens)), np.asarray(model(tokens)))
    plain = nemojax.Model(config.replace(attention={"rope_theta": None}), model.params)
    assert np.abs(np.asarray(plain(tokens)) - np.asarray(model(tokens))).max() > 1e-3
