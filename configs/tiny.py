# A tiny hybrid (Mamba-2, attention, MLP) for tests: trains in seconds on one CPU core.
#
#   nemojax train --config configs/tiny.py --workdir runs/tiny --config.train.steps=20
#
# Expect the training loss to fall from about log(vocab) = 5.5 nats within a few dozen steps.
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # overrides: architecture fields of the preset; runtime: how it runs (nemojax.config.Runtime: dtype, remat, ...)
    c.model = ml_collections.ConfigDict({"preset": "nemotron-h-8b-tiny", "overrides": {"vocab_size": 260},
                                         "runtime": {}})
    c.data = ml_collections.ConfigDict({"kind": "stdlib", "tokenizer": "byte"})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.optimizer = ml_collections.ConfigDict({"lr": 3e-3, "warmup_steps": 5, "schedule": "wsd", "decay_fraction": 0.2})
    c.train = ml_collections.ConfigDict({
        "steps": 20, "batch_size": 4, "seq_len": 64, "grad_accum": 1, "seed": 0,
        "z_loss": 0.0, "moe_aux_loss": 0.0, "moe_bias_rate": 0.0, "document_mask": False,
        "log_every": 5, "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10, "keep_checkpoints": 2,
        "peak_flops_per_device": 0.0,
        # a non-finite loss or gradient: "stop" the job, or "skip" the update (at most max_skipped in a row)
        "on_nonfinite": "stop", "max_skipped": 10,
        "low_precision": "",  # quantized training: "fp8_training" or "nvfp4_training" (nemojax.quant.named_recipes)
        "compilation_cache_dir": "",  # jax's persistent XLA cache ("" off): a later run loads the compiled step
    })
    return c
