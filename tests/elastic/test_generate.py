"""Per-phase decoding (nemojax.elastic.generate): the thinking block from the small nested model, the answer from the
large one. Greedy, its output is the small model (extracted, a plain Model) run to the end-of-thinking token, then
the large model run from a fresh prefill of the whole text, token for token; each row switches at its own step.
Transplanting the caches runs and reports its agreement with the re-prefill run."""

from __future__ import annotations

import numpy as np
import pytest

import nemojax
from nemojax import elastic
from nemojax.elastic.generate import MaskedView, generate
from tests.elastic.test_permute import _f32, _model_and_scores

PROMPTS = [[1, 5, 9, 33, 2], [7, 8], [100, 200, 300, 400, 17, 18, 19, 20, 21]]
MAX_NEW = 12
SMALL, LARGE = 0.5, 1.0


@pytest.fixture(scope="module")
def em():
    model, scores = _model_and_scores(_f32("nemotron-h-8b-tiny"), 3)  # 'M-M*-MM-'
    return elastic.elastify(model, scores, budgets=(1.0, 0.75, 0.5), removal_order=(5, 2), key=1)


@pytest.fixture(scope="module")
def oracle(em):
    """(think_end, the small model's free run, the expected tokens and switch positions) from plain Models."""
    assert em.sizes(SMALL) != em.sizes(LARGE)  # two different submodels (the routers are untrained)
    small, large = em.extract(SMALL), em.extract(LARGE)
    free = nemojax.generate(small, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[]).tokens
    think_end = free[0][4]  # a token the small model emits early in some rows, at different steps, but not in all
    # the small model stopped at think_end: greedy, its free run cut after the first think_end
    thinking = [row[:row.index(think_end) + 1] if think_end in row else row for row in free]
    rows = [i for i, t in enumerate(thinking) if t[-1] == think_end and len(t) < MAX_NEW]
    answers = nemojax.generate(large, [PROMPTS[i] + thinking[i] for i in rows], max_new_tokens=MAX_NEW,
                               eos_ids=[]).tokens
    # greedy rows are independent, so each row's answer of MAX_NEW - switch tokens is a prefix of this run's
    expected = [list(t) for t in thinking]
    for i, answer in zip(rows, answers, strict=True):
        expected[i] += answer[:MAX_NEW - len(thinking[i])]
    switch = [len(t) if i in rows else None for i, t in enumerate(thinking)]
    return think_end, free, expected, switch


def test_output_is_small_model_to_think_end_then_large_model_from_a_fresh_prefill(em, oracle):
    think_end, _, expected, switch = oracle
    assert switch[2] is None and len({s for s in switch if s is not None}) == 2  # rows switch at their own steps
    out = generate(em, PROMPTS, thinking_budget_model=SMALL, answer_budget_model=LARGE, think_end=think_end,
                   max_new_tokens=MAX_NEW, eos_ids=[])
    assert out.tokens == expected
    assert out.switch == switch
    assert out.finish_reason == ["length"] * 3
    assert out.sizes == {"thinking": em.sizes(SMALL), "answer": em.sizes(LARGE)}
    assert out.transplant is None
    assert out.stats["thinking_tokens"] == sum(s or MAX_NEW for s in switch)


def test_a_masked_view_on_infer_generate_decodes_the_extracted_submodel(em, oracle):
    sizes = {axis: np.int32(size) for axis, size in em.sizes(SMALL).items()}
    out = nemojax.generate(em.model, PROMPTS, max_new_tokens=MAX_NEW, eos_ids=[], view=MaskedView(em.removal_order),
                           view_args=sizes)
    assert out.tokens == oracle[1]


def test_transplant_runs_and_reports_its_agreement(em, oracle):
    think_end, _, expected, switch = oracle
    out = generate(em, PROMPTS, thinking_budget_model=SMALL, answer_budget_model=LARGE, think_end=think_end,
                   max_new_tokens=MAX_NEW, eos_ids=[], transplant=True)
    report = out.transplant
    assert out.switch == switch
    answers = [t[s:] for t, s in zip(out.tokens, switch, strict=True) if s is not None]
    reference = [t[s:] for t, s in zip(expected, switch, strict=True) if s is not None]
    assert [r for r in report["reprefill_tokens"] if r is not None] == reference  # the re-prefill run is the oracle
    matching = sum(a == r for ans, ref in zip(answers, reference, strict=True) for a, r in zip(ans, ref, strict=True))
    assert report["compared"] == sum(len(r) for r in reference)
    assert report["matching"] == matching and report["agreement"] == pytest.approx(matching / report["compared"])
    assert 0.0 <= report["agreement"] <= 1.0
    # both phases on one submodel: the caches it built step by step continue exactly like a fresh prefill
    same = generate(em, PROMPTS, thinking_budget_model=SMALL, answer_budget_model=SMALL, think_end=think_end,
                    max_new_tokens=MAX_NEW, eos_ids=[], transplant=True)
    assert same.transplant["agreement"] == 1.0
    assert same.tokens == oracle[1]  # the small model throughout: its free run


def test_a_thinking_budget_forces_the_switch(em, oracle):
    free = oracle[1]
    never = next(t for t in range(512) if all(t not in row for row in free))
    out = generate(em, PROMPTS, thinking_budget_model=SMALL, answer_budget_model=LARGE, think_end=never,
                   max_new_tokens=MAX_NEW, eos_ids=[], thinking_budget=2)
    assert out.switch == [3, 3, 3]
    assert [t[:3] for t in out.tokens] == [row[:2] + [never] for row in free]


@pytest.mark.parametrize("kwargs, match", [
    ({"thinking_budget_model": 0.0}, r"thinking_budget_model=0.0 is invalid: must be a budget in \(0, 1\]"),
    ({"answer_budget_model": 1.5}, r"answer_budget_model=1.5 is invalid: must be a budget in \(0, 1\]"),
    ({"thinking_budget_model": {"experts": 4}}, r"sizes\['experts'\] is invalid: the model .* has no such axis"),
    ({"think_end": 512}, r"think_end=512 is not in the vocabulary"),
    ({"think_end": []}, r"think_end=\[\] is not in the vocabulary"),
    ({"think_end": "</think>"}, "think_end='</think>' is a string: pass tokenizer="),
    ({"think_end": 3, "thinking_budget": nemojax.infer.ThinkingBudget(4, end_ids=(4,), start_ids=(5,))},
     r"thinking_budget.end_ids=\(4,\) differ from think_end's ids \(3,\)"),
])
def test_bad_input_is_refused_by_name(em, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(em, PROMPTS, **{"think_end": 3, **kwargs})
