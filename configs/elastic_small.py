# Nemotron Elastic on the demo's small hybrid (configs/small_hybrid.py, trained by `make demo` into runs/demo):
# importance on calibration sequences, every width axis (hidden, FFN, attention heads, Mamba heads and head
# channels) made elastic by permutation, routers for the budgets 1.0 / 0.75 / 0.5 of the parameters, then one
# elastic distillation run from the frozen teacher with the two-stage curriculum (uniform budgets, then 0.5 / 0.3 /
# 0.2 favouring the full model). Each budget's submodel is extracted as a Hugging Face checkpoint.
#
#   nemojax elastify --config configs/elastic_small.py --teacher runs/demo --workdir runs/elastic
#   nemojax generate --checkpoint runs/elastic/budget_0.5 --tokenizer byte --prompt "def main("
#
# Outputs: runs/elastic/scores.npz (reused when present), elastic/ (one checkpoint holding every nested model:
# `nemojax.elastic.load`), budget_<b>/ (the extracted submodels), elastify.json (sizes, parameter counts and
# validation losses per budget), metrics.jsonl (split "elastic"). The run checkpoints into runs/elastic and a rerun
# resumes it.
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = "runs/demo"  # a training workdir or a Hugging Face checkpoint folder (overridden by --teacher)
    c.data = ml_collections.ConfigDict({"kind": "stdlib", "tokenizer": "byte"})  # the teacher's data
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.calibration = ml_collections.ConfigDict({
        "num_sequences": 64, "seq_len": 256, "batch_size": 8, "seed": 1, "agg": "mean_l2",
    })
    c.elastic = ml_collections.ConfigDict({
        "budgets": (1.0, 0.75, 0.5),
        "axes": "",  # comma-separated elastic axes; "" = every width axis of the model
        "target": "params",  # what a budget is a fraction of: params | active_params | memory
        # one size per layer instead of one per axis; the extracted models then carry per-layer widths
        # (config.layer_configs), which nemojax loads and transformers' NemotronH (one width per kind) cannot
        "heterogeneous": False,
        "max_drop": 0,  # > 0: "depth" is elastic too, dropping up to this many layers by logit-MSE ranking
        "router_hidden": 64,
        "expert_score": "experts",  # or "reap" (Star Elastic) for MoE models
    })
    c.train = ml_collections.ConfigDict({
        "steps": 60, "batch_size": 8, "seq_len": 256, "stage2_seq_len": 0,  # 0: seq_len
        "stage1_fraction": 0.5, "budgets_per_step": 2, "lr": 3e-4, "warmup_steps": 5, "min_lr_ratio": 0.1,
        "router_lr": 3e-2, "temperature": 1.0, "seed": 0,
        # 5, not the official 1: on this trained teacher the KD gradient through the routers' multipliers held the
        # 0.75 router on a 50% submodel at 1 (experiments/elastic_nested.py, measured); at 5 it lands on 75%
        "router_weight": 5.0,
    })
    c.eval = ml_collections.ConfigDict({"batches": 8, "batch_size": 8, "seq_len": 256, "seed": 0})
    return c
