"""Chat templates: load a checkpoint's Jinja template, render conversations as transformers does, and set the
reasoning toggle of Nemotron chat models (spec/elastic_hymba_vl.md E.1, E.2).

    template = load_chat_template("path/to/checkpoint")
    prompt = render_chat(template, [{"role": "user", "content": "2 + 2?"}], thinking=False)
    ids = tokenizer.encode(prompt, allow_special=True)     # "<|im_start|>" etc. become their special ids
    if prompt_open_thinking(prompt): ...                    # the model starts inside <think>

Reasoning toggle styles:

    "nano2"            Nemotron Nano 2, Nano V2 VL, Llama-Nemotron v1.5: "/think" or "/no_think" in the system prompt
    "llama-nemotron"   Llama-Nemotron (Nano 8B, Super 49B, Ultra 253B): "detailed thinking on" / "detailed thinking off"
    "kwarg"            only the template's `enable_thinking` variable; messages are left alone

Every style also passes `enable_thinking` to the template, which templates that do not read it ignore.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["THINKING_STYLES", "load_chat_template", "prompt_open_thinking", "render_chat"]

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
