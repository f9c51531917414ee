"""Architecture search over prune targets under a parameter or memory budget: Minitron / Minitron-SSM / MiniPuzzle
(arXiv 2407.14679, 2504.11409, 2504.03624; the grid and the ranking follow ModelOpt's Minitron search,
NVIDIA/Model-Optimizer@a2fbac7:modelopt/torch/prune/plugins/mcore_minitron.py, "ModelOpt" below).

    cands = enumerate_candidates(model, budget_params=4e9, scores=scores)          # analytic, nothing sliced
    small, report = search(model, scores, budget_params=4e9, top=3, data=..., trial_steps=200)
    print(report.table())

The recipe of the papers in three steps:

1. `enumerate_candidates`: a grid over the prunable axes (hidden, layers, and each layer kind's width targets: ffn,
   heads, mamba_heads, mamba_head_dim, experts, expert_ffn, shared_ffn for the built-in kinds). Each grid point's
   config is built the way `prune` builds it (the same `ModelConfig.replace`, the same depth rule), shape only; its
   parameter count and its serving memory (`cache_bytes`: weights + KV + SSM + conv at `batch` x `context`) come
   from the public shape functions `param_count` and `cache_bytes`, evaluated on one- and two-layer configs per
   layer kind and width and summed over the candidate's pattern (a model is its non-layer params plus the sum of its
   layers, and both functions are additive over layers, so this equals the full count exactly; the tests check it
   against `prune`). With an MTP head, whose size depends on every width, the one-layer configs keep all widths
   (fewer cache hits, same result). Candidates over a budget are dropped, and so are those far below the primary
   budget (more than `slack` under it; the papers keep candidates near the budget), then ranked (below).
2. `search` prunes the top `top` candidates with `prune(model, scores, **candidate.targets)`.
3. ... and runs `trial(student, teacher=model, data, steps)` on each: lightweight retraining to stabilise the
   ranking (arXiv 2407.14679, best practice #9), by default a short `distill` scored by the held-out KL to the parent
   (or, without held-out data, the mean KL of the last quarter of the run). The lowest loss wins.

Default grid (ModelOpt: choices are multiples of a divisor; keep >= ~60% of a width, >= ~80% depth). Each kind
declares its axes' grids (`families.Axis`: fractions of the parent size and the multiple they round to); for the
built-in ones:
    hidden, ffn, expert_ffn   fractions (1, 7/8, 3/4, 5/8) of the parent size, rounded to the nearest multiple of
                              256 / 64 / 8 for sizes >= 2048 / >= 512 / smaller
    mamba_heads               the same fractions, rounded to a multiple of mamba.n_groups (group-aware, Minitron-SSM)
    mamba_head_dim            (1, 3/4), a multiple of 8 (2 for head_dim < 64): heads beat channels (arXiv 2504.11409)
    experts                   (1, 7/8, 3/4), a multiple of moe.n_group, at least what `prune` allows
    layers                    (1, 9/10, 8/10) of num_layers, only when `scores` has "layer/block": which layers go
                              decides the new pattern and so the cost
    heads, shared_ffn         not searched by default (the Nemotron-H recipes keep attention; ModelOpt skips heads);
                              pass them in `grid`
  A value equal to the parent's size means "keep" and is left out of `Candidate.targets`. A user `grid` maps an
  axis to a list of target sizes; every value is checked with `prune`'s rules (the same error messages). Axes not
  in `grid` keep.

Ranking heuristic (documented, deterministic): by the primary cost's fraction of its budget, in buckets of 1%,
descending (closest to the budget first, as ModelOpt sorts by the constraint metric); within a bucket, more layers
first (width beats depth at this scale, arXiv 2407.14679), then larger sizes of the axes a kind ranks first
(`Axis.rank`: mamba_head_dim, as pruning heads beats channels, arXiv 2504.11409), then larger hidden, then the
exact cost, then the sizes. The primary budget is `budget_params` when given, else `budget_bytes`; the other one
is a hard cap only.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nemojax import families
from nemojax.compress.prune import keep_top, prune, pruned_config, width_targets
from nemojax.config import ModelConfig
from nemojax.infer.memory import MemoryPlan, cache_bytes
from nemojax.kinds.pruning import WIDTH_FRACTIONS, hardware_multiple
from nemojax.model import Model, param_count

__all__ = ["Candidate", "SearchReport", "TrialResult", "default_grid", "distill_trial",
           "enumerate_candidates", "search"]

DEPTH_FRACTIONS = (1.0, 0.9, 0.8)
_RANK_BUCKET = 0.01

Trial = Callable[..., Any]


# ------------------------------------------------------------------------------------------------ candidate


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space: prune targets (only the axes that change; a missing axis keeps the parent's
    size), the config `prune` would produce, its parameter count and its serving memory (`cache_bytes` at the
    enumeration's batch/context/dtypes).
    """

    targets: dict[str, int] = dataclasses.field(default_factory=dict, hash=False)
    config: ModelConfig | None = dataclasses.field(default=None, compare=False, repr=False)
    params: int = 0
    memory: MemoryPlan | None = dataclasses.field(default=None, compare=False)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly: targets, params and memory parts in bytes."""
        mem = self.memory
        memory = None if mem is None else {"weights": mem.weights, "kv": mem.kv, "ssm": mem.ssm, "conv": mem.conv,
                                           "total": mem.total}
        return {"targets": self.targets, "params": self.params, "memory": memory}


# ------------------------------------------------------------------------------------------- axis rules


def _axes(cfg: ModelConfig, scores: Any = None) -> dict[str, families.Axis]:
    """Every axis `prune` can change in this model: hidden, each of its layer kinds' width targets (their Axis),
    and layers (grid only with "layer/block" scores: which layers go decides the new pattern and so the cost)."""
    axes = {"hidden": families.Axis(cfg.hidden_size, grid=WIDTH_FRACTIONS,
                                    grid_multiple=hardware_multiple(cfg.hidden_size))}
    for rule in {id(rule): rule for rule in width_targets(cfg).values()}.values():
        axes.update(rule.axes(cfg))
    depth = DEPTH_FRACTIONS if _layer_scores(cfg, scores) is not None else ()
    axes["layers"] = families.Axis(cfg.num_layers, grid=depth)
    return axes


def _snap(axis: families.Axis) -> list[int]:
    """Each grid fraction of the axis' full size, rounded to the nearest multiple of its grid multiple (and of
    multiple_of), clamped to what prune accepts; descending."""
    step = math.lcm(axis.grid_multiple or axis.multiple_of, axis.multiple_of)
    low = -(-max(axis.minimum, step) // step) * step
    values = set()
    for f in axis.grid:
        v = int(math.floor(f * axis.full / step + 0.5)) * step
        values.add(axis.full if v >= axis.full else min(axis.full, max(low, v)))
    return sorted(values, reverse=True)


def default_grid(model: Model | ModelConfig, scores: Any = None) -> dict[str, list[int]]:
    """The default search grid of a model (module docstring): every axis whose Axis has grid fractions; "layers"
    only when `scores` has "layer/block"."""
    cfg = _config(model)
    grid = {name: _snap(axis) for name, axis in _axes(cfg, scores).items() if axis.grid}
    return {name: values for name, values in grid.items() if len(values) > 1}


def _config(model: Model | ModelConfig) -> ModelConfig:
    if isinstance(model, Model):
        return model.config
    if isinstance(model, ModelConfig):
        return model
    raise ValueError(f"model={type(model).__name__} is invalid: must be a nemojax Model or ModelConfig")


def _layer_scores(cfg: ModelConfig, scores: Any) -> np.ndarray | None:
    if scores is None:
        return None
    try:
        value = scores["layer/block"]
    except (KeyError, IndexError, TypeError):
        getter = getattr(scores, "get", None)
        value = getter("layer/block") if callable(getter) else None
    if value is None:
        return None
    array = np.asarray(value, np.float64)
    if array.shape != (cfg.num_layers,):
        raise ValueError(f"scores['layer/block'] has shape {list(array.shape)}, expected [{cfg.num_layers}]")
    return array


def _check_grid(cfg: ModelConfig, grid: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not isinstance(grid, Mapping):
        raise ValueError(f"grid={grid!r} is invalid: must be a dict axis -> list of target sizes")
    out, axes = {}, _axes(cfg)
    for axis, values in grid.items():
        if axis not in axes:
            raise ValueError(f"grid[{axis!r}] is invalid: the model (pattern {cfg.pattern!r}) has the axes "
                             f"{sorted(axes)}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"grid[{axis!r}]={values!r} is invalid: must be a list of target sizes")
        values = [axes[axis].check(f"grid[{axis!r}] value", v) for v in values]
        if not values:
            raise ValueError(f"grid[{axis!r}] is empty: give at least one target size")
        out[axis] = sorted(set(values), reverse=True)
    return out


# ------------------------------------------------------------------------------------------ shape-only cost


def _candidate_config(cfg: ModelConfig, t: Mapping[str, int | None], layer_scores: np.ndarray | None) -> ModelConfig:
    """The config `prune(model, scores, **t)` returns (`pruned_config`; nothing is sliced)."""
    widths = {axis: value for axis, value in t.items() if axis not in ("hidden", "layers")}
    pattern = None
    if t.get("layers") is not None:
        if layer_scores is None:
            raise ValueError("grid['layers'] needs scores with 'layer/block' (depth pruning keeps the highest-scoring "
                             "layers, which decides the new pattern and its cost); pass scores=")
        pattern = "".join(cfg.pattern[i] for i in keep_top(layer_scores, t["layers"]))
    return pruned_config(cfg, hidden=t.get("hidden"), pattern=pattern, **widths)




@functools.lru_cache(maxsize=4096)
def _pair_costs(one: ModelConfig, batch: int, context: int, dtype: str, weight_dtype: str
                ) -> tuple[np.ndarray, np.ndarray]:
    """(layer, base) cost vectors [params, weights, kv, ssm, conv] from the one- and two-layer configs."""
    two = one.replace(pattern=one.pattern * 2)

    def cost(c: ModelConfig) -> np.ndarray:
        plan = cache_bytes(c, batch, context, dtype=dtype, weight_dtype=weight_dtype)
        return np.array([param_count(c), plan.weights, plan.kv, plan.ssm, plan.conv], np.int64)

    c1, c2 = cost(one), cost(two)
    return c2 - c1, 2 * c1 - c2


def _costs(cfg: ModelConfig, parent: ModelConfig, batch: int, context: int, dtype: str,
           weight_dtype: str) -> tuple[int, MemoryPlan]:
    """param_count(cfg) and cache_bytes(cfg, ...) as the non-layer part plus the sum over its layers."""
    total = None
    for kind in dict.fromkeys(cfg.pattern):
        one = cfg.replace(pattern=kind)
        if cfg.mtp is None:  # only the kind's own widths (and hidden) matter: share the cache across candidates
            own = {families.kind(c).config_field for c in type(cfg).KINDS} - {None}
            keep = {f: getattr(parent, f) for f in own if f != families.kind(kind).config_field}
            one = one.replace(**keep)
        layer, base = _pair_costs(one, batch, context, dtype, weight_dtype)
        part = cfg.pattern.count(kind) * layer
        total = base + part if total is None else total + part
    n, weights, kv, ssm, conv = (int(x) for x in total)
    return n, MemoryPlan(weights=weights, kv=kv, ssm=ssm, conv=conv)


# -------------------------------------------------------------------------------------------- enumeration


def _check_budget(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: must be a positive number (or None)")
    return float(value)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name}={value!r} is invalid: must be a positive integer")
    return int(value)


def _rank_key(c: Candidate, primary: str, budget: float, axes: Mapping[str, families.Axis]) -> tuple:
    cost = c.params if primary == "params" else c.memory.total
    bucket = math.floor(cost / budget / _RANK_BUCKET + 1e-9)
    size = {name: c.targets.get(name, axis.full) for name, axis in axes.items()}
    ranked = sorted((name for name, axis in axes.items() if axis.rank > 0), key=lambda n: (-axes[n].rank, n))
    return (-bucket, -size["layers"], *(-size[n] for n in ranked), -size["hidden"], -cost,
            tuple(-size[n] for n in sorted(size)))


def enumerate_candidates(model: Model | ModelConfig, *, budget_params: float | None = None,
                         budget_bytes: float | None = None, context: int = 4096, batch: int = 1,
                         dtype: str = "bfloat16", weight_dtype: str | None = None, grid: Mapping | None = None,
                         scores: Any = None, slack: float | None = 0.1) -> list[Candidate]:
    """The grid points within the budget(s), near the primary one, best-ranked first (module docstring).

    budget_params: most parameters; budget_bytes: most serving bytes (`cache_bytes(config, batch, context,
    dtype=dtype, weight_dtype=weight_dtype).total`; weight_dtype defaults to `dtype`). At least one budget is
    required; the primary one is budget_params when given. slack: keep only candidates whose primary cost is at
    least (1 - slack) * budget (None keeps every candidate under the budget). grid: axis -> target sizes (default
    `default_grid(model, scores)`). scores: only "layer/block" is read, to know which layers depth pruning drops.
    Raises ValueError naming the field: no budget, a bad budget/slack/grid value, or no candidate in the window.
    """
    cfg = _config(model)
    budget_params = _check_budget("budget_params", budget_params)
    budget_bytes = _check_budget("budget_bytes", budget_bytes)
    if budget_params is None and budget_bytes is None:
        raise ValueError("budget_params and budget_bytes are both None: give at least one budget")
    if slack is not None and (isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 0 <= slack < 1):
        raise ValueError(f"slack={slack!r} is invalid: must be a fraction in [0, 1) or None")
    context = _check_positive_int("context", context)
    batch = _check_positive_int("batch", batch)
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    layer_scores = _layer_scores(cfg, scores)
    grid = default_grid(cfg, scores) if grid is None else _check_grid(cfg, grid)

    primary, budget = ("params", budget_params) if budget_params is not None else ("bytes", budget_bytes)
    axes = list(grid)
    rules = _axes(cfg)
    fulls = {axis: rules[axis].full for axis in axes}
    kept: list[Candidate] = []
    smallest = largest_fit = None
    for values in itertools.product(*(grid[a] for a in axes)):
        targets = {a: v for a, v in zip(axes, values, strict=True) if v != fulls[a]}
        ccfg = _candidate_config(cfg, targets, layer_scores)
        n, plan = _costs(ccfg, cfg, batch, context, dtype, weight_dtype)
        cost = n if primary == "params" else plan.total
        smallest = cost if smallest is None else min(smallest, cost)
        if budget_params is not None and n > budget_params:
            continue
        if budget_bytes is not None and plan.total > budget_bytes:
            continue
        largest_fit = cost if largest_fit is None else max(largest_fit, cost)
        if slack is not None and cost < (1 - slack) * budget:
            continue
        kept.append(Candidate(targets, config=ccfg, params=n, memory=plan))
    if not kept:
        field = "budget_params" if primary == "params" else "budget_bytes"
        unit = "params" if primary == "params" else "bytes"
        if largest_fit is None:
            other = " (with budget_bytes)" if primary == "params" and budget_bytes is not None else ""
            raise ValueError(f"{field}={budget:g}: no candidate fits the budget{other}; the grid's smallest "
                             f"candidate has {smallest:,} {unit}. Extend the grid to smaller sizes")
        raise ValueError(f"{field}={budget:g}: no candidate within slack={slack} of the budget (the largest "
                         f"that fits has {largest_fit:,} {unit}, {largest_fit / budget:.1%}); raise slack or refine "
                         "the grid")
    kept.sort(key=lambda c: _rank_key(c, primary, budget, rules))
    return kept


# ------------------------------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One tried candidate: its rank in the candidate list, the trial loss (lower is better)."""

    rank: int
    candidate: Candidate
    loss: float


@dataclasses.dataclass(frozen=True)
class SearchReport:
    """Every tried candidate in rank order; `best` indexes `trials`."""

    trials: tuple[TrialResult, ...]
    best: int

    @property
    def best_candidate(self) -> Candidate:
        return self.trials[self.best].candidate

    def rows(self) -> list[dict[str, Any]]:
        """JSON-friendly rows: rank, targets, params, memory (bytes by part), loss, best."""
        return [{"rank": t.rank, **t.candidate.summary(), "loss": t.loss, "best": i == self.best}
                for i, t in enumerate(self.trials)]

    def table(self) -> str:
        lines = [f"{'rank':>4} {'params':>14} {'memory GiB':>11} {'loss':>10}  targets"]
        for i, t in enumerate(self.trials):
            c = t.candidate
            mem = c.memory.total / 2**30 if c.memory is not None else float("nan")
            mark = " *" if i == self.best else ""
            lines.append(f"{t.rank:>4} {c.params:>14,d} {mem:>11.4f} {t.loss:>10.4f}  {c.targets}{mark}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _eval_batches(data: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in data:
        if isinstance(batch, Mapping):
            tokens = np.asarray(batch["tokens"])
            mask = np.asarray(batch.get("loss_mask", np.ones_like(tokens)), np.float32)
        else:
            tokens = np.asarray(batch)
            mask = np.ones(tokens.shape, np.float32)
        if tokens.ndim != 2:
            raise ValueError(f"eval_data batch tokens must be [B, L], got shape {list(tokens.shape)}")
        yield tokens, mask


def distill_trial(student: Model, teacher: Model, data: Any, steps: int, *, eval_data: Iterable | None = None,
                  config: Any = None) -> tuple[Model, float]:
    """The default trial: `distill(student, teacher, data, steps, config)`, scored by the held-out forward
    KL(teacher || student) per token on `eval_data` (a list of [B, L] token arrays or batch dicts with
    "tokens"/"loss_mask"), or, without it, by the mean "kl" of the last quarter of the run. Returns (trained
    student, loss)."""
    from nemojax.compress.distill import DistillConfig, distill, kl_per_token  # distill pulls in the trainer

    trained, history = distill(student, teacher, data, steps=steps,
                               config=DistillConfig() if config is None else config)
    if eval_data is None:
        tail = history[-max(1, len(history) // 4):]
        return trained, float(np.mean([h["kl"] for h in tail]))
    total = count = 0.0
    for tokens, mask in _eval_batches(eval_data):
        kl = np.asarray(kl_per_token(trained(tokens), teacher(tokens)))  # [B, L]
        total += float(np.sum(kl * mask))
        count += float(np.sum(mask))
    if count == 0:
        raise ValueError("eval_data has no scored tokens (empty, or every loss_mask is 0)")
    return trained, total / count


def search(model: Model, scores: Any, *, budget_params: float | None = None, budget_bytes: float | None = None,
           candidates: Sequence[Candidate] | None = None, top: int = 3, trial_steps: int = 100, data: Any = None,
           trial: Trial | None = None, eval_data: Iterable | None = None, context: int = 4096, batch: int = 1,
           dtype: str = "bfloat16", weight_dtype: str | None = None, grid: Mapping | None = None,
           slack: float | None = 0.1) -> tuple[Model, SearchReport]:
    """Prune the `top` best-ranked candidates, score each with a short trial, keep the lowest loss.

    candidates: a ranked list (e.g. from `enumerate_candidates`, possibly filtered); default: enumerate with the
    budgets, context, batch, dtype, weight_dtype, grid and slack given here. scores: as for `prune`.
    trial(student, teacher, data, steps) -> loss, or (trained student, loss); default `distill_trial` with
    `eval_data` (needs `data`, which every trial reads from the start: a list of batches or a DataConfig).
    Returns (the winner: the trial's trained student when the trial returns one, else the pruned student;
    a SearchReport of every tried candidate). Non-finite trial losses count as +inf.
    """
    top = _check_positive_int("top", top)
    trial_steps = _check_positive_int("trial_steps", trial_steps)
    if candidates is None:
        candidates = enumerate_candidates(model, budget_params=budget_params, budget_bytes=budget_bytes,
                                          context=context, batch=batch, dtype=dtype, weight_dtype=weight_dtype,
                                          grid=grid, scores=scores, slack=slack)
    candidates = list(candidates)
    if not candidates:
        raise ValueError("candidates is empty: nothing to search")
    bad = [c for c in candidates if not isinstance(c, Candidate)]
    if bad:
        raise ValueError(f"candidates must be Candidate values, got {type(bad[0]).__name__}")
    chosen = candidates[:top]
    if trial is None:
        if data is None:
            raise ValueError("data is None: the default trial (distill_trial) needs training data; pass data= or "
                             "a trial= function")
        if isinstance(data, Iterator) and len(chosen) > 1:
            raise ValueError("data is a one-shot iterator: every trial must read the same data; pass a list of "
                             "batches or a nemojax DataConfig")
        trial = functools.partial(distill_trial, eval_data=list(eval_data) if eval_data is not None else None)

    results, winners = [], []
    for rank, cand in enumerate(chosen):
        student = prune(model, scores, **cand.targets)
        if cand.config is not None and student.config != cand.config:
            raise RuntimeError(f"candidate {cand.targets}: prune produced a config different from the enumerated "
                               "one (the scores' 'layer/block' may differ from those given to enumerate_candidates)")
        out = trial(student, teacher=model, data=data, steps=trial_steps)
        trained, loss = out if isinstance(out, tuple) else (student, out)
        loss = float(loss)
        results.append(TrialResult(rank=rank, candidate=cand, loss=loss if math.isfinite(loss) else math.inf))
        winners.append(trained)
    best = min(range(len(results)), key=lambda i: (results[i].loss, i))
    if not math.isfinite(results[best].loss):
        raise ValueError(f"every trial loss was non-finite for the {len(results)} tried candidates")
    return winners[best], SearchReport(trials=tuple(results), best=best)
