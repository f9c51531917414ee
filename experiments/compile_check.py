"""Compile-only check of the Nemotron-H-8B training step on an 8-device fsdp x tensor mesh, nothing allocated.

    .venv/bin/python experiments/compile_check.py                      # fsdp x tensor 8x1, 4x2, 2x4; seq 4096
    .venv/bin/python experiments/compile_check.py --meshes 4x2 --seq 8192 --batch 8
    .venv/bin/python experiments/compile_check.py --meshes 8x1 --scan-layers   # the stack as a scan (see below)
    options: --config --meshes --seq --batch --grad-accum --remat --dtype --scan-layers --out   (see --help)

The host platform is split into 8 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set before
jax is imported). For each mesh "FxT" (fsdp F x tensor T) the config (default configs/nemotron_h_8b.py: the full
"nemotron-h-8b" preset, bfloat16 compute, float32 masters and AdamW state, remat "full") is built with
`nemojax.train.loop.build`, and its jitted train step is lowered with the abstract train state
(`run.abstract_state`) and an abstract batch (`ShapeDtypeStruct`s carrying `run.batch_sharding`), then compiled
for the CPU devices. Nothing is initialised or transferred; the numbers are those of XLA's CPU backend (a GPU or
TPU compile differs in fusion and memory layout but not in the sharding plan).

Reported per mesh: lower and compile seconds, the compiled memory analysis per device (arguments, outputs, temps,
aliased bytes; the step donates its state, so the aliased bytes are the state that is updated in place), the
cost analysis FLOPs of one device's program against the model FLOPs of `nemojax.train.flops` (remat recompute
included in XLA's count, not in the model's), and the collectives of the compiled program (ops and GiB of their
results per kind, the part that comes from split / concatenate ops, and the part made from Mamba mixer ops).
Written to runs/compile_check.json.

Read the memory figures as an upper bound, not as a GPU/TPU estimate: XLA's CPU pipeline upcasts most bfloat16
work to float32, and its rematerialisation does not lower the peak (the step compiles to the same temporaries with
remat "none" and "full"; a toy stack of jax.checkpoint-ed layers compiles on CPU to the same dot count and memory as
without it, the recompute CSE-d away). The sharding plan, the collectives and the argument (state) bytes carry
over.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from nemojax import config_files  # noqa: E402
from nemojax.model import abstract_params  # noqa: E402
from nemojax.train import loop, sharding  # noqa: E402
from nemojax.train.flops import train_flops_per_token  # noqa: E402

NUM_DEVICES = 8
GIB = 2 ** 30
BATCH_FIELDS = {"tokens": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
CPU_MEMORY_NOTE = ("XLA:CPU temporaries are an upper bound: bf16 work is upcast to f32 and remat does not lower the "
                   "CPU peak; arguments (the sharded state) are exact")


def parse_mesh(text: str) -> tuple[int, int]:
    """"4x2" -> (fsdp 4, tensor 2); the product must be the device count."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match:
        raise ValueError(f"mesh {text!r} is invalid: expected FSDPxTENSOR, e.g. 4x2")
    fsdp, tensor = int(match[1]), int(match[2])
    if fsdp * tensor != NUM_DEVICES:
        raise ValueError(f"mesh {text!r} is invalid: fsdp x tensor must be {NUM_DEVICES}")
    return fsdp, tensor


def make_config(args: argparse.Namespace, fsdp: int, tensor: int) -> ml_collections.ConfigDict:
    """The config file with this check's mesh, shapes and (optional) dtype / remat / scan_layers runtime choices."""
    config = config_files.load(args.config)
    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": fsdp, "tensor": tensor, "expert": 1})
    config.train.seq_len = args.seq
    config.train.batch_size = args.batch
    config.train.grad_accum = args.grad_accum
    if "runtime" not in config.model:
        config.model.runtime = ml_collections.ConfigDict()
    if args.remat:
        config.model.runtime.remat = args.remat
    if args.dtype:
        config.model.runtime.dtype = args.dtype
    if args.scan_layers:
        config.model.runtime.scan_layers = True
    return config


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), which the compile times depend on; "unknown" elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return "unknown"


def abstract_batch(batch: int, seq: int, batch_sharding: jax.sharding.NamedSharding) -> dict[str, Any]:
    """`[batch, seq]` ShapeDtypeStructs of every field a training batch carries, laid out like real batches."""
    return {name: jax.ShapeDtypeStruct((batch, seq), dtype, sharding=batch_sharding)
            for name, dtype in BATCH_FIELDS.items()}


def memory_report(compiled: Any) -> dict[str, float] | None:
    """Per-device bytes of the compiled program (GiB), or None where the backend reports none."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if stats is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    report = {f.replace("_size_in_bytes", "_gib"): getattr(stats, f, 0) / GIB for f in fields}
    # Live at peak, roughly: inputs + outputs not aliased to inputs + temporaries.
    report["total_gib"] = (report["argument_gib"] + report["output_gib"] - report["alias_gib"]
                           + report["temp_gib"])
    return report


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of one device's compiled program from XLA's cost analysis, or None where unavailable."""
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


# op_name of the Mamba mixer's ops: its projections, convs and gated norm, dt_bias / A_log and the SSD einsums.
MAMBA_OPS = re.compile(r"/mixer/(?:in_proj|conv1d|out_proj|norm)|/(?:A_log|dt_bias)|bg[a-z]*,[a-z]*->")


def collective_stats(hlo_text: str) -> dict[str, dict[str, float]]:
    """Per collective kind in the compiled (per-device) HLO: how many ops, the GiB of their results, the GiB of
    those that come from `split` / `concatenate` ops (a fused projection output cut across tensor shards, as the
    Mamba in_proj was before it was held per part, and its transpose in the backward pass), and the ops / GiB of
    those whose op_name (the jax ops they were made from, fused ops listing several) names a Mamba mixer op
    (`MAMBA_OPS`): with the mixer sharded by heads these should be only the all-reduces of its contractions."""
    stats = {op: {"ops": 0, "gib": 0.0, "split_concat_gib": 0.0, "mamba_ops": 0, "mamba_gib": 0.0}
             for op in COLLECTIVES}
    pattern = re.compile(rf"= (.*?) ({'|'.join(COLLECTIVES)})(?:-start)?\(")
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if not match:
            continue
        gib = sum(_array_bytes(dtype, dims) for dtype, dims in re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]",
                                                                          match[1])) / GIB
        op_name = re.search(r'op_name="([^"]*)"', line)
        source = op_name[1].rsplit("/", 1)[-1] if op_name else ""
        entry = stats[match[2]]
        entry["ops"] += 1
        entry["gib"] += gib
        if source.startswith(("split", "concatenate")):
            entry["split_concat_gib"] += gib
        if op_name and MAMBA_OPS.search(op_name[1]):
            entry["mamba_ops"] += 1
            entry["mamba_gib"] += gib
    return stats


def _array_bytes(dtype: str, dims: str) -> int:
    size = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2}.get(dtype, 4 if dtype != "f64" else 8)
    return size * math.prod(int(d) for d in dims.split(",") if d)


def check_mesh(args: argparse.Namespace, fsdp: int, tensor: int) -> dict[str, Any]:
    """Builds, lowers and compiles one mesh's train step; returns its timings and analyses."""
    config = make_config(args, fsdp, tensor)
    devices = jax.devices()[:NUM_DEVICES]
    t0 = time.perf_counter()
    run = loop.build(config, devices=devices)
    build_s = time.perf_counter() - t0
    mcfg = run.model_config
    batch = abstract_batch(args.batch, args.seq, run.batch_sharding)
    with jax.set_mesh(run.mesh), nn.logical_axis_rules(sharding.RULES):
        t0 = time.perf_counter()
        lowered = run.step.lower(run.abstract_state, batch)
        lower_s = time.perf_counter() - t0
        t0, cpu0 = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = args.batch * args.seq
    model_flops = train_flops_per_token(mcfg, args.seq) * tokens
    device_flops = cost_flops(compiled)
    params = abstract_params(mcfg)
    return {
        "mesh": {"fsdp": fsdp, "tensor": tensor},
        "seq_len": args.seq, "global_batch": args.batch, "grad_accum": args.grad_accum,
        "dtype": mcfg.runtime.dtype, "param_dtype": mcfg.runtime.param_dtype, "remat": mcfg.runtime.remat,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "scan_layers": mcfg.runtime.scan_layers, "cpu": cpu_model(),
        "build_s": build_s, "lower_s": lower_s, "compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
        "memory_per_device": memory_report(compiled),
        "xla_flops_per_device": device_flops,
        "model_flops_per_device": model_flops / NUM_DEVICES,
        "xla_over_model_flops": None if device_flops is None else device_flops * NUM_DEVICES / model_flops,
        "collectives": collective_stats(compiled.as_text()),
    }


def print_result(r: dict[str, Any]) -> None:
    m = r["mesh"]
    print(f"\nfsdp {m['fsdp']} x tensor {m['tensor']}: {r['params'] / 1e9:.2f}B params, global batch "
          f"{r['global_batch']} x seq {r['seq_len']}, {r['dtype']} compute / {r['param_dtype']} params, "
          f"remat {r['remat']}")
    print(f"  build {r['build_s']:.1f} s   lower {r['lower_s']:.1f} s   compile {r['compile_s']:.1f} s "
          f"({r['compile_cpu_s']:.1f} s CPU time; scan_layers {r['scan_layers']}, on {r['cpu']})")
    if r["scan_layers"]:
        print("  note: with scan_layers XLA's cost analysis and the collectives below count the scanned period once, "
              "not once per repeat")
    mem = r["memory_per_device"]
    if mem:
        print(f"  memory per device (GiB): arguments {mem['argument_gib']:.2f}  outputs {mem['output_gib']:.2f}  "
              f"aliased {mem['alias_gib']:.2f}  temps {mem['temp_gib']:.2f}  => ~{mem['total_gib']:.2f} live")
    else:
        print("  memory analysis: not available on this backend")
    if r["xla_flops_per_device"] is not None:
        print(f"  FLOPs per device: XLA {r['xla_flops_per_device']:.3e}  model {r['model_flops_per_device']:.3e}"
              f"  (XLA / model {r['xla_over_model_flops']:.2f})")
    coll = r["collectives"]
    total = sum(c["gib"] for c in coll.values())
    split = sum(c["split_concat_gib"] for c in coll.values())
    print("  collectives (ops / GiB of results): " + ", ".join(f"{k} {v['ops']} / {v['gib']:.1f}"
                                                               for k, v in coll.items()))
    print(f"  of which from split/concatenate (a fused projection cut across shards): {split:.1f} of {total:.1f} GiB"
          f" ({split / total if total else 0.0:.0%})")
    print("  of which from Mamba mixer ops (ops / GiB): " + ", ".join(
        f"{k} {v['mamba_ops']} / {v['mamba_gib']:.1f}" for k, v in coll.items() if v["mamba_ops"]))
    print(f"  note: {CPU_MEMORY_NOTE}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "nemotron_h_8b.py"))
    parser.add_argument("--meshes", default="8x1,4x2,2x4", help="comma-separated FSDPxTENSOR meshes of 8 devices")
    parser.add_argument("--seq", type=int, default=4096, help="sequence length")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--remat", default=None, help="model runtime remat (none, full, dots_saveable, ...)")
    parser.add_argument("--dtype", default=None, help="model runtime compute dtype")
    parser.add_argument("--scan-layers", action="store_true",
                        help="run the layer stack as a scan over the pattern's repeating period (runtime.scan_layers)")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "compile_check.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meshes = [parse_mesh(m) for m in args.meshes.split(",")]
    if len(jax.devices()) < NUM_DEVICES:
        raise SystemExit(f"need {NUM_DEVICES} devices, have {len(jax.devices())} ({jax.devices()[0].platform})")
    print(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices, config {args.config}")
    results = []
    for fsdp, tensor in meshes:
        results.append(check_mesh(args, fsdp, tensor))
        print_result(results[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"jax": jax.__version__, "backend": jax.devices()[0].platform,
                               "config": args.config, "note": CPU_MEMORY_NOTE,
                               "results": results}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
