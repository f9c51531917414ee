"""Generation: prefill a batch of prompts, then a jit-compiled `lax.while_loop` of decode steps.

    out = nemojax.generate(model, [[1, 5, 9], [1, 7]], max_new_tokens=32)          # token ids in and out
    out = nemojax.generate(model, ["def f("], tokenizer=tok, temperature=0.7, top_p=0.95, seed=1)
    out.tokens, out.text, out.finish_reason, out.stats

Prompts of different lengths are right-padded to a shared bucket and prefilled together; each sequence then
decodes at its own position (per-sequence cache lengths, docs/numerics.md 2), so nothing about a sequence depends on
its neighbours. Every step runs inside the loop: sampling (greedy, temperature, top-k, top-p, repetition
penalty), the thinking budget (forcing the end-of-thinking tag), EOS / stop-sequence detection per sequence, and
the optional streaming callback. The loop ends when every sequence is done or `max_new_tokens` is reached.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nemojax.config import ModelConfig
from nemojax.infer import budget as budget_lib
from nemojax.infer.cache import Cache, init_cache
from nemojax.infer.decode_config import DecodeConfig, finished
from nemojax.infer.extend import DECODE_COMPILER_OPTIONS, extend, logits, logits_at, prefill
from nemojax.infer.sampling import SamplingConfig, mark_seen, sample, seen_from_prompts
from nemojax.infer.speculative import generate_speculative
from nemojax.infer.stopping import StopSequences

PROMPT_BUCKET = 32  # prompts are padded to a multiple of this, so nearby lengths share one compilation

# The loop's streaming callback is a static jit argument; a fixed forwarder keeps every user callback from
# compiling the loop anew. `generate` points the sink at the caller's function for the duration of one call.
_stream_sink: list[Callable | None] = [None]


def forward_stream(step, tokens, active) -> None:
    if _stream_sink[0] is not None:
        _stream_sink[0](int(step), np.asarray(tokens), np.asarray(active))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    cache: Cache
    logits: jax.Array  # [b, V] float32, for the token about to be chosen
    step: jax.Array  # () int32, tokens chosen so far
    out: jax.Array  # [b, max_new] int32
    count: jax.Array  # [b] int32, tokens each sequence produced (its output length)
    done: jax.Array  # [b] bool
    seen: jax.Array  # [b, V] bool (repetition penalty) or [b, 0]
    budget: Any  # budget_lib state or None
    key: jax.Array


def _choose(state: LoopState, dcfg: DecodeConfig) -> jax.Array:
    """The next token of every sequence: sampled, or forced by the thinking budget, or pad once done."""
    seen = state.seen if dcfg.sampling.repetition_penalty != 1.0 else jnp.zeros(state.logits.shape, bool)
    token = sample(state.logits, seen, dcfg.sampling, jax.random.fold_in(state.key, state.step))
    if dcfg.budget is not None:
        force, forced = budget_lib.forced_tokens(state.budget, dcfg.budget)
        token = jnp.where(force, forced, token)
    return jnp.where(state.done, dcfg.pad_id, token).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "dcfg", "max_len", "stream", "view", "return_cache"),
                   compiler_options=DECODE_COMPILER_OPTIONS)
def decode_loop(config: ModelConfig, params: dict, tokens: jax.Array, lengths: jax.Array, prompt_open: jax.Array,
                key: jax.Array, *, dcfg: DecodeConfig, max_len: int,
                stream: Callable[..., None] | None = None, view: Callable | None = None, view_args: Any = None,
                cache: Cache | None = None, limit: jax.Array | None = None,
                return_cache: bool = False) -> tuple[jax.Array, ...]:
    """tokens: [b, L] right-padded prompts, lengths: [b], prompt_open: [b] bool (prompt ends inside <think>)
    -> (new tokens [b, max_new_tokens] int32 padded with pad_id, their counts [b] int32[, final cache]).

    view: decode with `view(config, params, view_args) -> (params, elastic collection)` instead of `params` (see
    `generate`); a static argument, so a hashable callable (e.g. a frozen dataclass), while view_args (a pytree of
    arrays, e.g. a submodel's sizes) is traced: one compilation serves every value of it.
    cache: extend `tokens` onto this cache instead of prefilling them into an empty one of `max_len` (which is then
    unused); the repetition penalty sees only `tokens`. limit: [b] int32, each row's own cap on its new tokens
    (at most dcfg.max_new_tokens; a row of limit 0 produces nothing). return_cache: also return the final cache,
    in which every row holds exactly the tokens it committed: its prompt and every token it produced except the
    last (a finished row commits nothing).
    """
    b, _ = tokens.shape
    run_params, collection = (params, None) if view is None else view(config, params, view_args)
    if cache is None:
        first_logits, cache = prefill(config, run_params, tokens, lengths, init_cache(config, b, max_len),
                                      collection)
    else:
        hidden, cache = extend(config, run_params, tokens, cache, lengths, elastic=collection)
        first_logits = logits_at(config, run_params, hidden, lengths - 1)
    V = first_logits.shape[-1]
    seen = seen_from_prompts(tokens, lengths, V) if dcfg.sampling.repetition_penalty != 1.0 \
        else jnp.zeros((b, 0), bool)
    budget = None if dcfg.budget is None else budget_lib.init_budget_state(dcfg.budget, b, prompt_open)
    done = jnp.zeros((b,), bool) if limit is None else limit <= 0
    state = LoopState(cache, first_logits, jnp.zeros((), jnp.int32),
                      jnp.full((b, dcfg.max_new_tokens), dcfg.pad_id, jnp.int32), jnp.zeros((b,), jnp.int32),
                      done, seen, budget, key)

    def body(s: LoopState) -> LoopState:
        token = _choose(s, dcfg)
        active = ~s.done
        out = s.out.at[:, s.step].set(token)
        count = s.count + active.astype(jnp.int32)
        done = s.done | (active & finished(token, out, count, dcfg))
        if limit is not None:
            done |= count >= limit
        seen = mark_seen(s.seen, token) if s.seen.shape[1] else s.seen
        budget = s.budget if dcfg.budget is None else budget_lib.update_budget(s.budget, token, dcfg.budget)
        if stream is not None:
            jax.debug.callback(stream, s.step, token, active, ordered=True)

        def advance(_):
            # A finished row commits nothing: its cache stays the state after its own tokens (return_cache).
            hidden, cache = extend(config, run_params, token[:, None], s.cache, (~done).astype(jnp.int32),
                                   elastic=collection)
            return logits(config, run_params, hidden[:, 0]), cache

        # The last token needs no forward pass of its own.
        next_logits, cache = jax.lax.cond(jnp.all(done), lambda _: (s.logits, s.cache), advance, None)
        return LoopState(cache, next_logits, s.step + 1, out, count, done, seen, budget, s.key)

    final = jax.lax.while_loop(lambda s: (s.step < dcfg.max_new_tokens) & ~jnp.all(s.done), body, state)
    return (final.out, final.count, final.cache) if return_cache else (final.out, final.count)


@dataclasses.dataclass
class Generation:
    """The result of `generate`: per prompt, its new tokens (EOS or stop tokens included), the text when a
    tokenizer was given (stop strings and special tokens removed), why it stopped ("eos", "stop", "length"), and
    run statistics. `nemojax.infer.chat.chat` also splits each reply at its thinking tags: `reasoning` (the text
    of the thinking block, None when the reply has none) and `answer` (the rest), which `text` runs together when
    the tags are special tokens."""

    tokens: list[list[int]]
    text: list[str] | None
    finish_reason: list[str]
    stats: dict[str, float]
    reasoning: list[str | None] | None = None
    answer: list[str] | None = None


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int,
                bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads token-id prompts to a shared multiple of `bucket`: ([b, L] int32, lengths [b] int32)."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if lengths.min() == 0:
        raise ValueError(f"prompts[{int(lengths.argmin())}] is empty: every prompt needs at least one token")
    L = -(-int(lengths.max()) // bucket) * bucket
    tokens = np.full((len(prompts), L), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = np.asarray(p, np.int32)
    return tokens, lengths


def _finish_reason(tokens: list[int], eos: Sequence[int], stops: StopSequences) -> str:
    if tokens and tokens[-1] in eos:
        return "eos"
    if any(len(s) <= len(tokens) and tuple(tokens[-len(s):]) == s for s in stops.sequences):
        return "stop"
    return "length"


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """(text up to the first of `stop_strings`, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _check_token_id(name: str, value, vocab: int) -> None:
    """Raises ValueError unless `value` is an int in [0, vocab): an id outside the vocabulary would index the
    embedding out of bounds (jnp gathers clamp or fill silently) and corrupt every sequence it pads or ends."""
    if not _is_int(value) or not 0 <= value < vocab:
        raise ValueError(f"{name}={value!r} is invalid: must be an int token id in [0, vocab_size={vocab})")


def _check_seed(seed) -> None:
    if not _is_int(seed) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r} is invalid: must be an int in [0, 2**63)")


def _token_ids(name: str, prompt, vocab: int) -> list[int]:
    """One prompt as a list of ints in [0, vocab); floats (even whole ones), bools and nested lists are refused, as
    truncating them to ints would silently change the prompt."""
    if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | np.ndarray | jax.Array):
        raise ValueError(f"{name}={prompt!r} is invalid: must be a sequence of int token ids "
                         "(prompts is a list of prompts, e.g. [[1, 5, 9]])")
    if isinstance(prompt, np.ndarray | jax.Array):
        if prompt.ndim != 1 or not (np.issubdtype(prompt.dtype, np.integer) and prompt.dtype != bool):
            raise ValueError(f"{name} is a {prompt.dtype} array of shape {tuple(prompt.shape)}: must be 1-D integer "
                             "token ids")
        prompt = np.asarray(prompt).tolist()
    if len(prompt) == 0:
        raise ValueError(f"{name} is empty: it needs at least one token id")
    bad = [t for t in prompt if not _is_int(t)]
    if bad:
        raise ValueError(f"{name} holds {bad[:5]!r}: token ids must be ints (not floats, bools or lists)")
    out = [int(t) for t in prompt]
    outside = [t for t in out if not 0 <= t < vocab]
    if outside:
        raise ValueError(f"{name} has token ids {outside[:5]} outside the vocabulary [0, {vocab})")
    return out


def _prompt_ids(prompts, tokenizer, allow_special: bool, vocab: int) -> list[list[int]]:
    """The prompts of `generate` as checked token-id lists: a string, a list of strings (encoded with `tokenizer`),
    a list of token-id lists, or a [b, L] integer array."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, np.ndarray | jax.Array):
        if prompts.ndim != 2:
            raise ValueError(f"prompts is an array of shape {tuple(prompts.shape)}: must be [b, L] token ids")
        prompts = list(prompts)
    if isinstance(prompts, bytes) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts={prompts!r} is invalid: must be a string, a list of strings or a list of "
                         "token-id lists")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if any(isinstance(p, str) for p in prompts):
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts mixes strings and token ids: give all strings or all token-id lists")
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer= to encode them (or give token ids)")
        encode = (lambda t: tokenizer.encode(t, allow_special=True)) if allow_special else tokenizer.encode
        prompts = [list(encode(p)) for p in prompts]
    return [_token_ids(f"prompts[{i}]", p, vocab) for i, p in enumerate(prompts)]


def _eos_ids(eos_ids, vocab: int, name: str) -> tuple[int, ...]:
    if isinstance(eos_ids, str | bytes) or not isinstance(eos_ids, Sequence | np.ndarray):
        raise ValueError(f"eos_ids={eos_ids!r} is invalid: must be a list of int token ids (e.g. [2], or [] for none)")
    for i, e in enumerate(eos_ids):
        _check_token_id(name if name == "tokenizer.eos_id" else f"{name}[{i}]", e, vocab)
    return tuple(int(e) for e in eos_ids)


def _stops(stop, tokenizer, vocab: int) -> tuple[list[str], list[list[int]]]:
    """(stop strings, stop token-id sequences: the given ones and each string's encoding) of `generate`'s `stop`."""
    if isinstance(stop, str | bytes) or not isinstance(stop, Sequence):
        raise ValueError(f"stop={stop!r} is invalid: must be a list of stop strings or token-id lists "
                         f"(e.g. stop=[{stop!r}])")
    stop_strings = [s for s in stop if isinstance(s, str)]
    if "" in stop_strings:
        raise ValueError("stop holds an empty string '': it matches at the start of every text; give non-empty "
                         "stop strings")
    if stop_strings and tokenizer is None:
        raise ValueError(f"stop={stop_strings!r} holds strings: pass tokenizer= to use stop strings")
    given = [s for s in stop if not isinstance(s, str)]
    stop_ids = [_token_ids(f"stop[{i}]", s, vocab) for i, s in enumerate(given)]
    for s in stop_strings:
        encoded = list(tokenizer.encode(s))
        if encoded:  # a string that encodes to nothing is still checked on the decoded text
            stop_ids.append(_token_ids(f"stop string {s!r} (encoded)", encoded, vocab))
    return stop_strings, stop_ids


def _prompt_open(prompt_open, b: int) -> np.ndarray:
    if prompt_open is None:
        return np.zeros(b, bool)
    open_ = np.asarray(prompt_open)
    if open_.shape != (b,) or open_.dtype != bool:
        raise ValueError(f"prompt_open={prompt_open!r} is invalid: must be {b} bools, one per prompt")
    return open_


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked `generate` call, ready to decode: the prompts as token ids (`ids`), right-padded (`tokens` [b, L]
    int32, `lengths` [b] int32), the static decode settings, and what turns new tokens into a `Generation` (the
    stop strings and the tokenizer)."""

    ids: list[list[int]]
    tokens: np.ndarray
    lengths: np.ndarray
    dcfg: DecodeConfig
    stop_strings: tuple[str, ...] = ()
    tokenizer: Any = None


def prepare(config: ModelConfig, prompts: Sequence[Sequence[int]] | Sequence[str] | str, *,
            max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            repetition_penalty: float = 1.0, seed: int = 0, tokenizer=None, eos_ids: Sequence[int] | None = None,
            stop: Sequence[str | Sequence[int]] = (), thinking_budget: budget_lib.ThinkingBudget | None = None,
            allow_special: bool = False) -> Request:
    """The checks and settings of `generate` for a model of `config` (its docstring lists the arguments and the
    ValueErrors), shared with loops built on `decode_loop` (e.g. `nemojax.elastic.generate`)."""
    vocab = config.vocab_size
    ids = _prompt_ids(prompts, tokenizer, allow_special, vocab)
    if eos_ids is None:
        eos_ids = [tokenizer.eos_id] if tokenizer is not None else list(config.eos_ids)
    eos = _eos_ids(eos_ids, vocab, "tokenizer.eos_id" if tokenizer is not None else "eos_ids")
    stop_strings, stop_ids = _stops(stop, tokenizer, vocab)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    pad_source = "config.pad_token_id"
    if tokenizer is not None:
        pad_id, pad_source = tokenizer.pad_id, "tokenizer.pad_id"
    _check_token_id(pad_source, pad_id, vocab)
    _check_seed(seed)
    sampling = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    dcfg = DecodeConfig(max_new_tokens, sampling, eos, int(pad_id), StopSequences(stop_ids), thinking_budget)
    tokens, lengths = pad_prompts(ids, dcfg.pad_id)
    return Request(ids, tokens, lengths, dcfg, tuple(stop_strings), tokenizer)


def result(request: Request, new: list[list[int]], seconds: float,
           stats: dict[str, float] | None = None) -> Generation:
    """The `Generation` of `request` whose prompts produced the token lists `new`: finish reasons, decoded text
    (cut at the stop strings) and the run statistics (`stats` plus counts, seconds and tokens per second)."""
    dcfg, tokenizer = request.dcfg, request.tokenizer
    reasons = [_finish_reason(t, dcfg.eos_ids, dcfg.stops) for t in new]
    text = None
    if tokenizer is not None:
        text = []
        for i, t in enumerate(new):
            decoded, cut = cut_at_stop_strings(tokenizer.decode(t), request.stop_strings)
            text.append(decoded)
            if cut:
                reasons[i] = "stop"
    produced = sum(len(t) for t in new)
    stats = {**(stats or {}), "prompt_tokens": float(request.lengths.sum()), "new_tokens": float(produced),
             "seconds": seconds, "tokens_per_s": produced / max(seconds, 1e-9)}
    return Generation(new, text, reasons, stats)


def generate(model, prompts: Sequence[Sequence[int]] | Sequence[str] | str, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             seed: int = 0, tokenizer=None, eos_ids: Sequence[int] | None = None,
             stop: Sequence[str | Sequence[int]] = (), thinking_budget: budget_lib.ThinkingBudget | None = None,
             prompt_open: Sequence[bool] | None = None, speculative: int = 0,
             stream: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
             allow_special: bool = False, view: Callable | None = None, view_args: Any = None) -> Generation:
    """Generates up to `max_new_tokens` after each prompt.

    prompts: token-id lists, or strings (then `tokenizer` is required, and `.text` is filled); a single string is
    one prompt. eos_ids: default the tokenizer's EOS, else the config's eos_token_id. stop: strings (checked on
    the decoded text, and as their token ids inside the loop) or token-id sequences. thinking_budget: force the
    end-of-thinking tag after that many thinking tokens (see `nemojax.infer.budget`); prompt_open says which
    prompts already opened a thinking block (default: none). speculative: draft this many tokens per step with
    the model's MTP head and verify them (greedy only; see `nemojax.infer.speculative`). stream(step, tokens [b],
    active [b]) is called from inside the loop after every step.

    view: decode with other params derived from the model's inside the compiled loop: `view(config, params,
    view_args) -> (params, collection)`, the collection going to `nemojax.model.apply`'s `elastic=` (None for
    none). A hashable callable (a jit static argument; e.g. `nemojax.elastic.generate.MaskedView`, a nested
    submodel under prefix masks); view_args is traced. The derived params live for the duration of the call.

    Raises ValueError, naming the argument and what is allowed, before anything is compiled: prompts that are
    empty, nested to the wrong depth or hold non-int ids (floats are refused, not truncated) or ids outside
    [0, vocab_size); eos / pad / stop ids outside the vocabulary; an empty stop string; and out-of-range
    max_new_tokens, seed, temperature, top_k, top_p, repetition_penalty, speculative or prompt_open.
    """
    config: ModelConfig = model.config
    request = prepare(config, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, tokenizer=tokenizer,
                      eos_ids=eos_ids, stop=stop, thinking_budget=thinking_budget, allow_special=allow_special)
    if isinstance(speculative, bool) or not isinstance(speculative, int | np.integer) or speculative < 0:
        raise ValueError(f"speculative={speculative!r} is invalid: must be an int >= 0 (0 turns it off)")
    if speculative and view is not None:
        raise ValueError("speculative and view are both given: speculative decoding runs the model's own params")
    dcfg, tokens, lengths = request.dcfg, request.tokens, request.lengths
    open_ = _prompt_open(prompt_open, len(request.ids))
    start = time.perf_counter()
    stats: dict[str, float] = {}
    _stream_sink[0] = stream
    try:
        if speculative:
            out, count, stats = generate_speculative(model, tokens, lengths, dcfg, draft=speculative,
                                                     stream=forward_stream if stream else None)
        else:
            max_len = tokens.shape[1] + max_new_tokens
            out, count = decode_loop(config, model.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                     jnp.asarray(open_), jax.random.key(int(seed)), dcfg=dcfg, max_len=max_len,
                                     stream=forward_stream if stream else None, view=view, view_args=view_args)
            out, count = np.asarray(out), np.asarray(count)
            jax.effects_barrier()  # every streamed token delivered before the sink is cleared
    finally:
        _stream_sink[0] = None
    seconds = time.perf_counter() - start
    return result(request, [out[i, :count[i]].tolist() for i in range(len(request.ids))], seconds, stats)
