"""Per-phase decoding of an elastic model (Star Elastic, arXiv 2605.07182): the thinking block is decoded by a
smaller nested submodel and the answer, after the end-of-thinking tag, by a larger one of the same weights.

    out = elastic.generate(em, prompts, thinking_budget_model=0.75, answer_budget_model=1.0, think_end="</think>",
                           tokenizer=tok, max_new_tokens=512)
    out.tokens[i][:out.switch[i]]        # thinking, "</think>" included: the 0.75 submodel's
    out.tokens[i][out.switch[i]:]        # the answer: the full model's
    out = elastic.generate(em, prompts, transplant=True, ...);  out.transplant["agreement"]

Two phases, each one run of `nemojax.infer.generate.decode_loop` with a `MaskedView` (the submodel's sizes are
traced, so both phases share compilations where their shapes agree):

1. The thinking submodel decodes every prompt until it emits `think_end` (a stop sequence of this phase), an EOS,
   a stop sequence, or `max_new_tokens`. Generation is taken to start inside the thinking block.
2. Every row that ended on `think_end` with tokens left switches, at its own position, to the answer submodel,
   which decodes at most the row's remaining tokens (the whole batch runs, for static shapes: a row that does not
   switch re-reads its prompt only and produces nothing):
   - re-prefill (default, what the paper does): a fresh prefill of the row's whole text so far (prompt,
     thinking, `think_end`), then decoding. Greedy, the output is token for token that of the thinking model run
     to `think_end` followed by the answer model run on the whole text.
   - transplant=True: the thinking model's caches are reused as they are (both submodels are the full-size params
     under masks, so the shapes agree): the answer model reads the last token of `think_end` on top of them and
     continues. The re-prefill answer is computed too, as the reference of `transplant["agreement"]`: the fraction
     of answer positions where the transplanted run's token equals the re-prefill run's (positions past the end of
     the shorter of the two count as different), over all switched rows.

Memory: the weights are em.model's only, and no phase copies them: a submodel is the full-size params with its
dead channels zeroed on the activations (`nemojax.elastic.masked`). The thinking phase's cache is kept for the
answer phase only with transplant=True.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.elastic.count import check_sizes, keep_weights
from nemojax.elastic.masked import collection
from nemojax.elastic.model import ElasticModel
from nemojax.infer.budget import ThinkingBudget
from nemojax.infer.generate import Generation, decode_loop, pad_prompts, prepare, result
from nemojax.infer.stopping import StopSequences

__all__ = ["ElasticGeneration", "MaskedView", "generate"]


@dataclasses.dataclass(frozen=True)
class MaskedView:
    """A nested submodel as a view for `nemojax.infer.generate` (its `view=`): the full-size params of an
    importance-ordered model, unchanged, and the "elastic" collection of the prefix masks of `sizes` (the view_args:
    {axis: int32 array}, per layer for a heterogeneous axis; `nemojax.elastic.masked`). Hashable, so one compiled
    loop serves every submodel of the same model."""

    removal_order: tuple[int, ...] = ()

    def __call__(self, config: Any, params: Mapping, sizes: Mapping[str, Any]) -> tuple[dict, dict]:
        return params, collection(config, sizes, removal_order=self.removal_order)


@dataclasses.dataclass
class ElasticGeneration(Generation):
    """A `Generation` plus, per prompt, `switch[i]`: the index in tokens[i] of the first token the answer model
    chose (tokens[i][:switch[i]] is the thinking model's, think_end included), or None where the row never
    switched (it ended inside the thinking block); `sizes`: {"thinking": sizes, "answer": sizes} of the two
    submodels; `transplant`: with transplant=True, {"agreement": float or None (no row switched), "matching",
    "compared": token counts, "first_divergence": per prompt the first answer position where the two runs differ
    (None: no difference, or no switch), "reprefill_tokens": per prompt the re-prefill run's answer}."""

    switch: list[int | None] = dataclasses.field(default_factory=list)
    sizes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    transplant: dict[str, Any] | None = None


# ---------------------------------------------------------------------------------------------- checks


def _submodel_sizes(em: ElasticModel, name: str, value: Any) -> dict[str, Any]:
    """The sizes of `value`: a budget in (0, 1] (the routers' choice, `em.sizes`) or explicit {axis: size}."""
    if isinstance(value, Mapping):
        sizes = dict(value)
        check_sizes(em.config, sizes)
        if "depth" in sizes:
            keep_weights(np, em.config, sizes["depth"], em.removal_order)
        return sizes
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
            or not 0 < float(value) <= 1:
        raise ValueError(f"{name}={value!r} is invalid: must be a budget in (0, 1] (a fraction of the full "
                         f"{em.target}) or explicit sizes {{axis: size}}")
    return em.sizes(float(value))


def _think_end_ids(think_end: Any, tokenizer: Any, vocab: int) -> tuple[int, ...]:
    """think_end as token ids: a string is encoded with `tokenizer` (special tokens allowed), an int is one id, a
    sequence of ints is the ids."""
    if isinstance(think_end, str):
        if tokenizer is None:
            raise ValueError(f"think_end={think_end!r} is a string: pass tokenizer= to encode it, or give its token "
                             "id(s)")
        ids = [int(i) for i in tokenizer.encode(think_end, allow_special=True)]
    elif isinstance(think_end, int | np.integer) and not isinstance(think_end, bool):
        ids = [int(think_end)]
    elif isinstance(think_end, Sequence | np.ndarray) and not isinstance(think_end, bytes) \
            and all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in think_end):
        ids = [int(i) for i in think_end]
    else:
        raise ValueError(f"think_end={think_end!r} is invalid: must be a string (with tokenizer=), a token id or a "
                         "list of token ids")
    if not ids or any(not 0 <= i < vocab for i in ids):
        raise ValueError(f"think_end={think_end!r} is not in the vocabulary: its ids {ids} must be one or more "
                         f"token ids in [0, vocab_size={vocab})")
    return tuple(ids)


def _thinking_budget(value: Any, think_ids: tuple[int, ...]) -> ThinkingBudget | None:
    """An int N: force think_end after N thinking tokens (no grace, no newline wait); a ThinkingBudget must end
    with think_end itself, or the forced tag would not switch models."""
    if value is None or isinstance(value, ThinkingBudget):
        if value is not None and value.end_ids != think_ids:
            raise ValueError(f"thinking_budget.end_ids={value.end_ids} differ from think_end's ids {think_ids}: "
                             "the forced tag must be the one that switches models")
        return value
    # Every row starts inside the thinking block (prompt_open), so start_ids are never matched: think_end fills in.
    return ThinkingBudget(value, end_ids=think_ids, start_ids=think_ids, grace=0)


def _traced(sizes: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Sizes as int32 arrays, the traced view_args of `MaskedView` (one compilation for every submodel)."""
    return {axis: jnp.asarray(value, jnp.int32) for axis, value in sizes.items()}


# ---------------------------------------------------------------------------------------------- the phases


def _switched(thinking: Sequence[int], think_ids: tuple[int, ...], eos: Sequence[int]) -> bool:
    n = len(think_ids)
    return len(thinking) >= n and tuple(thinking[-n:]) == think_ids and thinking[-1] not in eos


def _answers(out: Any, count: Any) -> list[list[int]]:
    out, count = np.asarray(out), np.asarray(count)
    return [out[i, :count[i]].tolist() for i in range(len(count))]


def _agreement(answers: Sequence[list[int]], reference: Sequence[list[int]]) -> dict[str, Any]:
    matching = compared = 0
    first = []
    for a, r in zip(answers, reference, strict=True):
        same = [x == y for x, y in zip(a, r, strict=False)]
        matching += sum(same)
        compared += max(len(a), len(r))
        diverge = next((j for j, s in enumerate(same) if not s), None)
        first.append(len(same) if diverge is None and len(a) != len(r) else diverge)
    return {"agreement": matching / compared if compared else None, "matching": matching, "compared": compared,
            "first_divergence": first}


def generate(em: ElasticModel, prompts: Any, *, thinking_budget_model: float | Mapping[str, Any] = 0.75,
             answer_budget_model: float | Mapping[str, Any] = 1.0, transplant: bool = False,
             think_end: str | int | Sequence[int] = "</think>", max_new_tokens: int = 64, tokenizer: Any = None,
             eos_ids: Sequence[int] | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop: Sequence[str | Sequence[int]] = (), thinking_budget: int | ThinkingBudget | None
             = None, allow_special: bool = False) -> ElasticGeneration:
    """Decodes the thinking block of each prompt with the submodel of `thinking_budget_model` and the answer with
    that of `answer_budget_model` (module docstring), up to `max_new_tokens` in all.

    *_budget_model: a budget in (0, 1] (the routers' choice, `ElasticModel.sizes`) or explicit {axis: size}.
    think_end: the end-of-thinking tag: a string (encoded with `tokenizer`), a token id or ids. thinking_budget:
    force think_end after that many thinking tokens (an int: exactly N, `nemojax.infer.budget`), or a
    ThinkingBudget whose end_ids are think_end's. prompts, tokenizer, eos_ids, temperature, top_k, top_p, seed,
    stop, allow_special: as `nemojax.infer.generate.generate` takes them (the answer phase samples with the seed's
    key folded with 1). Returns an `ElasticGeneration` (.text, .reasoning and .answer filled with a tokenizer).

    Raises ValueError naming the argument: a budget outside (0, 1] or sizes the model lacks, a think_end the
    vocabulary lacks, and whatever `generate` refuses.
    """
    config = em.config
    small = _submodel_sizes(em, "thinking_budget_model", thinking_budget_model)
    large = _submodel_sizes(em, "answer_budget_model", answer_budget_model)
    think_ids = _think_end_ids(think_end, tokenizer, config.vocab_size)
    budget = _thinking_budget(thinking_budget, think_ids)
    request = prepare(config, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, tokenizer=tokenizer, eos_ids=eos_ids, stop=stop,
                      allow_special=allow_special)
    dcfg = request.dcfg
    thinking_cfg = dataclasses.replace(dcfg, stops=StopSequences(dcfg.stops.sequences + (think_ids,)), budget=budget)
    view, params = MaskedView(em.removal_order), em.model.params
    key = jax.random.key(int(seed))
    b, L = request.tokens.shape
    start = time.perf_counter()

    # The cache always comes back (it costs no compute), so both modes share the thinking phase's compilation.
    out1, count1, cache = decode_loop(config, params, jnp.asarray(request.tokens), jnp.asarray(request.lengths),
                                      jnp.ones((b,), bool), key, dcfg=thinking_cfg, max_len=L + max_new_tokens,
                                      view=view, view_args=_traced(small), return_cache=True)
    if not transplant:
        cache = None  # freed before the answer phase
    thinking = _answers(out1, count1)
    switch = [len(t) if _switched(t, think_ids, dcfg.eos_ids) else None for t in thinking]
    # The answer phase runs the whole batch (static shapes: one compilation per prompt bucket); a row that does
    # not switch, or has no tokens left, gets limit 0 and produces nothing.
    left = [max_new_tokens - s if s is not None else 0 for s in switch]
    rows = [i for i in range(b) if left[i] > 0]
    answers: dict[int, list[int]] = {}
    report, prefilled = None, 0
    if rows:
        limit, answer_key, large_args = jnp.asarray(left, jnp.int32), jax.random.fold_in(key, 1), _traced(large)
        texts = [request.ids[i] + (thinking[i] if left[i] else []) for i in range(b)]
        tokens, lengths = pad_prompts(texts, dcfg.pad_id)
        prefilled = int(sum(lengths[i] for i in rows))
        reference = _answers(*decode_loop(
            config, params, jnp.asarray(tokens), jnp.asarray(lengths), jnp.zeros((b,), bool), answer_key,
            dcfg=dcfg, max_len=tokens.shape[1] + max_new_tokens, view=view, view_args=large_args, limit=limit))
        answers = {i: reference[i] for i in rows}
        if transplant:
            # each row's cache holds its prompt and thinking but for the last token, which the answer model reads
            last = jnp.asarray([[t[-1] if t else dcfg.pad_id] for t in thinking], jnp.int32)
            moved = _answers(*decode_loop(
                config, params, last, jnp.ones((b,), jnp.int32), jnp.zeros((b,), bool), answer_key, dcfg=dcfg,
                max_len=L + max_new_tokens, view=view, view_args=large_args, cache=cache, limit=limit))
            answers = {i: moved[i] for i in rows}
            report = _agreement([moved[i] for i in rows], [reference[i] for i in rows])
            report["first_divergence"] = [report["first_divergence"][rows.index(i)] if i in rows else None
                                          for i in range(b)]
            report["reprefill_tokens"] = [reference[i] if i in rows else None for i in range(b)]
    if transplant and report is None:
        report = {"agreement": None, "matching": 0, "compared": 0, "first_divergence": [None] * b,
                  "reprefill_tokens": [None] * b}
    seconds = time.perf_counter() - start

    new = [thinking[i] + answers.get(i, []) for i in range(b)]
    stats = {"thinking_tokens": float(sum(len(t) for t in thinking)),
             "answer_tokens": float(sum(len(a) for a in answers.values())), "reprefill_tokens": float(prefilled)}
    out = result(request, new, seconds, stats)
    if tokenizer is not None:
        n = len(think_ids)
        out.reasoning = [tokenizer.decode(t[:s - n] if s is not None else t) for t, s in zip(thinking, switch,
                                                                                             strict=True)]
        out.answer = [tokenizer.decode(answers.get(i, [])) for i in range(b)]
    return ElasticGeneration(**{f.name: getattr(out, f.name) for f in dataclasses.fields(Generation)},
                             switch=switch, sizes={"thinking": small, "answer": large}, transplant=report)
