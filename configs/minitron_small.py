# Minitron compression of the demo's small hybrid (configs/small_hybrid.py, trained by `make demo` into runs/demo):
# activation importance on calibration sequences, width pruning to about half the parameters (hidden 512 -> 384,
# MLP 1536 -> 1024, Mamba heads 16 -> 8 kept group-aware, attention and depth untouched), then logit distillation
# from the teacher on the same corpus and byte tokenizer.
#
#   nemojax prune --config configs/minitron_small.py --teacher runs/demo --workdir runs/minitron
#   nemojax distill --config configs/minitron_small.py --workdir runs/minitron
#   nemojax generate --checkpoint runs/minitron/distilled --tokenizer byte --prompt "def main("
#
# --teacher takes a training workdir (run.json) or a Hugging Face folder (config.json); `distill` defaults to the
# teacher `prune` used (runs/minitron/prune.json). Expect 22.1M -> 10.7M parameters; measured on the demo teacher
# (validation loss 1.52 nats/byte): pruned 1.94, after 60 distillation steps 1.56 (40 steps, the default here,
# keeps `make demo`'s added stage to about 2-3 minutes on a 2-core CPU), all far under the corpus' unigram entropy
# (3.27). Outputs: runs/minitron/scores.npz (reused when present), pruned/ and distilled/ (Hugging Face
# checkpoints; the byte tokenizer has no tokenizer.json, so generate takes --tokenizer byte), metrics.jsonl. `make
# demo` runs the same stage into runs/demo/minitron and draws runs/demo/minitron/compression.png.
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = "runs/demo"  # a training workdir or a Hugging Face checkpoint folder (overridden by --teacher)
    c.data = ml_collections.ConfigDict({"kind": "stdlib", "tokenizer": "byte"})  # the teacher's data
    # the distillation run's mesh layout, as `nemojax train`'s (here every device on fsdp; one CPU is a 1x1x1x1 mesh)
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.calibration = ml_collections.ConfigDict({
        "num_sequences": 64, "seq_len": 256, "batch_size": 8, "seed": 1, "agg": "mean_l2",
    })
    # None keeps a size; `layers` keeps that many layers by block importance (depth pruning), `drop_layers` names
    # the ones to drop instead.
    c.prune = ml_collections.ConfigDict({
        "hidden": 384, "ffn": 1024, "heads": None, "mamba_heads": 8, "mamba_head_dim": None,
        "experts": None, "expert_ffn": None, "layers": None, "drop_layers": None,
    })
    c.distill = ml_collections.ConfigDict({
        "steps": 40, "batch_size": 8, "seq_len": 256, "seed": 0,
        "lr": 1e-3, "warmup_steps": 5, "min_lr_ratio": 0.1,
        "temperature": 1.0, "top_k": 0, "kl_weight": 1.0, "lm_weight": 0.0,
    })
    # validation loss: mean next-token NLL over `batches` batches of the validation split (as `nemojax train`).
    c.eval = ml_collections.ConfigDict({"batches": 8, "batch_size": 8, "seq_len": 256, "seed": 0})
    return c
