"""nemojax.generate: greedy decoding equals transformers' `generate` token for token; per-sequence EOS and stop
sequences; seeded sampling; streaming; the thinking budget inside the jitted loop; text in and out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nemojax
from nemojax import presets
from nemojax.data.tokenizers import ByteTokenizer
from nemojax.infer.budget import ThinkingBudget
from nemojax.infer.generate import generate
from tests.hf_reference import perturbed, reference_model

PROMPT_LENGTHS = (6, 19, 12)


def _model(preset: str, **changes) -> nemojax.Model:
    cfg = presets.get(preset).replace(runtime={"dtype": "float32", "param_dtype": "float32"}, mtp=None, **changes)
    return perturbed(nemojax.Model.init(cfg, 0))


def _prompts(vocab: int, seed: int = 1, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def dense() -> nemojax.Model:
    return _model("nemotron-h-8b-tiny")


@pytest.mark.parametrize("preset", ["nemotron-h-8b-tiny", "nemotron-3-super-120b-a12b-tiny"])
def test_greedy_matches_transformers_generate(preset: str) -> None:
    """20 new tokens for 3 prompts of lengths 6, 19, 12 in one batch (transformers left-pads with an attention
    mask; nemojax right-pads and decodes each sequence at its own position): identical tokens."""
    model = _model(preset)
    hf = reference_model(model)
    prompts = _prompts(model.config.vocab_size)
    L = max(PROMPT_LENGTHS)
    ids = np.zeros((3, L), np.int64)
    mask = np.zeros((3, L), np.int64)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = p, 1
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=20,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    out = generate(model, prompts, max_new_tokens=20, eos_ids=[])
    assert out.tokens == ref[:, L:].numpy().tolist()
    assert out.finish_reason == ["length"] * 3


def test_eos_and_stop_sequences_end_each_sequence_alone(dense: nemojax.Model) -> None:
    prompts = _prompts(dense.config.vocab_size)
    free = generate(dense, prompts, max_new_tokens=16, eos_ids=[]).tokens
    eos = free[0][4]
    out = generate(dense, prompts, max_new_tokens=16, eos_ids=[eos])
    for new, ref in zip(out.tokens, free, strict=True):
        end = ref.index(eos) + 1 if eos in ref else len(ref)
        assert new == ref[:end]
    assert out.finish_reason[0] == "eos"
    stop = free[2][6:8]  # a two-token stop sequence from sequence 2's output
    out = generate(dense, prompts, max_new_tokens=16, eos_ids=[], stop=[stop])
    assert out.tokens[2] == free[2][:8] and out.finish_reason[2] == "stop"
    assert out.tokens[0] == free[0][:len(out.tokens[0])]


def test_sampling_is_seeded_and_top_k_1_is_greedy(dense: nemojax.Model) -> None:
    prompts = _prompts(dense.config.vocab_size)
    greedy = generate(dense, prompts, max_new_tokens=10, eos_ids=[]).tokens
    a = generate(dense, prompts, max_new_tokens=10, eos_ids=[], temperature=1.0, seed=3).tokens
    b = generate(dense, prompts, max_new_tokens=10, eos_ids=[], temperature=1.0, seed=3).tokens
    c = generate(dense, prompts, max_new_tokens=10, eos_ids=[], temperature=1.0, seed=4).tokens
    assert a == b and a != c and a != greedy
    assert generate(dense, prompts, max_new_tokens=10, eos_ids=[], temperature=1.0, top_k=1).tokens == greedy


def test_stream_delivers_every_token_in_order(dense: nemojax.Model) -> None:
    prompts = _prompts(dense.config.vocab_size, lengths=(5, 9))
    seen: list[tuple[int, list[int], list[bool]]] = []
    out = generate(dense, prompts, max_new_tokens=7, eos_ids=[],
                   stream=lambda step, tokens, active: seen.append((step, tokens.tolist(), active.tolist())))
    assert [s for s, _, _ in seen] == list(range(7))
    for i, new in enumerate(out.tokens):
        assert [tokens[i] for _, tokens, active in seen if active[i]] == new


def _replay_budget(tokens: list[int], end: tuple[int, ...], newline: set[int], budget: int, grace: int) -> int:
    """Where the budget rule puts the end tag in a stream generated inside an open thinking block: before the
    first token at which count >= budget and (the last token was a newline or count >= budget + grace)."""
    for count in range(len(tokens) + 1):
        last_newline = count > 0 and tokens[count - 1] in newline
        if count >= budget and (last_newline or count >= budget + grace):
            return count
        if tuple(tokens[count:count + len(end)]) == end:
            return -1  # the model ended thinking by itself
    return -2


@pytest.mark.parametrize("budget,grace", [(0, 0), (3, 4), (6, 2)])
def test_thinking_budget_forces_the_end_tag_exactly(dense: nemojax.Model, budget: int, grace: int) -> None:
    """Prompts that end inside an open thinking block; end tag (7, 8); "newline" tokens are the ids divisible
    by 5, so some rows end at a newline inside the grace window and others at the hard limit budget + grace.
    The tag starts exactly where the rule says, at most budget + grace tokens in, and is complete."""
    end = (7, 8)
    newline = {t for t in range(dense.config.vocab_size) if t % 5 == 0}
    cfg = ThinkingBudget(budget=budget, end_ids=end, start_ids=(5, 6), newline_ids=tuple(sorted(newline)),
                         grace=grace)
    prompts = _prompts(dense.config.vocab_size, seed=7, lengths=(4, 8, 11, 6))
    out = generate(dense, prompts, max_new_tokens=budget + grace + 6, eos_ids=[], thinking_budget=cfg,
                   prompt_open=[True] * 4)
    free = generate(dense, prompts, max_new_tokens=budget + grace + 6, eos_ids=[])
    reasons = set()
    for new, ref in zip(out.tokens, free.tokens, strict=True):
        at = _replay_budget(ref, end, newline, budget, grace)
        assert at >= 0
        assert new[:at] == ref[:at] and tuple(new[at:at + 2]) == end
        assert at <= budget + grace
        reasons.add("hard" if at == budget + grace else "newline")
    if budget == 3:
        assert reasons == {"hard", "newline"}  # both branches of the rule ran


def test_text_in_and_out_with_stop_strings(dense: nemojax.Model) -> None:
    model = _model("nemotron-h-8b-tiny", vocab_size=260)
    tok = ByteTokenizer()
    free = generate(model, ["def f(x):", "import o"], tokenizer=tok, max_new_tokens=12, eos_ids=[])
    assert free.text == [tok.decode(t) for t in free.tokens]
    stop = free.text[0][3:5]
    cut = generate(model, ["def f(x):", "import o"], tokenizer=tok, max_new_tokens=12, eos_ids=[], stop=[stop])
    assert cut.text[0] == free.text[0][:free.text[0].find(stop)] and cut.finish_reason[0] == "stop"


def test_bad_requests_are_refused(dense: nemojax.Model) -> None:
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(dense, [], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        generate(dense, [[3], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(dense, [[3, dense.config.vocab_size]], max_new_tokens=4)
    with pytest.raises(ValueError, match="tokenizer="):
        generate(dense, ["text"], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(dense, [[3]], max_new_tokens=0)
