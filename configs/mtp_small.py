# A small Nemotron 3 Super-style hybrid MoE (Mamba-2, attention, LatentMoE; 4.0M params, 1.3M of them in a
# 2-depth MTP head) trained on the Python standard library's source with the byte tokenizer and the MTP loss at
# Megatron's scale (0.3); 240 steps, about 3-4 minutes on a 2-core CPU. It is the trained model of the MTP
# speculative-decoding experiment:
#
#   nemojax train --config configs/mtp_small.py --workdir runs/mtp_small
#   python experiments/mtp_speculative.py          # trains this config first if runs/mtp_small has no checkpoint
#
# Expect a validation loss near 1.6 nats per byte (the corpus' unigram entropy is about 3.2), MTP losses
# mtp_nll_0 / mtp_nll_1 (tokens t+2 / t+3) near 1.6 against a main nll near 1.3, and, in the experiment,
# speculative decoding equal to plain greedy decoding token for token with k = 1..3 drafts, accepting about
# 0.87 / 0.77 / 0.63 of the drafts (greedy continuations of this small model end in long runs of spaces, which
# are easy to draft; runs/mtp_speculative.json).
import ml_collections

from nemojax import presets  # noqa: F401  (the preset named below)


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({
        "preset": "nemotron-3-super-120b-a12b-tiny",  # pattern MEM*EMEM, LatentMoE, MTP pattern *E
        "overrides": {
            "vocab_size": 260, "hidden_size": 192,
            "mamba": {"num_heads": 12, "head_dim": 32, "state_size": 32, "n_groups": 2, "chunk_size": 64},
            "attention": {"num_heads": 4, "num_kv_heads": 2, "head_dim": 48},
            "moe": {"num_experts": 8, "top_k": 2, "intermediate_size": 192, "shared_intermediate_size": 384,
                    "latent_size": 96},
            "mtp": {"num_layers": 2},
            "max_position_embeddings": 4096,
        },
        "runtime": {},
    })
    c.data = ml_collections.ConfigDict({"kind": "stdlib", "tokenizer": "byte"})
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.optimizer = ml_collections.ConfigDict({"lr": 3e-3, "warmup_steps": 20, "schedule": "wsd", "decay_fraction": 0.25,
                                             "weight_decay": 0.1, "clip_norm": 1.0})
    c.train = ml_collections.ConfigDict({
        "steps": 240, "batch_size": 8, "seq_len": 256, "grad_accum": 1, "seed": 0,
        "z_loss": 1e-4, "moe_aux_loss": 1e-3, "moe_bias_rate": 1e-3, "document_mask": False, "mtp_loss_weight": 0.3,
        "log_every": 10, "eval_every": 80, "eval_batches": 8, "checkpoint_every": 80, "keep_checkpoints": 2,
        "peak_flops_per_device": 0.0,
        # a non-finite loss or gradient: "stop" the job, or "skip" the update (at most max_skipped in a row)
        "on_nonfinite": "stop", "max_skipped": 10,
        "low_precision": "",  # quantized training: "fp8_training" or "nvfp4_training" (nemojax.quant.named_recipes)
        "compilation_cache_dir": "",  # jax's persistent XLA cache ("" off): a later run loads the compiled step
    })
    return c
