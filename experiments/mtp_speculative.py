"""Self-speculative decoding with the MTP head equals plain greedy decoding, and how many drafts it accepts.

    .venv/bin/python experiments/mtp_speculative.py              # trains configs/mtp_small.py (~3 min), then checks
    .venv/bin/python experiments/mtp_speculative.py --quick      # ~1.5 minute smoke run (12 steps, k = 1, 2)
    options: --steps --draft --max-new --workdir --out --repeats   (see --help)

What it does:

1. Trains configs/mtp_small.py (a Super-style hybrid MoE with a 2-depth MTP head, MTP loss weight 0.3) into
   runs/mtp_small, resuming from its checkpoints (a finished run is only restored); `--steps` changes the length.
2. Takes 8 held-out prompts: snippets of standard-library Python source from files in the validation split
   (never trained on), ASCII, 64 to 200 bytes, all different lengths, in one right-padded batch.
3. Decodes them greedily (`generate(..., max_new_tokens=64, eos_ids=[])`) and with `speculative=k` for each k in
   `--draft` (default 1 2 3), and checks the outputs are equal token for token per prompt (PASS / FAIL). The
   speculative stats give the acceptance rate (accepted drafts / proposed drafts) and tokens per round. Each
   decode runs once to compile and is then timed (best of `--repeats`), so tokens/s excludes compilation.
   As a cross-check of the acceptance rate, the MTP head is also run teacher-forced (`Model.with_mtp`, the
   training forward) on the greedy output: its top-1 share per depth, and the rounds of speculative decoding
   replayed with those guesses (k <= the trained depths), which must give exactly the reported acceptance
   rate if the cached draft levels compute what training computed.
4. Repeats the equality check on a randomly initialised model of the same config (acceptance near 0 expected).
5. Prints a summary, writes runs/mtp_speculative.json and runs/mtp_speculative.png (acceptance rate and
   tokens per round against k, trained and random). With --quick the files end in _quick and the run lives in
   runs/mtp_small_quick.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nemojax import config_files, data  # noqa: E402
from nemojax.infer.generate import generate  # noqa: E402
from nemojax.model import Model  # noqa: E402
from nemojax.train.loop import train  # noqa: E402
from nemojax.train.metrics import read_metrics  # noqa: E402

CONFIG = REPO_ROOT / "configs" / "mtp_small.py"
NUM_PROMPTS = 8
PROMPT_BYTES = (64, 200)


# ---------------------------------------------------------------------------------------------------- prompts


def held_out_prompts(config, count: int = NUM_PROMPTS, sizes: tuple[int, int] = PROMPT_BYTES) -> list[dict]:
    """`count` ASCII snippets of validation-split source files, lengths spread evenly over `sizes` bytes.

    Each snippet starts at the beginning of a non-blank, non-comment line about 40% into its file (so it is
    code, not the module docstring) and is cut at its byte length, usually mid-line.
    """
    dcfg = data.DataConfig(**dict(config.data))
    docs = data.documents(dcfg, "validation")
    order = sorted(range(len(docs)), key=lambda i: docs.keys[i])
    library = [i for i in order if "test" not in docs.keys[i]] or order
    lengths = np.linspace(sizes[0], sizes[1], count).round().astype(int).tolist()
    prompts: list[dict] = []
    stride = max(1, len(library) // (3 * count))
    for i in library[::stride] + library:
        if len(prompts) == count:
            break
        key = docs.keys[i]
        if any(p["key"] == key for p in prompts) or not data.is_validation(key, dcfg.val_fraction):
            continue
        want = lengths[len(prompts)]
        snippet = _snippet(docs[i], want)
        if snippet is not None:
            prompts.append({"key": key, "text": snippet, "bytes": want})
    if len(prompts) < count:
        raise RuntimeError(f"found only {len(prompts)} usable validation files for {count} prompts")
    return prompts


def _snippet(text: str, size: int) -> str | None:
    lines = text.splitlines(keepends=True)
    starts = np.cumsum([0] + [len(line) for line in lines])
    first = int(len(lines) * 0.4)
    for n in range(first, len(lines)):
        stripped = lines[n].strip()
        if not stripped or stripped.startswith(("#", '"', "'")):
            continue
        piece = text[starts[n]:starts[n] + size]
        if len(piece) == size and piece.isascii():
            return piece
    return None


# ---------------------------------------------------------------------------------------------------- decoding


def timed_generate(model: Model, ids: list[list[int]], *, max_new: int, speculative: int, repeats: int):
    """Runs generate once to compile, then `repeats` times; returns the last Generation and the best seconds."""
    kwargs = dict(max_new_tokens=max_new, eos_ids=[], speculative=speculative)
    generate(model, ids, **kwargs)
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, ids, **kwargs)
        best = min(best, time.perf_counter() - start)
    return out, best


def top2_margin(model: Model, prefix: list[int]) -> float:
    """Gap between the main model's two largest logits after `prefix` (a near-tie explains a flipped argmax)."""
    logits = np.asarray(model(jnp.asarray([prefix], jnp.int32))[0, -1])
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def mtp_guesses(model: Model, streams: list[list[int]]) -> list[np.ndarray]:
    """Teacher-forced MTP argmaxes on each token stream: per depth d, [b, width - depths] where entry [i, t] is
    depth d's guess for token t + d + 2 of stream i, reading the true stream (right padding never reaches earlier
    positions: the model is causal)."""
    width = max(len(s) for s in streams)
    batch = np.zeros((len(streams), width), np.int32)
    for i, s in enumerate(streams):
        batch[i, :len(s)] = s
    _, mtp_logits = model.with_mtp(jnp.asarray(batch))
    return [np.asarray(jnp.argmax(d_logits, axis=-1)) for d_logits in mtp_logits]


def mtp_top1(guesses: list[np.ndarray], streams: list[list[int]], prompt_lens: list[int], max_new: int,
             skip_space: bool = False) -> list[float]:
    """Per depth: the share of the first `max_new` generated tokens (those a draft can propose: all but the
    first) that the teacher-forced head predicts; `skip_space` leaves out whitespace bytes (runs of spaces are
    easy to guess and inflate the share)."""
    shares = []
    for d, guess in enumerate(guesses):
        hits = total = 0
        for i, s in enumerate(streams):
            for target in range(prompt_lens[i] + 1, prompt_lens[i] + max_new):
                if skip_space and s[target] < 256 and bytes([s[target]]).isspace():
                    continue
                hits += int(guess[i, target - d - 2] == s[target])
                total += 1
        shares.append(hits / max(total, 1))
    return shares


def simulated_acceptance(guesses: list[np.ndarray], streams: list[list[int]], prompt_lens: list[int], k: int,
                         max_new: int) -> float | None:
    """The acceptance rate speculative decoding must report if its cached draft levels compute what the training
    forward (`with_mtp`) computes: replays its rounds on the greedy streams with the teacher-forced guesses.

    A round with pending token n drafts token n + j (j = 1..k) with depth j - 1 at position n - 1; while every
    earlier draft was right, that level read the true tokens, so its draft is the teacher-forced guess. Needs
    k <= the trained depths (deeper levels reuse the last depth on its own output, which `with_mtp` does not
    compute) and streams at least k tokens longer than `max_new`; None for larger k.
    """
    if k > len(guesses):
        return None
    accepted = rounds = 0
    for i, s in enumerate(streams):
        n, count = prompt_lens[i], 1  # the prefill emits the first token (index n, pending)
        while count < max_new:
            a = 0
            while a < k and guesses[a][i, n - 1] == s[n + a + 1]:
                a += 1
            accepted, rounds = accepted + a, rounds + 1
            count, n = count + a + 1, n + a + 1
    return accepted / max(k * rounds, 1)


def check_model(name: str, model: Model, ids: list[list[int]], *, drafts: list[int], max_new: int,
                repeats: int) -> dict[str, Any]:
    """Greedy vs speculative decoding of `ids` for each k in `drafts`: equality, acceptance and speed."""
    print(f"[{name}] greedy decoding ...", flush=True)
    greedy, greedy_s = timed_generate(model, ids, max_new=max_new, speculative=0, repeats=repeats)
    new_tokens = sum(len(t) for t in greedy.tokens)
    # A greedy stream long enough for the last round's drafts, for the teacher-forced replay of the rounds.
    longer = generate(model, ids, max_new_tokens=max_new + max(drafts), eos_ids=[]).tokens
    if [t[:max_new] for t in longer] != greedy.tokens:
        raise RuntimeError("greedy decoding with more new tokens changed the first ones")
    streams = [p + t for p, t in zip(ids, longer, strict=True)]
    prompt_lens = [len(p) for p in ids]
    guesses = mtp_guesses(model, streams)
    result: dict[str, Any] = {
        "greedy": {"seconds": greedy_s, "new_tokens": new_tokens, "tokens_per_s": new_tokens / greedy_s},
        "speculative": {},
        "mtp_top1_on_greedy": mtp_top1(guesses, streams, prompt_lens, max_new),
        "mtp_top1_on_greedy_non_space": mtp_top1(guesses, streams, prompt_lens, max_new, skip_space=True),
        "greedy_tokens": greedy.tokens,
    }
    for k in drafts:
        print(f"[{name}] speculative k={k} ...", flush=True)
        spec, spec_s = timed_generate(model, ids, max_new=max_new, speculative=k, repeats=repeats)
        equal = [a == b for a, b in zip(greedy.tokens, spec.tokens, strict=True)]
        mismatches = []
        for i, ok in enumerate(equal):
            if not ok:
                g, s = greedy.tokens[i], spec.tokens[i]
                at = next((j for j, (x, y) in enumerate(zip(g, s, strict=False)) if x != y), min(len(g), len(s)))
                mismatches.append({"prompt": i, "index": at, "greedy": g[at:at + 8], "speculative": s[at:at + 8],
                                   "top2_margin": top2_margin(model, ids[i] + g[:at])})
        spec_tokens = sum(len(t) for t in spec.tokens)
        result["speculative"][k] = {
            "equal": equal, "passed": all(equal), "mismatches": mismatches,
            "acceptance_rate": spec.stats["acceptance_rate"], "tokens_per_round": spec.stats["tokens_per_round"],
            "acceptance_rate_replayed": simulated_acceptance(guesses, streams, prompt_lens, k, max_new),
            "rounds": spec.stats["rounds"], "seconds": spec_s, "new_tokens": spec_tokens,
            "tokens_per_s": spec_tokens / spec_s, "speedup": (spec_tokens / spec_s) / (new_tokens / greedy_s),
        }
        verdict = "PASS" if all(equal) else f"FAIL ({len(equal) - sum(equal)} of {len(equal)} prompts differ)"
        print(f"[{name}] k={k}: {verdict}; acceptance {spec.stats['acceptance_rate']:.3f}, "
              f"{spec.stats['tokens_per_round']:.2f} tokens/round", flush=True)
        for m in mismatches:
            print(f"    prompt {m['prompt']}: first difference at new token {m['index']}: greedy {m['greedy']} vs "
                  f"speculative {m['speculative']} (top-2 logit gap there {m['top2_margin']:.2e})", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------- report


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, style in (("trained", "o-"), ("random", "s--")):
        spec = results[name]["speculative"]
        ks = sorted(spec)
        left.plot(ks, [spec[k]["acceptance_rate"] for k in ks], style, label=name)
        right.plot(ks, [spec[k]["tokens_per_round"] for k in ks], style, label=name)
    ks = sorted(results["trained"]["speculative"])
    right.plot(ks, [k + 1 for k in ks], ":", color="gray", label="k + 1 (all accepted)")
    left.set(xlabel="draft tokens k", ylabel="acceptance rate", ylim=(0, 1), xticks=ks,
             title="accepted / proposed drafts")
    right.set(xlabel="draft tokens k", ylabel="tokens per round", ylim=(0, None), xticks=ks,
              title="tokens per verify forward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_block(report: dict) -> str:
    t = report["training"]
    lines = [
        "=" * 96,
        f"MTP speculative decoding = greedy: {report['config']} trained {t['steps']} steps in {report['workdir']} "
        f"({t['params'] / 1e6:.2f}M params, MTP head {t['mtp_params'] / 1e6:.2f}M, {t['mtp_depths']} depths)",
        f"validation loss {t['validation_loss']:.3f} nats/byte; last train nll {t['train_nll']:.3f}, MTP nll per "
        f"depth {', '.join(f'{x:.3f}' for x in t['train_mtp_nll'])}",
        f"{len(report['prompts'])} held-out prompts ({min(p['bytes'] for p in report['prompts'])}-"
        f"{max(p['bytes'] for p in report['prompts'])} bytes, validation-split files), {report['max_new_tokens']} "
        f"new tokens each, greedy, one batch; tokens/s after compilation, best of {report['repeats']}",
        "",
        "accept: accepted / proposed drafts, as generate reports it; replay: the same replayed from the teacher-",
        "forced MTP head (`with_mtp`) on the greedy stream (k <= trained depths): equal when the cached draft path",
        "computes what training computed. tok/round: generate's new tokens / rounds (the prefill's first token",
        "included); 1+k*acc: tokens one verify forward yields.",
        "",
        f"{'model':8} {'decode':8} {'equal':>6} {'accept':>7} {'replay':>7} {'tok/round':>9} {'1+k*acc':>8} "
        f"{'rounds':>7} {'tok/s':>8} {'vs greedy':>9}",
    ]
    for name in ("trained", "random"):
        r = report[name]
        g = r["greedy"]
        lines.append(f"{name:8} {'greedy':8} {'-':>6} {'-':>7} {'-':>7} {1.0:>9.2f} {1.0:>8.2f} {'-':>7} "
                     f"{g['tokens_per_s']:>8.1f} {1.0:>8.2f}x")
        for k, s in sorted(r["speculative"].items()):
            verdict = "PASS" if s["passed"] else "FAIL"
            replay = "-" if s["acceptance_rate_replayed"] is None else f"{s['acceptance_rate_replayed']:.3f}"
            lines.append(f"{name:8} {f'k={k}':8} {verdict:>6} {s['acceptance_rate']:>7.3f} {replay:>7} "
                         f"{s['tokens_per_round']:>9.2f} {1 + k * s['acceptance_rate']:>8.2f} {s['rounds']:>7.0f} "
                         f"{s['tokens_per_s']:>8.1f} {s['speedup']:>8.2f}x")
        shares = ", ".join(f"depth {d}: {x:.3f}" for d, x in enumerate(r["mtp_top1_on_greedy"]))
        lines.append(f"{'':8} MTP top-1 on the greedy stream (teacher-forced) {shares}")
        shares = ", ".join(f"depth {d}: {x:.3f}" for d, x in enumerate(r["mtp_top1_on_greedy_non_space"]))
        lines.append(f"{'':8}   the same on its non-whitespace bytes only        {shares}")
    verdict = ("overall: PASS (speculative output equals greedy for every prompt and k on both models)"
               if report["passed"] else "overall: FAIL (see the mismatches above)")
    lines += ["", verdict, "=" * 96]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 12 training steps, k = 1, 2, 32 tokens, one timed repeat")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's, 20 with --quick)")
    parser.add_argument("--draft", type=int, nargs="+", help="draft lengths k (default 1 2 3; 1 2 with --quick)")
    parser.add_argument("--max-new", type=int, help="new tokens per prompt (default 64; 32 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed runs per decode after the compiling one (default 2; 1 "
                        "with --quick)")
    parser.add_argument("--workdir", help="training workdir (default runs/mtp_small, runs/mtp_small_quick)")
    parser.add_argument("--out", help="output JSON (default runs/mtp_speculative.json, ..._quick.json)")
    args = parser.parse_args(argv)

    suffix = "_quick" if args.quick else ""
    workdir = Path(args.workdir or REPO_ROOT / "runs" / f"mtp_small{suffix}")
    out = Path(args.out or REPO_ROOT / "runs" / f"mtp_speculative{suffix}.json")
    drafts = args.draft or ([1, 2] if args.quick else [1, 2, 3])
    max_new = args.max_new or (32 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 2)
    overrides = []
    if args.steps or args.quick:
        steps = args.steps or 12
        overrides += [f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
    config = config_files.load(CONFIG, overrides)
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, config.train.steps // 4)

    started = time.perf_counter()
    trained = train(config, workdir, progress=True)
    train_seconds = time.perf_counter() - started
    model: Model = trained["model"]
    history = read_metrics(workdir)
    last_train = next(m for m in reversed(history) if m["split"] == "train")
    depths = model.config.mtp.num_layers
    mtp_nll = [last_train.get(f"mtp_nll_{d}", last_train.get("mtp_nll")) for d in range(depths)]
    print(f"trained: step {trained['summary']['steps']}, validation loss {trained['summary']['validation_loss']:.3f} "
          f"({train_seconds:.0f} s this invocation)", flush=True)

    prompts = held_out_prompts(config)
    tokenizer = data.ByteTokenizer()
    ids = [tokenizer.encode(p["text"]) for p in prompts]
    if min(len(p) for p in ids) <= max(drafts):
        raise ValueError(f"prompts must be longer than the largest k={max(drafts)}")

    started = time.perf_counter()
    results = {"trained": check_model("trained", model, ids, drafts=drafts, max_new=max_new, repeats=repeats)}
    random_model = Model.init(model.config, jax.random.key(config.train.seed + 1))
    # placed like the trained params, so the decode loops compiled for those are reused
    random_model = random_model.replace(params=jax.tree.map(lambda r, t: jax.device_put(r, t.sharding),
                                                            random_model.params, model.params))
    results["random"] = check_model("random", random_model, ids, drafts=drafts, max_new=max_new,
                                    repeats=repeats)
    decode_seconds = time.perf_counter() - started

    for r in results.values():
        texts = [tokenizer.decode(t) for t in r.pop("greedy_tokens")]
        r["greedy_texts"] = texts
        r["greedy_whitespace_share"] = sum(c.isspace() for t in texts for c in t) / max(sum(map(len, texts)), 1)
    report = {
        "config": str(CONFIG.relative_to(REPO_ROOT)), "workdir": str(workdir), "quick": args.quick,
        "max_new_tokens": max_new, "drafts": drafts, "repeats": repeats,
        "training": {
            "steps": trained["summary"]["steps"], "params": model.num_params,
            "mtp_params": sum(int(x.size) for x in jax.tree.leaves(model.params["mtp"])), "mtp_depths": depths,
            "validation_loss": trained["summary"]["validation_loss"], "train_nll": last_train["nll"],
            "train_mtp_nll": mtp_nll, "mtp_loss_weight": config.train.mtp_loss_weight,
            "seconds_this_invocation": train_seconds,
        },
        "prompts": [{**p, "tokens": len(i)} for p, i in zip(prompts, ids, strict=True)],
        **results,
        "passed": all(s["passed"] for r in results.values() for s in r["speculative"].values()),
        "decode_check_seconds": decode_seconds,
        "device": str(jax.devices()[0]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print()
    print(summary_block(report))
    print("trained model's greedy continuations (prompt tail | continuation):")
    for p, text in zip(prompts, report["trained"]["greedy_texts"], strict=True):
        print(f"  {p['text'][-40:]!r} | {text!r}")
    print(f"whitespace share of the continuations: trained {report['trained']['greedy_whitespace_share']:.2f}, "
          f"random {report['random']['greedy_whitespace_share']:.2f}")
    print(f"wrote {out} and {out.with_suffix('.png')}  (training {train_seconds:.0f} s, checks {decode_seconds:.0f} s)")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
