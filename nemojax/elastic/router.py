"""Budget routers of Nemotron Elastic (arXiv 2511.16664 sec. 3): one small MLP per elastic axis maps a budget code
to logits over the axis's size choices; Gumbel-softmax samples a choice whose probability carries the gradient;
the router loss pulls the expected cost of the sampled architecture to the budget.

    routers = init_routers(key, choices, budgets=(1.0, 0.75, 0.5))
    code = budget_code((1.0, 0.75, 0.5), 0.75)                            # [0, 1, 0]
    logits = router_logits(routers, code, step, schedule)                 # {axis: [|choices|]}
    picks = sample_all(logits, gumbel_key(key, step, dp_rank), schedule.tau(step), hard=False)
    loss = router_loss(config, {a: pi for a, (_, pi, _) in picks.items()}, choices, 0.75)

Choices follow the official Megatron code where the paper leaves room: LeakyReLU slope 0.1, no biases but an
optional last-layer one, normal(0.1) init, a logit scale rising linearly 1 -> 10 over training, a two-hot budget
code for an unseen budget, the 5% dead zone and the full-budget pull of the loss. Routers run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.elastic.count import KINDS, count

__all__ = ["Schedule", "budget_code", "check_budgets", "expected_sizes", "gumbel_key", "init_routers",
           "keep_probabilities", "router_logits", "router_loss", "sample", "sample_all"]

f32 = jnp.float32
LEAKY_SLOPE = 0.1
GLOBAL_AXES = ("hidden", "depth")  # one choice for the whole model, also in heterogeneous mode
TAU_FORMS = ("linear", "exponential")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The router's schedules over `steps` training steps.

    scale(t): the logit multiplier, linear from scale_start to scale_end (paper: 1 -> 10), held after the end.
    tau(t): the Gumbel-softmax temperature: "linear" from tau_start to tau_end (paper: 1.0 -> 0.05), or
    "exponential" tau_start * tau_decay**t (the official code's form, defaults 1.0 and 0.9999), floored at tau_end.
    """

    steps: int
    scale_start: float = 1.0
    scale_end: float = 10.0
    tau_start: float = 1.0
    tau_end: float = 0.05
    tau_form: str = "linear"
    tau_decay: float = 0.9999

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise ValueError(f"Schedule.steps={self.steps!r} is invalid: must be a positive integer")
        if self.tau_form not in TAU_FORMS:
            raise ValueError(f"Schedule.tau_form={self.tau_form!r} is invalid: must be one of {TAU_FORMS}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"Schedule.tau_end={self.tau_end!r} is invalid: must be in (0, tau_start="
                             f"{self.tau_start}]")
        if not 0 < self.tau_decay <= 1:
            raise ValueError(f"Schedule.tau_decay={self.tau_decay!r} is invalid: must be in (0, 1]")

    def _progress(self, step: Any) -> jax.Array:
        return jnp.clip(jnp.asarray(step, f32) / max(self.steps - 1, 1), 0.0, 1.0)

    def scale(self, step: Any) -> jax.Array:
        return self.scale_start + (self.scale_end - self.scale_start) * self._progress(step)

    def tau(self, step: Any) -> jax.Array:
        if self.tau_form == "linear":
            return self.tau_start + (self.tau_end - self.tau_start) * self._progress(step)
        # decay**t as exp(t * log(decay)) with the log taken in float64: 0.9999 itself is not exact in float32
        decayed = self.tau_start * jnp.exp(jnp.asarray(step, f32) * math.log(self.tau_decay))
        return jnp.maximum(decayed, self.tau_end)


# ---------------------------------------------------------------------------------------------- budgets


def check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    """The trained budgets (fractions of the full cost) as floats: non-empty, strictly descending, in (0, 1]."""
    values = tuple(float(b) for b in budgets)
    if not values or any(not 0 < b <= 1 for b in values) or any(a <= b for a, b in zip(values, values[1:],
                                                                                        strict=False)):
        raise ValueError(f"budgets={tuple(budgets)!r} is invalid: must be fractions of the full cost in (0, 1], "
                         "strictly descending (e.g. (1.0, 0.75, 0.5))")
    return values


def budget_code(budgets: Sequence[float], budget: float) -> jax.Array:
    """The router input [len(budgets)] float32 for `budget`: one-hot for a trained budget; for one between two
    trained budgets, the two-hot linear interpolation of theirs; 1.0 when not trained maps to the largest trained
    budget, and any budget above the largest (below the smallest) to the largest (smallest). ValueError naming
    `budget` outside (0, 1]."""
    values = check_budgets(budgets)
    b = float(budget)
    if not 0 < b <= 1:
        raise ValueError(f"budget={budget!r} is invalid: must be a fraction of the full cost in (0, 1]")
    code = np.zeros(len(values), np.float32)
    near = [i for i, v in enumerate(values) if math.isclose(v, b, rel_tol=1e-9, abs_tol=1e-12)]
    if near or b > values[0]:
        code[near[0] if near else 0] = 1.0
    elif b < values[-1]:
        code[-1] = 1.0
    else:
        hi = max(i for i, v in enumerate(values) if v > b)  # values[hi] > b > values[hi + 1]
        w = (values[hi] - b) / (values[hi] - values[hi + 1])
        code[hi], code[hi + 1] = 1.0 - w, w
    return jnp.asarray(code)


# ---------------------------------------------------------------------------------------------- routers


def init_routers(key: jax.Array, choices: Mapping[str, Sequence[int]], budgets: Sequence[float], *,
                 hidden: int = 256, heterogeneous: bool = False, layer_counts: Mapping[str, int] | None = None,
                 std: float = 0.1, last_bias: float | None = None) -> dict[str, dict[str, jax.Array]]:
    """One 2-layer MLP per axis of `choices`: {axis: {"W1": [len(budgets), hidden], "W2": [hidden, C] or
    [hidden, n_layers, C], and "b2" ([C] or [n_layers, C]) when last_bias is given}}, C = len(choices[axis]).

    heterogeneous: every width axis but "hidden" (and "depth") gets one choice per layer of its kind; n_layers from
    `layer_counts` ({axis: layers}, e.g. `nemojax.elastic.choices.layer_counts(config)`). Weights ~ normal(std);
    last_bias: the last-layer bias is added, `last_bias` on the last choice (the smallest size) and 0 elsewhere."""
    n_budgets = len(check_budgets(budgets))
    if heterogeneous and layer_counts is None:
        raise ValueError("layer_counts is required with heterogeneous=True: {axis: number of layers of its kind}, "
                         "e.g. nemojax.elastic.choices.layer_counts(config)")
    routers = {}
    for i, (axis, sizes) in enumerate(choices.items()):
        shape: tuple[int, ...] = (len(sizes),)
        if heterogeneous and axis not in GLOBAL_AXES:
            if axis not in layer_counts or layer_counts[axis] <= 0:
                raise ValueError(f"layer_counts[{axis!r}] is missing or not positive: heterogeneous routers need "
                                 "the number of layers of each axis's kind")
            shape = (int(layer_counts[axis]), len(sizes))
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        router = {"W1": std * jax.random.normal(k1, (n_budgets, hidden), f32),
                  "W2": std * jax.random.normal(k2, (hidden, *shape), f32)}
        if last_bias is not None:
            router["b2"] = jnp.zeros(shape, f32).at[..., -1].set(last_bias)
        routers[axis] = router
    return routers


def router_logits(routers: Mapping[str, Mapping[str, jax.Array]], code: jax.Array, step: Any,
                  schedule: Schedule) -> dict[str, jax.Array]:
    """{axis: z [C] or [n_layers, C]}: h = LeakyReLU_0.1(code @ W1), z = (h @ W2 (+ b2)) * schedule.scale(step).
    code: [len(budgets)] (`budget_code`)."""
    scale = schedule.scale(step)
    out = {}
    for axis, router in routers.items():
        h = jax.nn.leaky_relu(jnp.einsum("u,uh->h", code.astype(f32), router["W1"]), LEAKY_SLOPE)
        z = jnp.einsum("h,h...->...", h, router["W2"])
        if "b2" in router:
            z = z + router["b2"]
        out[axis] = z * scale
    return out


# ---------------------------------------------------------------------------------------------- sampling


def gumbel_key(key: jax.Array, step: Any, dp_rank: Any = 0) -> jax.Array:
    """fold_in(fold_in(key, step), dp_rank): each step and each data-parallel rank samples its own architecture."""
    return jax.random.fold_in(jax.random.fold_in(key, step), dp_rank)


def sample(logits: jax.Array, key: jax.Array | None = None, tau: Any = 1.0,
           hard: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gumbel-softmax over the last axis of logits [..., C] -> (index [...] int, pi [..., C], multiplier [...]).

    pi = softmax((z + g) / tau), g ~ Gumbel(0, 1); index = argmax pi; multiplier = pi[index], which the masked
    forward multiplies its kept activations by: the path of the router's gradient. hard: straight-through, pi is
    one_hot(index) in value with the soft gradient (so the multiplier is 1 in value). key None (inference): index
    = argmax z, pi = one_hot(index), multiplier 1, no gradient."""
    logits = logits.astype(f32)
    C = logits.shape[-1]
    if key is None:
        index = jnp.argmax(logits, axis=-1)
        return index, jax.nn.one_hot(index, C, dtype=f32), jnp.ones(index.shape, f32)
    soft = jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape, f32)) / tau, axis=-1)
    index = jnp.argmax(soft, axis=-1)
    pi = jax.nn.one_hot(index, C, dtype=f32) + soft - jax.lax.stop_gradient(soft) if hard else soft
    return index, pi, jnp.take_along_axis(pi, index[..., None], axis=-1)[..., 0]


def sample_all(logits: Mapping[str, jax.Array], key: jax.Array | None, tau: Any = 1.0,
               hard: bool = False) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """`sample` for every axis, with its own key fold_in(key, i) for the i-th axis in sorted name order."""
    order = {axis: i for i, axis in enumerate(sorted(logits))}
    return {axis: sample(z, None if key is None else jax.random.fold_in(key, order[axis]), tau, hard)
            for axis, z in logits.items()}


# ---------------------------------------------------------------------------------------------- expected cost


def keep_probabilities(pi_depth: jax.Array, drops: Sequence[int], removal_order: Sequence[int],
                       num_layers: int) -> jax.Array:
    """gamma [num_layers]: the probability that each layer is kept when `drops[j]` layers (the first of
    removal_order) are dropped with probability pi_depth[j]. The k-th layer of removal_order goes when more than k
    are dropped; a layer outside it always stays."""
    order = [int(i) for i in removal_order]
    if max(drops) > len(order):
        raise ValueError(f"removal_order has {len(order)} layers but the depth choices drop up to {max(drops)}")
    dropped_after = np.asarray([[d > k for d in drops] for k in range(len(order))], np.float32)  # [len(order), C]
    gamma = jnp.ones((num_layers,), f32)
    if order:
        gamma = gamma.at[jnp.asarray(order)].set(1.0 - dropped_after @ pi_depth.astype(f32))
    return gamma


def expected_sizes(pi: Mapping[str, jax.Array], choices: Mapping[str, Sequence[int]], *,
                   removal_order: Sequence[int] | None = None, num_layers: int | None = None) -> dict[str, jax.Array]:
    """{axis: sum_i pi_i * choices[axis][i]}: a float scalar per homogeneous axis, [n_layers] per heterogeneous
    one. "depth": the keep probabilities [num_layers] (`keep_probabilities`) when removal_order and num_layers are
    given (what `count` takes), else the expected number of dropped layers (a scalar, for logging)."""
    out = {}
    for axis, p in pi.items():
        if axis == "depth" and removal_order is not None:
            if num_layers is None:
                raise ValueError("num_layers is required with removal_order (the keep probabilities cover every layer)")
            out[axis] = keep_probabilities(p, choices[axis], removal_order, num_layers)
        else:
            out[axis] = jnp.einsum("...c,c->...", p.astype(f32), jnp.asarray(choices[axis], f32))
    return out


def router_loss(config: Any, pi: Mapping[str, jax.Array], choices: Mapping[str, Sequence[int]], budget: float, *,
                target: str = "params", removal_order: Sequence[int] = (), tolerance: float = 0.05,
                full_pull: float = 10.0, **count_options: Any) -> jax.Array:
    """The budget loss of the official Nemotron Elastic code, differentiable in pi ({axis: [C] or [n_layers, C]}).

    diff = |P(expected sizes) / (budget * P_full) - 1|, P = `count(config, ..., kind=target)` (count_options:
    context, batch, dtype, weight_dtype, mtp for target "memory"). For budget != 1, a diff under `tolerance` is 0
    (the dead zone). For budget == 1, plus full_pull * MSE(pi, one_hot(0)) summed over the axes: the full budget
    is pulled to the full architecture (index 0 of every axis)."""
    if target not in KINDS:
        raise ValueError(f"target={target!r} is invalid: must be one of {KINDS}")
    b = float(budget)
    if not 0 < b <= 1:
        raise ValueError(f"budget={budget!r} is invalid: must be a fraction of the full cost in (0, 1]")
    unknown = sorted(set(pi) - set(choices))
    if unknown:
        raise ValueError(f"pi has axes {unknown} that choices lacks (choices: {sorted(choices)})")
    sizes = expected_sizes(pi, choices, removal_order=removal_order, num_layers=config.num_layers)
    cost = count(config, sizes, kind=target, removal_order=removal_order, **count_options)
    full = count(config, {}, kind=target, **count_options)
    diff = jnp.abs(cost / (b * full) - 1.0)
    if b != 1.0:
        return jnp.where(diff < tolerance, 0.0, diff)
    pull = sum(jnp.mean(jnp.square(p.astype(f32) - jax.nn.one_hot(0, p.shape[-1], dtype=f32))) for p in pi.values())
    return diff + full_pull * pull
