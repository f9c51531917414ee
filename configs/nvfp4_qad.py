# NVFP4 post-training quantization and quantization-aware distillation (QAD) of the demo's small hybrid
# (configs/small_hybrid.py, trained by `make demo` into runs/demo): ModelOpt's NVFP4 W4A4 recipe (every linear
# layer but lm_head; E2M1 values, an E4M3 scale per 16, a per-tensor FP32 scale; activation amaxes calibrated with
# "max"), then a short KL distillation from the high-precision model into the fake-quantized student.
#
#   nemojax quantize --config configs/nvfp4_qad.py --teacher runs/demo --workdir runs/nvfp4
#   nemojax qad --config configs/nvfp4_qad.py --workdir runs/nvfp4
#   nemojax generate --checkpoint runs/nvfp4/qad --tokenizer byte --prompt "def main("
#
# generate (like nemojax.load_hf) reads the quantized checkpoint as a fake-quantized model: the dequantized weights,
# with the activations quantized as in QAD. `make demo` runs the same stage into runs/demo/nvfp4 and draws
# runs/demo/nvfp4/quantization.png.
#
# Other recipes: --config.recipe=fp8 (W8A8 + FP8 KV cache), nvfp4_w4a16, mxfp8, nemotron3_nano_nvfp4, ... (see
# nemojax.quant.named_recipes). The checkpoints in runs/nvfp4/ptq and runs/nvfp4/qad use NVIDIA's ModelOpt layout
# (packed uint8 weights, E4M3 weight_scale, FP32 weight_scale_2 and input_scale, hf_quant_config.json).
# Measured on the demo teacher: see README ("Quantization").
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = "runs/demo"  # a training workdir or a Hugging Face checkpoint folder (overridden by --teacher)
    c.recipe = "nvfp4"  # a nemojax.quant.named_recipes name
    c.data = ml_collections.ConfigDict({"kind": "stdlib", "tokenizer": "byte"})  # the teacher's data
    # the QAD run's mesh layout, as `nemojax train`'s (here every device on fsdp; one CPU is a 1x1x1x1 mesh)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.calibration = ml_collections.ConfigDict({
        "num_sequences": 32, "seq_len": 256, "batch_size": 8, "seed": 1, "method": "max",
    })
    c.qad = ml_collections.ConfigDict({
        "steps": 30, "batch_size": 8, "seq_len": 256, "seed": 0,
        "lr": 1e-4, "warmup_steps": 3, "min_lr_ratio": 0.1, "temperature": 1.0, "lm_weight": 0.0,
    })
    # validation loss: mean next-token NLL over `batches` batches of the validation split (as `nemojax train`).
    c.eval = ml_collections.ConfigDict({"batches": 8, "batch_size": 8, "seq_len": 256, "seed": 0})
    return c
