"""ModelOpt unified-checkpoint export / import (nemojax.interop.modelopt): a hand-computed NVFP4 oracle, the JSON
fields NVIDIA's loaders read, byte-identical export -> import -> export round trips, the imported model's logits
against the fake-quantized source, refusals, and atomic saves."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.torch import load_file

from nemojax.config import AttentionConfig, MambaConfig, ModelConfig, MoEConfig, Runtime
from nemojax.interop import modelopt, safetensors_file
from nemojax.interop.naming import rule_for
from nemojax.lowp.qarray import quantize
from nemojax.lowp.recipe import is_state
from nemojax.model import Model, abstract_params
from nemojax.quant import named_recipes

CONFIG = ModelConfig(
    vocab_size=96, hidden_size=64, pattern="M*E-",
    mamba=MambaConfig(num_heads=4, head_dim=16, state_size=16, n_groups=2, chunk_size=16),
    attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=16), intermediate_size=64,
    moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=32, shared_intermediate_size=32),
    runtime=Runtime(moe_impl="dense"))
TOKENS = np.random.default_rng(0).integers(0, 96, (2, 9))


def _calibrated(recipe, seed: int = 0) -> Model:
    return _calibrated_cached(named_recipes.get(recipe), seed)


@functools.cache
def _calibrated_cached(recipe, seed: int) -> Model:
    """CONFIG with `recipe` and hand-set quantization state: input / KV amaxes, half the weight amaxes below
    max|W| (clipping), static block scales = the dynamic ones with every third block doubled. The parts of the
    fused Mamba in_proj share calibrated amaxes, as `calibrate` sets them (one input, one checkpoint scale)."""
    config = CONFIG.replace(runtime={"quant": recipe})
    base = Model.init(CONFIG, seed)
    rng = np.random.default_rng(seed)
    old = flatten_dict(base.params)
    flat, shared = {}, {}

    def fused(path: tuple[str, ...]) -> tuple[str, ...]:  # in_proj_z/... -> in_proj/...
        return tuple("in_proj" if key.startswith("in_proj_") else key for key in path)

    for path, leaf in flatten_dict(abstract_params(config)).items():
        if not is_state(path[-1]):
            flat[path] = old[path]
            continue
        name = path[-1]
        weight = (*path[:-1], name.split("_")[0] if not name.startswith(("up_proj", "down_proj"))
                  else name[: len("up_proj") if name.startswith("up") else len("down_proj")])
        parts = [p for p in old if fused(p) == fused(weight)]  # the weight, or every part of in_proj
        if fused(path) in shared and not name.endswith("_block_scale"):
            flat[path] = shared[fused(path)]
        elif name in ("k_amax", "v_amax") or name.endswith("_input_amax"):
            flat[path] = jnp.asarray(rng.uniform(0.5, 4.0, leaf.shape), jnp.float32)
        elif name.endswith("_amax"):
            w = functools.reduce(jnp.maximum, [jnp.abs(old[p]).max(axis=(-2, -1)) for p in parts])
            # an uncalibrated (0) amax makes each in_proj part use its own current amax, which the fused
            # checkpoint scale cannot hold: calibrate always sets the parts' amax, so the helper does too
            calibrated = len(parts) > 1 or rng.random() < 0.5
            flat[path] = (w * (0.8 if calibrated else 0.0)).astype(jnp.float32)
        else:  # _block_scale
            w = old[weight]
            q = quantize(w, "nvfp4", axis=w.ndim - 2)
            s = np.asarray(q.scale.astype(jnp.float32)).copy()
            s.reshape(-1)[::3] = np.minimum(s.reshape(-1)[::3] * 2, 448)
            flat[path] = jnp.asarray(s)
        shared[fused(path)] = flat[path]
    return Model(config, unflatten_dict(flat))


def _in_proj(params) -> np.ndarray:
    """The checkpoint's fused in_proj kernel [in, z | x | B | C | dt] of Mamba layer 0."""
    mixer = params["layers_0"]["mixer"]
    return np.concatenate([np.asarray(mixer[f"in_proj_{p}"]["kernel"]) for p in ("z", "x", "B", "C", "dt")], axis=1)


def _files(directory) -> dict[str, np.ndarray]:
    return safetensors_file.read_safetensors(directory)


def _same_tensors(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# ----------------------------------------------------------------------------------------------- oracle


def test_nvfp4_hand_computed_oracle():
    """A 2 x 32 weight (torch [out, in]) whose amax is 2688, so S_enc = S_dec = 1 and every block scale is
    a_b / 6: exact packed bytes (low nibble first), E4M3 block scales and the two global scales."""
    W = np.zeros((2, 32), np.float32)
    W[0, :4] = [6, -3, 0.5, 1]          # block (0,0): a_b 6 -> d 1; codes 7, 0xD, 1, 2
    W[0, 16:20] = [2688, 1344, -896, 224]  # block (0,1): a_b 2688 -> d 448; /448 = 6, 3, -2, 0.5 -> 7, 5, 0xC, 1
    W[1, 16:19] = [12, 3, -1]           # block (1,1): a_b 12 -> d 2; 6, 1.5, -0.5 -> 7, 3, 9; block (1,0) zero
    path = ("layers_0", "mixer", "in_proj_x", "kernel")
    rule = rule_for(path, 2)
    layer = modelopt._Module((modelopt._Linear("layers_0/mixer/in_proj_x", path, rule,
                                               ("backbone.layers.0.mixer.in_proj",)),))
    flat = {path: jnp.asarray(W.T), ("layers_0", "mixer", "in_proj_x", "kernel_input_amax"): jnp.float32(5376.0)}
    out = modelopt._export_linear(layer, named_recipes.nvfp4().default, flat, jnp.float32)
    m = "backbone.layers.0.mixer.in_proj"
    expected = np.zeros((2, 16), np.uint8)
    expected[0, :2] = [0xD7, 0x21]      # (6, -3) -> 0x7 | 0xD << 4 ; (0.5, 1) -> 0x1 | 0x2 << 4
    expected[0, 8:10] = [0x57, 0x1C]    # (6, 3) ; (-2, 0.5)
    expected[1, 8:10] = [0x37, 0x09]    # (6, 1.5) ; (-0.5, 0)
    assert out[f"{m}.weight"].dtype == np.uint8
    np.testing.assert_array_equal(out[f"{m}.weight"], expected)
    assert out[f"{m}.weight_scale"].dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(out[f"{m}.weight_scale"].astype(np.float32), [[1, 448], [0, 2]])
    assert out[f"{m}.weight_scale_2"].dtype == np.float32 and out[f"{m}.weight_scale_2"].shape == ()
    assert float(out[f"{m}.weight_scale_2"]) == 1.0
    assert float(out[f"{m}.input_scale"]) == 2.0  # 5376 / 2688
    assert sorted(out) == sorted(f"{m}.{f}" for f in ("weight", "weight_scale", "weight_scale_2", "input_scale"))


def test_fp8_and_kv_scales_are_amax_over_448():
    model = _calibrated(named_recipes.fp8())
    tensors = modelopt.quantized_state_dict(model)
    flat = flatten_dict(model.params)
    m = "backbone.layers.0.mixer.in_proj"
    amax = flat[("layers_0", "mixer", "in_proj_z", "kernel_input_amax")]  # one input: the parts share it
    np.testing.assert_allclose(tensors[f"{m}.input_scale"], amax / 448, rtol=2e-7)
    w_amax = flat[("layers_0", "mixer", "in_proj_z", "kernel_amax")]
    w_amax = w_amax if w_amax > 0 else np.abs(_in_proj(model.params)).max()
    np.testing.assert_allclose(tensors[f"{m}.weight_scale"], w_amax / 448, rtol=2e-7)
    assert tensors[f"{m}.weight"].dtype == ml_dtypes.float8_e4m3fn and tensors[f"{m}.weight"].shape == (
        CONFIG.mamba.num_heads * CONFIG.mamba.head_dim * 2 + 2 * 2 * 16 + 4, 64)
    k = flat[("layers_1", "mixer", "k_amax")]
    np.testing.assert_allclose(tensors["backbone.layers.1.mixer.k_proj.k_scale"], k / 448, rtol=2e-7)
    assert "backbone.layers.1.mixer.v_proj.v_scale" in tensors
    assert tensors["lm_head.weight"].dtype == np.float32  # high precision, the model's dtype


# ----------------------------------------------------------------------------------------------- JSON


def test_mixed_precision_configs_name_what_loaders_read(tmp_path):
    model = _calibrated(named_recipes.nemotron3_super_nvfp4())
    modelopt.save_quantized(model, tmp_path / "ckpt", dtype="bfloat16")
    q = json.loads((tmp_path / "ckpt" / "hf_quant_config.json").read_text())
    assert set(q) == {"producer", "quantization"} and q["producer"]["name"] == "nemojax"
    qq = q["quantization"]
    assert qq["quant_algo"] == "MIXED_PRECISION" and qq["kv_cache_quant_algo"] == "FP8"
    layers = qq["quantized_layers"]
    for e in range(4):
        for proj in ("up_proj", "down_proj"):
            assert layers[f"backbone.layers.2.mixer.experts.{e}.{proj}"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["backbone.layers.0.mixer.in_proj"] == {"quant_algo": "FP8"}
    assert layers["backbone.layers.2.mixer.shared_experts.up_proj"] == {"quant_algo": "FP8"}
    assert layers["backbone.layers.3.mixer.up_proj"] == {"quant_algo": "FP8"}
    assert "backbone.layers.1.mixer.q_proj" not in layers
    for name in ("lm_head", "backbone.layers.1.mixer.q_proj", "backbone.layers.1.mixer.o_proj",
                 "backbone.layers.2.mixer.gate", "backbone.layers.0.mixer.conv1d"):
        assert name in qq["exclude_modules"]
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "MIXED_PRECISION"
    assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert qc["quantized_layers"] == layers and qc["ignore"] == qq["exclude_modules"]
    groups = {g["weights"]["num_bits"]: g for g in qc["config_groups"].values()}
    assert groups[4]["weights"] == {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    assert "backbone.layers.2.mixer.experts.3.down_proj" in groups[4]["targets"]
    assert groups[8]["input_activations"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "nemotron_h"
    # What a torch loader (vLLM's path) sees: dtypes and shapes of the ModelOpt layout.
    t = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    e = "backbone.layers.2.mixer.experts.1.up_proj"
    assert str(t[f"{e}.weight"].dtype) == "torch.uint8" and tuple(t[f"{e}.weight"].shape) == (32, 32)
    assert str(t[f"{e}.weight_scale"].dtype) == "torch.float8_e4m3fn" and tuple(t[f"{e}.weight_scale"].shape) == (32, 4)
    assert tuple(t[f"{e}.weight_scale_2"].shape) == () and tuple(t[f"{e}.input_scale"].shape) == ()
    assert str(t["backbone.layers.0.mixer.in_proj.weight"].dtype) == "torch.float8_e4m3fn"
    assert str(t["backbone.layers.1.mixer.q_proj.weight"].dtype) == "torch.bfloat16"
    assert str(t["backbone.layers.2.mixer.gate.weight"].dtype) == "torch.float32"  # the router stays fp32
    assert "backbone.layers.1.mixer.k_proj.k_scale" in t


def test_single_format_config():
    q = modelopt.quant_config(_calibrated(named_recipes.nvfp4()))["quantization"]
    assert q["quant_algo"] == "NVFP4" and q["group_size"] == 16 and q["kv_cache_quant_algo"] is None
    assert "quantized_layers" not in q and "lm_head" in q["exclude_modules"]
    qc = modelopt.hf_quantization_config({"producer": {"name": "x", "version": "0"}, "quantization": q})
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == q["exclude_modules"]
    assert "kv_cache_scheme" not in qc


# ----------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("recipe", ["nemotron3_super_nvfp4", "nvfp4_w4a16", "fp8"])
def test_export_import_export_is_byte_identical(tmp_path, recipe):
    model = _calibrated(named_recipes.get(recipe))
    modelopt.save_quantized(model, tmp_path / "a")
    loaded = modelopt.load_quantized(tmp_path / "a")
    modelopt.save_quantized(loaded, tmp_path / "b")
    _same_tensors(_files(tmp_path / "a"), _files(tmp_path / "b"))
    for name in ("hf_quant_config.json", "config.json"):
        assert json.loads((tmp_path / "a" / name).read_text()) == json.loads((tmp_path / "b" / name).read_text())
    # Formats per layer come back; the imported kernel re-quantizes to the source's codes.
    cfg = loaded.config
    for path in ("layers_0/mixer/in_proj_x", "layers_2/mixer/experts/up_proj", "layers_1/mixer/q_proj", "lm_head"):
        src, got = model.config.runtime.quant.linear(path, cfg.pattern), cfg.runtime.quant.linear(path, cfg.pattern)
        assert (src is None or src.weight is None) == (got is None)
        if got is not None:
            assert got.weight.fmt == src.weight.fmt.replace("_2d", "")
            assert (got.input is None) == (src.input is None)
    w_path = ("layers_2", "mixer", "experts", "up_proj")
    lf, sf = flatten_dict(loaded.params), flatten_dict(model.params)
    spec = model.config.runtime.quant.linear("layers_2/mixer/experts/up_proj", cfg.pattern)

    def codes(flat):
        amax = flat.get((*w_path[:-1], "up_proj_amax"))
        w = flat[w_path]
        amax = jnp.where(amax > 0, amax, jnp.abs(w).max(axis=(1, 2))) if amax is not None else None
        block = flat.get((*w_path[:-1], "up_proj_block_scale"))
        return np.asarray(quantize(w, spec.weight.fmt, axis=1, amax=amax, block_scale=block).data)

    np.testing.assert_array_equal(codes(lf), codes(sf))


def test_imported_logits_equal_fake_quantized_source(tmp_path):
    """The Super recipe covers NVFP4 experts with static block scales, FP8 Mamba / MLP / shared experts, BF16
    attention and the FP8 KV cache."""
    model = _calibrated(named_recipes.nemotron3_super_nvfp4())
    modelopt.save_quantized(model, tmp_path / "ckpt")
    loaded = modelopt.load_quantized(tmp_path / "ckpt")
    want, got = np.asarray(model(TOKENS)), np.asarray(loaded(TOKENS))
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)  # same codes, block scales and bit-equal global scales


def test_sharded_and_config_json_only(tmp_path):
    """A sharded save (index + shards) loads the same; without hf_quant_config.json the loader falls back to
    config.json's compressed-tensors style quantization_config."""
    model = _calibrated(named_recipes.nemotron3_super_nvfp4())
    modelopt.save_quantized(model, tmp_path / "one")
    modelopt.save_quantized(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _same_tensors(_files(tmp_path / "one"), _files(tmp_path / "sharded"))
    (tmp_path / "one" / "hf_quant_config.json").unlink()
    a, b = modelopt.load_quantized(tmp_path / "one"), modelopt.load_quantized(tmp_path / "sharded")
    assert a.config == b.config
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mxfp8_round_trip_values(tmp_path):
    """MXFP8: FP8 codes + E8M0 scales (uint8). The import dequantizes to the same values; a re-export may pick a
    smaller E8M0 scale for a block whose max rounded down to 224 * 2^k, so compare dequantized values."""
    model = _calibrated(named_recipes.mxfp8())
    modelopt.save_quantized(model, tmp_path / "a")
    t = _files(tmp_path / "a")
    m = "backbone.layers.0.mixer.in_proj"
    assert t[f"{m}.weight"].dtype == ml_dtypes.float8_e4m3fn and t[f"{m}.weight_scale"].dtype == np.uint8
    assert t[f"{m}.weight_scale"].shape == (t[f"{m}.weight"].shape[0], 64 // 32) and f"{m}.input_scale" not in t
    w = _in_proj(model.params)
    want = np.asarray(quantize(jnp.asarray(w), "mxfp8", axis=0).dequantize())
    loaded = modelopt.load_quantized(tmp_path / "a")
    np.testing.assert_array_equal(_in_proj(loaded.params), want)
    modelopt.save_quantized(loaded, tmp_path / "b")
    loaded2 = modelopt.load_quantized(tmp_path / "b")
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(loaded2.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_amax_for_scale_inverts_decode_scale():
    amax = jnp.asarray(np.random.default_rng(1).uniform(1e-3, 1e3, 500), jnp.float32)
    for fmt in ("nvfp4", "fp8_e4m3"):
        scale = modelopt.decode_scale(amax, fmt)
        np.testing.assert_array_equal(modelopt.decode_scale(modelopt.amax_for_scale(scale, fmt), fmt), scale)


# ----------------------------------------------------------------------------------------------- refusals


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="mxfp4"):
        modelopt.quant_config(_calibrated(named_recipes.mxfp4()))
    with pytest.raises(ValueError, match="dynamic per-tensor amax"):
        modelopt.quant_config(_calibrated(named_recipes.fp8_training()))
    model = _calibrated(named_recipes.nvfp4())
    flat = flatten_dict(model.params)
    flat[("layers_0", "mixer", "in_proj_x", "kernel_input_amax")] = jnp.float32(0.0)
    with pytest.raises(ValueError, match="layers_0/mixer/in_proj.*calibrate"):
        modelopt.quantized_state_dict(Model(model.config, unflatten_dict(flat)))
    with pytest.raises(ValueError, match="save_hf"):
        modelopt.quant_config(Model.init(CONFIG, 0))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    modelopt.save_quantized(_calibrated(named_recipes.nvfp4()), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = []
    real = safetensors_file._save

    def broken(tensors, file):
        calls.append(file)
        real(tensors, file)  # the new weights are written into staging, then the save fails
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors_file, "_save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        modelopt.save_quantized(_calibrated(named_recipes.fp8(), seed=1), target)
    assert calls
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind
    monkeypatch.undo()
    with pytest.raises(ValueError, match="mxfp4"):  # a bad recipe fails before touching anything
        modelopt.save_quantized(_calibrated(named_recipes.mxfp4()), target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
