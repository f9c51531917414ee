# The demo: a 22.1M-parameter hybrid (Mamba-2, attention, relu2 MLP in the Nemotron-H pattern style) trained on the
# Python standard library's source with the byte tokenizer for 240 steps of 8 x 256 bytes, about 8 minutes on a
# 2-core CPU. `make demo` runs it, then compresses (configs/minitron_small.py) and quantizes (configs/nvfp4_qad.py)
# the result.
#
#   nemojax train --config configs/small_hybrid.py --workdir runs/demo
#
# Expect the validation loss (printed at steps 60, 120, 180 and 240) to end near 1.5 nats per byte, against the
# corpus' unigram entropy of 3.27, with metrics in runs/demo/metrics.jsonl, TensorBoard scalars and
# runs/demo/loss.png.
import ml_collections

from nemojax import presets  # noqa: F401  (the preset named below)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({
        "preset": "nemotron-h-8b-tiny",
        "overrides": {
            "vocab_size": 260, "hidden_size": 512, "pattern": "M-M*-M-M-M*-M-",
            "mamba": {"num_heads": 16, "head_dim": 64, "state_size": 64, "n_groups": 4, "chunk_size": 64},
            "attention": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 64},
            "intermediate_size": 1536, "max_position_embeddings": 8192,
        },
        "runtime": {},
    })
    c.data = ml_collections.ConfigDict({"kind": "stdlib", "tokenizer": "byte"})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.optimizer = ml_collections.ConfigDict({"lr": 2e-3, "warmup_steps": 20, "schedule": "wsd", "decay_fraction": 0.25,
                                             "weight_decay": 0.1, "clip_norm": 1.0})
    c.train = ml_collections.ConfigDict({
        "steps": 240, "batch_size": 8, "seq_len": 256, "grad_accum": 1, "seed": 0,
        "z_loss": 1e-4, "moe_aux_loss": 0.0, "moe_bias_rate": 0.0, "document_mask": False,
        "log_every": 10, "eval_every": 60, "eval_batches": 8, "checkpoint_every": 60, "keep_checkpoints": 2,
        "peak_flops_per_device": 0.0,
        # a non-finite loss or gradient: "stop" the job, or "skip" the update (at most max_skipped in a row)
        "on_nonfinite": "stop", "max_skipped": 10,
        "low_precision": "",  # quantized training: "fp8_training" or "nvfp4_training" (nemojax.quant.named_recipes)
        "compilation_cache_dir": "",  # jax's persistent XLA cache ("" off): a later run loads the compiled step
    })
    return c
