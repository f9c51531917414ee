# Nemotron-H-8B pretraining at its published shape: the full "nemotron-h-8b" preset (52 layers, hidden 4096,
# 24 Mamba-2 / 4 attention / 24 relu2-MLP layers, vocab 131072, about 8.1B parameters), bfloat16 compute over
# float32 master weights and float32 AdamW state, full per-layer rematerialisation, 8192-token sequences. This is a
# pod job, not a laptop one (the suite checks that this command parses and builds its config, and does not run it):
#
#   nemojax train --config configs/nemotron_h_8b.py --workdir gs://bucket/runs/nemotron-h-8b \
#       --config.data.paths="('/data/corpus/',)" --config.data.tokenizer=/path/to/nemotron/tokenizer.json
#
# data.tokenizer must in practice be the real Nemotron tokenizer.json (the 131072-token vocabulary of the
# released checkpoints, e.g. the one shipped with nvidia/Nemotron-H-8B-Base-8K); the "byte" default below only
# keeps the config loadable offline (the byte tokenizer's 260 ids fit inside the model's 131072). The data
# kind/paths are placeholders for a real pretraining corpus (jsonl shards).
#
# Layout: mesh {"data": 1, "fsdp": -1, "tensor": 1}: every device on fsdp (ZeRO-3: params, grads and AdamW state
# sharded, the batch split over fsdp), the usual layout for a model of this size. Tensor parallelism is left at 1,
# as ZeRO-3 alone fits this size; "tensor": 2 inside a node splits every Mamba projection part by heads or groups
# (the mixer holds in_proj and conv1d one param per part, so no collective reshards around the split; measure
# with experiments/compile_check.py before changing it).
# Memory per device on 64 accelerators: f32 masters + mu + nu are 12 bytes/param (97 GB in all, 1.5 GB per device;
# 11.3 GiB per device on the 8-device compile check), plus the f32 grads; activations with remat "full" keep one
# [L, 4096] bf16 residual per layer and sequence (64 MB, 3.4 GB per sequence over 52 layers) plus one layer's
# recompute and the f32 logits ([L, 131072] f32 = 4.3 GB per sequence, and as much for their gradient). Global
# batch 256 x 8192 = 2.1M tokens per step in 2 micro-batches is 2 sequences per device per micro-batch on 64
# devices, within an 80 GB H100 or a 95 GB TPU v5p. Scale batch_size with the device count (it must divide by
# grad_accum x the fsdp size).
#
# Expect 4.66e10 model FLOPs per token for training (nemojax.train.flops at seq 8192; 6N would say 4.86e10), so
# tokens/s per device = peak x MFU / 4.66e10, e.g. about 8.5k tokens/s per H100 (989e12 bf16 FLOPs/s) at 40% MFU;
# set train.peak_flops_per_device to have MFU logged. The loss starts near ln(131072) = 11.8 nats/token. Metrics go
# to <workdir>/metrics.jsonl. `experiments/compile_check.py` lowers and compiles this model's train step on an
# 8-device CPU mesh (fsdp x tensor) without allocating anything.
import ml_collections

from nemojax import presets  # noqa: F401  (the preset named below)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({
        "preset": "nemotron-h-8b",
        "runtime": {"dtype": "bfloat16", "param_dtype": "float32", "remat": "full"},
    })
    c.data = ml_collections.ConfigDict({"kind": "jsonl", "paths": ("data/pretrain/",), "tokenizer": "byte"})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.optimizer = ml_collections.ConfigDict({"lr": 3e-4, "warmup_steps": 2000, "schedule": "wsd",
                                             "decay_fraction": 0.2, "min_lr_ratio": 0.01, "weight_decay": 0.1,
                                             "b1": 0.9, "b2": 0.95, "clip_norm": 1.0})
    c.train = ml_collections.ConfigDict({
        "steps": 100_000, "batch_size": 256, "seq_len": 8192, "grad_accum": 2, "seed": 0,
        "z_loss": 1e-4, "moe_aux_loss": 0.0, "moe_bias_rate": 0.0, "document_mask": False,
        "log_every": 10, "eval_every": 1000, "eval_batches": 16, "checkpoint_every": 1000, "keep_checkpoints": 3,
        "peak_flops_per_device": 0.0,
        # a non-finite loss or gradient: "stop" the job, or "skip" the update (at most max_skipped in a row)
        "on_nonfinite": "stop", "max_skipped": 10,
        "low_precision": "",  # quantized training: "fp8_training" or "nvfp4_training" (nemojax.quant.named_recipes)
        "compilation_cache_dir": "",  # jax's persistent XLA cache ("" off): a later run loads the compiled step
    })
    return c
