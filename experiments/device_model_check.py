"""Model-level kernel check on an accelerator: a slice of Nemotron-H-8B (pattern "M-M*-M-", hidden 4096, vocab
131072, ~2B params) in bfloat16, run with each SSD-scan and attention implementation.

    python experiments/device_model_check.py --out runs/device_model.jsonl    # GPU: prefill + training gradient
    python experiments/device_model_check.py --quick                          # tiny twin, any backend (CPU test)

Prefill (batch 1 x L): logits of every (scan, attention) pair against the all-XLA run (top-1 agreement, max
relative difference) and the median time of --repeats runs. Training: the gradient of the LM loss (float32
params, bfloat16 compute) with the Pallas scan (XLA backward) and the validated attention vs all XLA: loss and
gradient agreement, compile seconds and tokens/s. One JSON line per measurement; progress lines as it goes, so a
run cut short by a timeout still says where its time went.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import nemojax  # noqa: E402
from nemojax.train.losses import cross_entropy  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn, args: tuple, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def variant(config: nemojax.ModelConfig, scan: str, attention: str) -> nemojax.ModelConfig:
    return config.replace(runtime={"scan_impl": scan, "attention_impl": attention})


def prefill(config, params, tokens, pairs, repeats: int, emit) -> None:
    reference = None
    for scan, attention in pairs:
        cfg = variant(config, scan, attention)
        t0 = time.perf_counter()
        fn = jax.jit(lambda p, t, cfg=cfg: nemojax.Model(cfg, p)(t)).lower(params, tokens).compile()
        compile_s = time.perf_counter() - t0
        logits = fn(params, tokens)
        if reference is None:
            reference = logits
        seconds = timed(fn, (params, tokens), repeats)
        top1 = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(reference, -1)))
        emit(dict(prefill=dict(scan=scan, attention=attention, batch=tokens.shape[0], L=tokens.shape[1],
                               ms=1e3 * seconds, tokens_per_s=tokens.size / seconds, compile_s=compile_s,
                               top1_vs_xla=top1, rel_vs_xla=rel(logits, reference))))


def train_gradient(config, params, tokens, pairs, repeats: int, emit) -> None:
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
    reference = None
    for scan, attention in pairs:
        cfg = variant(config, scan, attention)

        def loss(p, cfg=cfg):
            return cross_entropy(nemojax.Model(cfg, p)(tokens), targets, mask)[0]

        t0 = time.perf_counter()
        fn = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        compile_s = time.perf_counter() - t0
        value, grads = fn(params)
        if reference is None:
            reference = (value, grads)
        grad_rel = max(rel(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1]), strict=True))
        seconds = timed(fn, (params,), repeats)
        emit(dict(train_grad=dict(scan=scan, attention=attention, batch=tokens.shape[0], L=tokens.shape[1],
                                  ms=1e3 * seconds, tokens_per_s=tokens.size / seconds, compile_s=compile_s,
                                  loss=float(value), loss_vs_xla=float(value - reference[0]),
                                  max_grad_rel_vs_xla=grad_rel)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny twin at L 64 (interpreted kernels on CPU)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--pairs", default=None,
                        help="scan:attention pairs to run, e.g. xla:xla,pallas:cudnn (default: every pair; the "
                             "first is the reference)")
    parser.add_argument("--out", default="runs/device_model.jsonl")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")

    def emit(record: dict) -> None:
        log(json.dumps(record))
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")

    name, seq = ("nemotron-h-8b-tiny", 64) if args.quick else ("nemotron-h-8b", args.seq)
    config = nemojax.presets.get(name, pattern="M-M*-M-", runtime={"dtype": "bfloat16"})
    emit(dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), jax=jax.__version__,
              config=name, pattern=config.pattern))
    gpu = jax.default_backend() == "gpu"
    attentions = ("xla", "cudnn") if gpu else ("xla", "pallas")
    pairs = [("xla", "xla")] + [(s, a) for s in ("xla", "pallas") for a in attentions if (s, a) != ("xla", "xla")]
    if args.pairs:
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]

    log(f"init {name} ({nemojax.param_count(config) / 1e9:.2f}B params)")
    params32 = nemojax.Model.init(config, 0).params
    tokens = jax.random.randint(jax.random.key(1), (1, seq), 0, config.vocab_size)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    log("prefill")
    prefill(config, params16, tokens, pairs, args.repeats, emit)
    del params16
    if not args.skip_train:
        log("training gradient")
        train_gradient(config, params32, tokens, [pairs[0], pairs[-1]], args.repeats, emit)
    log("done")


if __name__ == "__main__":
    main()
