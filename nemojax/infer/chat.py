"""Chat templates: load a checkpoint's Jinja template, render conversations as transformers does, and set the
reasoning toggle of Nemotron chat models (Llama-Nemotron, arXiv 2505.00949; Nemotron Nano 2, arXiv 2508.14444).

    template = load_chat_template("path/to/checkpoint")
    prompt = render_chat(template, [{"role": "user", "content": "2 + 2?"}], thinking=False)
    ids = tokenizer.encode(prompt, allow_special=True)     # "<|im_start|>" etc. become their special ids
    if prompt_open_thinking(prompt): ...                    # the model starts inside <think>

    out = chat(model, tokenizer, messages, thinking="on", thinking_budget=512, max_new_tokens=1024)
    out.text[0]                                             # the reply; the budget forced "</think>" if needed

Reasoning toggle styles:

    "nano2"            Nemotron Nano 2, Nano V2 VL, Llama-Nemotron v1.5: "/think" or "/no_think" in the system prompt
    "llama-nemotron"   Llama-Nemotron (Nano 8B, Super 49B, Ultra 253B): "detailed thinking on" / "detailed thinking off"
    "kwarg"            only the template's `enable_thinking` variable; messages are left alone

Every style also passes `enable_thinking` to the template, which templates that do not read it ignore.
"""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from nemojax.infer.budget import ThinkingBudget

__all__ = ["FALLBACK_TEMPLATE", "THINKING_STYLES", "chat", "chat_prompts", "load_chat_template", "newline_ids",
           "prompt_open_thinking", "render_chat", "split_reasoning", "thinking_budget_for"]

# style -> (system text for thinking on, for thinking off); None: the template variable only.
THINKING_STYLES: dict[str, tuple[str, str] | None] = {
    "nano2": ("/think", "/no_think"),
    "llama-nemotron": ("detailed thinking on", "detailed thinking off"),
    "kwarg": None,
}


def load_chat_template(tokenizer_dir: str | Path, name: str = "default") -> str | None:
    """The chat template of a checkpoint or tokenizer folder, or None when it has none.

    Looks in `chat_template.jinja`, then `chat_template.json` ({"chat_template": ...}), then the "chat_template"
    entry of `tokenizer_config.json`. That entry is a string, or a list of {"name", "template"} from which `name`
    (default "default") is taken; a list without it raises ValueError naming the templates it has.
    """
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise ValueError(f"tokenizer_dir={str(tokenizer_dir)!r} is not a folder")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for filename in ("chat_template.json", "tokenizer_config.json"):
        path = folder / filename
        if not path.is_file():
            continue
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if template is None:
            continue
        if isinstance(template, str):
            return template
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if name not in named or not isinstance(named[name], str):
                raise ValueError(f"{path}: chat_template has no template named {name!r}; it has {sorted(named)}")
            return named[name]
        raise ValueError(f"{path}: chat_template={type(template).__name__} is invalid: must be a string or a list "
                         "of {name, template}")
    return None


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    """A template in a sandbox that mirrors transformers' chat-template environment."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        # Unlike Jinja's own filter: no HTML escaping, and json.dumps' options are exposed.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


def _with_toggle(messages: list[dict[str, Any]], control: str) -> list[dict[str, Any]]:
    """`messages` with `control` at the start of the system prompt (a system message is added when there is none).
    Content given as a list of parts gets a text part in front."""
    if messages and messages[0].get("role") == "system":
        system = dict(messages[0])
        content = system.get("content")
        if isinstance(content, list):
            system["content"] = [{"type": "text", "text": control}, *content]
        else:
            system["content"] = f"{control}\n{content}" if content else control
        return [system, *messages[1:]]
    return [{"role": "system", "content": control}, *messages]


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                thinking: bool | None = None, thinking_style: str = "nano2", bos_token: str = "",
                eos_token: str = "", **template_kwargs: Any) -> str:
    """The prompt text of a conversation, rendered as `tokenizer.apply_chat_template(..., tokenize=False)` does.

    messages: [{"role": "system" | "user" | "assistant" | ..., "content": ...}, ...]; keys whose value is None are
      dropped (as transformers does) and the caller's dicts are never changed.
    thinking: True / False sets the reasoning toggle of `thinking_style` (see THINKING_STYLES) in the system prompt
      and passes `enable_thinking=thinking` to the template; None leaves the messages and template variables alone.
    template_kwargs: further template variables (tools, documents, ...).
    """
    if thinking_style not in THINKING_STYLES:
        raise ValueError(f"thinking_style={thinking_style!r} is invalid: must be one of {sorted(THINKING_STYLES)}")
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    if thinking is not None:
        if "enable_thinking" in template_kwargs and template_kwargs["enable_thinking"] != thinking:
            raise ValueError(f"enable_thinking={template_kwargs['enable_thinking']!r} contradicts "
                             f"thinking={thinking!r}; pass one of them")
        controls = THINKING_STYLES[thinking_style]
        if controls is not None:
            chat = _with_toggle(chat, controls[0] if thinking else controls[1])
        template_kwargs["enable_thinking"] = bool(thinking)
    template_kwargs.setdefault("tools", None)
    template_kwargs.setdefault("documents", None)
    return _compile(template).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos_token, eos_token=eos_token, **template_kwargs)


def prompt_open_thinking(text: str, start: str = "<think>", end: str = "</think>") -> bool:
    """Whether `text` ends inside an open reasoning block: a `start` occurs after the last `end` (or with no `end`).
    A prompt rendered with thinking on often ends in "<think>\\n", so generation begins inside the trace."""
    if not start or not end:
        raise ValueError(f"start={start!r} and end={end!r} must be non-empty")
    last_end = text.rfind(end)
    tail = text if last_end < 0 else text[last_end + len(end):]
    return start in tail


# ---------------------------------------------------------------------------------------------- chat generation

# Used when neither the caller nor the tokenizer's folder has a chat template: one "role: content" line per
# message and a last "assistant:" line for the model to continue. Content given as parts keeps its text parts.
FALLBACK_TEMPLATE = r"""
{%- for m in messages -%}
{{ m['role'] }}: {{ m['content'] if m['content'] is string else m['content'] | selectattr('type', 'equalto', 'text')
   | map(attribute='text') | join('') }}{{ '\n' }}
{%- endfor -%}
{%- if add_generation_prompt %}assistant:{% endif -%}
"""

_THINKING_WORDS = {"on": True, "off": False}
_newline_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def newline_ids(tokenizer) -> tuple[int, ...]:
    """Every vocabulary id whose decoded text contains "\\n" (for ByteTokenizer: just byte 10).

    Decodes each id once and caches the answer per tokenizer object (a 131k vocabulary takes well under a second).
    """
    try:
        return _newline_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = tuple(i for i in range(int(tokenizer.vocab_size)) if "\n" in tokenizer.decode([i]))
    try:
        _newline_cache[tokenizer] = ids
    except TypeError:  # not weak-referenceable: no caching
        pass
    return ids


def thinking_budget_for(tokenizer, budget: int, *, start: str = "<think>", end: str = "</think>",
                        grace: int | None = None) -> ThinkingBudget:
    """A `ThinkingBudget` of `budget` thinking tokens for `tokenizer`'s vocabulary.

    start_ids / end_ids: `tokenizer.encode(start / end, allow_special=True)` (one id each when the tags are special
    tokens, as in Nemotron Nano 2; their bytes for ByteTokenizer). newline_ids: `newline_ids(tokenizer)`.
    grace: tokens allowed past the budget while waiting for a newline (None: 10% of budget); see
    `nemojax.infer.budget`.
    """
    tags = {}
    for name, tag in (("start", start), ("end", end)):
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"{name}={tag!r} is invalid: must be a non-empty string such as '<think>'")
        ids = tokenizer.encode(tag, allow_special=True)
        if not ids:
            raise ValueError(f"{name}={tag!r} encodes to no tokens with {tokenizer!r}; the budget needs its ids")
        tags[name] = tuple(int(i) for i in ids)
    return ThinkingBudget(budget, end_ids=tags["end"], start_ids=tags["start"], newline_ids=newline_ids(tokenizer),
                          grace=grace)


def split_reasoning(tokens: Sequence[int], start_ids: Sequence[int], end_ids: Sequence[int], *,
                    open_: bool = False, is_blank=None) -> tuple[list[int] | None, list[int]]:
    """One generated reply -> (the ids inside its thinking block, or None if it has none; the ids of the rest).

    The reply is inside a thinking block from its first token when `open_` (the prompt ended inside `start`);
    otherwise it opens one only by beginning with `start_ids`, after nothing but blank tokens (`is_blank(ids)`
    decides; default: no tokens at all). The block ends at the first `end_ids`; a reply that never closes it (cut
    by the length limit) is all reasoning. Tags are matched as id sequences, so special-token tags (one id each)
    and tags spelt in ordinary tokens (ByteTokenizer) both work.
    """
    tokens, start_ids, end_ids = list(tokens), list(start_ids), list(end_ids)

    def find(tag: list[int], after: int) -> int:
        return next((i for i in range(after, len(tokens) - len(tag) + 1) if tokens[i:i + len(tag)] == tag), -1)

    begin = 0
    if not open_:
        at = find(start_ids, 0)
        if at < 0 or (at > 0 and not (is_blank is not None and is_blank(tokens[:at]))):
            return None, tokens
        begin = at + len(start_ids)
    end = find(end_ids, begin)
    if end < 0:
        return tokens[begin:], []
    return tokens[begin:end], tokens[end + len(end_ids):]


def _thinking_flag(thinking: bool | str | None) -> bool | None:
    if thinking is None or isinstance(thinking, bool):
        return thinking
    if isinstance(thinking, str) and thinking.lower() in _THINKING_WORDS:
        return _THINKING_WORDS[thinking.lower()]
    raise ValueError(f"thinking={thinking!r} is invalid: must be None, True, False, 'on' or 'off'")


def _conversations(messages) -> tuple[list[Sequence[Mapping[str, Any]]], bool]:
    """(conversations, batched): one conversation (a list of message dicts) or a list of them."""
    if isinstance(messages, Mapping) or isinstance(messages, str) or not isinstance(messages, Sequence) \
            or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
    batched = not isinstance(messages[0], Mapping)
    conversations = list(messages) if batched else [messages]
    for i, conversation in enumerate(conversations):
        if isinstance(conversation, str) or not isinstance(conversation, Sequence) or not conversation or \
                not all(isinstance(m, Mapping) for m in conversation):
            raise ValueError(f"messages[{i}] is invalid: each conversation must be a non-empty list of "
                             "{'role', 'content'} dicts")
    return conversations, batched


def _tokenizer_template(tokenizer) -> str | None:
    path = getattr(tokenizer, "path", None)
    return None if path is None else load_chat_template(Path(path).parent)


def chat_prompts(tokenizer, messages, *, template: str | None = None, thinking: bool | str | None = None,
                 thinking_style: str = "nano2", template_kwargs: Mapping[str, Any] | None = None) -> list[str]:
    """The prompt text of one conversation or of each of a batch of them (a list of one or more strings).

    template: a Jinja chat template; None takes the template beside an HFTokenizer's tokenizer.json
    (`load_chat_template`), or else FALLBACK_TEMPLATE ("role: content" lines and a last "assistant:").
    thinking: True / "on", False / "off" or None; see `render_chat` for where the toggle goes.
    template_kwargs: extra template variables (bos_token, tools, ...).
    """
    conversations, _ = _conversations(messages)
    if template is None:
        template = _tokenizer_template(tokenizer)
    if template is None:
        template = FALLBACK_TEMPLATE
    flag = _thinking_flag(thinking)
    return [render_chat(template, conversation, add_generation_prompt=True, thinking=flag,
                        thinking_style=thinking_style, **dict(template_kwargs or {}))
            for conversation in conversations]


def chat(model, tokenizer, messages, *, template: str | None = None, thinking: bool | str | None = None,
         thinking_style: str = "nano2", thinking_budget: int | ThinkingBudget | None = None,
         start: str = "<think>", end: str = "</think>", grace: int | None = None,
         template_kwargs: Mapping[str, Any] | None = None, **generate_kwargs: Any):
    """Generates the assistant's reply to a conversation, or to each of a batch of conversations.

    messages: [{"role": ..., "content": ...}, ...], or a list of such conversations (a batch).
    template: a Jinja chat template. None: the `chat_template` beside an HFTokenizer's tokenizer.json; if there is
      none (or the tokenizer has no folder, like ByteTokenizer), a plain fallback of one "role: content" line per
      message and a final "assistant:" line (FALLBACK_TEMPLATE).
    thinking: the reasoning toggle, True / "on", False / "off", or None (leave the messages alone), written as
      `thinking_style` says (arXiv 2505.00949; see `render_chat`).
    thinking_budget: an int N ends the thinking block after N thinking tokens (plus `grace` while waiting for a
      newline) by forcing `end` (spelled out: `thinking_budget_for(tokenizer, N, start=start, end=end, grace=grace)`),
      or a ready `ThinkingBudget`. A prompt that already ends inside `start` (the template opened the block)
      counts from its first generated token.
    generate_kwargs: passed to `nemojax.infer.generate.generate` (max_new_tokens, temperature, stop, stream, ...).

    The prompts are encoded with `allow_special=True`, so template tokens such as "<|im_start|>" get their special
    ids. Returns a `Generation` with one entry per conversation: `.text` is the whole reply (special tokens
    dropped, so special thinking tags vanish from it), `.reasoning` the text inside the thinking block (None if the
    reply has none) and `.answer` the text after it, both stripped of surrounding whitespace (`split_reasoning`).
    """
    from nemojax.infer.generate import cut_at_stop_strings, generate

    for name in ("prompt_open", "allow_special"):
        if name in generate_kwargs:
            raise ValueError(f"{name}= is set by chat(); do not pass it")
    texts = chat_prompts(tokenizer, messages, template=template, thinking=thinking, thinking_style=thinking_style,
                         template_kwargs=template_kwargs)
    ids = [tokenizer.encode(text, allow_special=True) for text in texts]
    prompt_open = [prompt_open_thinking(text, start, end) for text in texts]
    budget = thinking_budget
    if budget is not None and not isinstance(budget, ThinkingBudget):
        budget = thinking_budget_for(tokenizer, budget, start=start, end=end, grace=grace)
    out = generate(model, ids, tokenizer=tokenizer, thinking_budget=budget, prompt_open=prompt_open,
                   **generate_kwargs)
    start_ids, end_ids = (tokenizer.encode(tag, allow_special=True) for tag in (start, end))
    stop_strings = [s for s in generate_kwargs.get("stop", ()) if isinstance(s, str)]
    out.reasoning, out.answer = [], []
    for tokens, open_ in zip(out.tokens, prompt_open, strict=True):
        reasoning, answer = split_reasoning(tokens, start_ids, end_ids, open_=open_,
                                            is_blank=lambda ids: not tokenizer.decode(ids).strip())
        stopped = False  # a stop string inside the thinking block ends the reply there, as it ends `.text`
        if reasoning is not None:
            reasoning, stopped = cut_at_stop_strings(tokenizer.decode(reasoning), stop_strings)
            reasoning = reasoning.strip()
        out.reasoning.append(reasoning)
        out.answer.append("" if stopped else cut_at_stop_strings(tokenizer.decode(answer), stop_strings)[0].strip())
    return out
