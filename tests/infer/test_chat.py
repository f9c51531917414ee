"""Chat templates: rendering matches transformers' apply_chat_template (the oracle, on an in-memory tokenizer), the
reasoning toggle lands in the system prompt for both styles, open-think detection, special-token encoding of a
rendered prompt, and loading templates from a tokenizer folder."""

from __future__ import annotations

import copy
import json

import jinja2
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nemojax.data.tokenizers import HFTokenizer
from nemojax.infer.chat import (
    chat,
    chat_prompts,
    load_chat_template,
    prompt_open_thinking,
    render_chat,
    split_reasoning,
    thinking_budget_for,
)

SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]

# Nano-2-like ChatML: the system turn always present, reasoning stripped from earlier assistant turns, tools shown
# through tojson with a loop control, unknown roles rejected, and an `enable_thinking` branch in the generation prompt.
CHATML = """\
{%- if messages and messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}{%- set turns = messages -%}
{%- endif -%}
<|im_start|>system
{{ system }}
{% if tools %}
{% for tool in tools %}
{% if loop.index > 2 %}{% break %}{% endif %}
<tool>{{ tool | tojson }}</tool>
{% endfor %}
{% endif %}
<|im_end|>
{% for message in turns %}
{% if message['role'] not in ['user', 'assistant', 'tool'] %}
{{ raise_exception('unknown role ' + message['role']) }}
{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' and '</think>' in message['content'] %}
{{ message['content'].split('</think>')[-1].lstrip() }}<|im_end|>
{% else %}
{{ message['content'] }}<|im_end|>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}
<think></think>
{% else %}
<think>
{% endif %}
{% endif %}"""

# Nano 2's own convention: the mode is read from "/think" or "/no_think" in the system or user text.
NANO2_DETECT = """\
{%- set ns = namespace(thinking=true) -%}
{%- for m in messages if m['role'] in ['system', 'user'] -%}
{%- if '/no_think' in m['content'] %}{% set ns.thinking = false %}{% elif '/think' in m['content'] %}\
{% set ns.thinking = true %}{% endif -%}
{%- endfor -%}
{%- for m in messages %}<|im_start|>{{ m['role'] }}
{% set text = m['content'] %}
{% if m['role'] in ['system', 'user'] %}
{% set text = text | replace('/no_think', '') | replace('/think', '') | trim %}
{% endif %}
{{ text }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if ns.thinking %}<think>
{% else %}<think></think>{% endif %}{% endif %}"""

CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4", "reasoning_content": None},
    {"role": "user", "content": "And 3 + 3?"},
]
NO_SYSTEM = [{"role": "user", "content": "Hi there"}]
TOOLS = [{"name": f"tool_{i}", "description": "äöü <b>", "parameters": {"x": i}} for i in range(3)]


def _backend() -> Tokenizer:
    words = ["<unk>", "system", "user", "assistant", "Hi", "there", "What", "is", "2", "+", "?", "4"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok


@pytest.fixture(scope="module")
def hf():
    return {name: PreTrainedTokenizerFast(tokenizer_object=_backend(), chat_template=template)
            for name, template in (("chatml", CHATML), ("nano2", NANO2_DETECT))}


def _with_system(messages, text):
    """The oracle's input: the control text written into the system prompt by hand."""
    if messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{text}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


@pytest.mark.parametrize("messages", [CHAT, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("generation", [True, False])
def test_matches_transformers_without_toggle(hf, messages, generation):
    ours = render_chat(CHATML, messages, add_generation_prompt=generation, tools=TOOLS)
    oracle = hf["chatml"].apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                              tools=TOOLS)
    assert ours == oracle
    assert ours.count("<tool>") == 2 and '"description": "äöü <b>"' in ours  # break and tojson like transformers
    if messages is CHAT:  # the earlier turn's reasoning is stripped by the template
        assert "add them" not in ours and "<|im_start|>assistant\n4<|im_end|>" in ours


@pytest.mark.parametrize("messages", [CHAT, NO_SYSTEM], ids=["system", "no_system"])
@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("style,on,off", [("nano2", "/think", "/no_think"),
                                          ("llama-nemotron", "detailed thinking on", "detailed thinking off")])
def test_toggle_matches_transformers_with_the_control_in_the_system_prompt(hf, messages, thinking, style, on, off):
    control = on if thinking else off
    before = copy.deepcopy(messages)
    ours = render_chat(CHATML, messages, thinking=thinking, thinking_style=style)
    oracle = hf["chatml"].apply_chat_template(_with_system(messages, control), tokenize=False,
                                              add_generation_prompt=True, enable_thinking=thinking)
    assert ours == oracle
    assert messages == before  # the caller's messages are untouched
    system = ours.split("<|im_end|>")[0]
    assert system.startswith(f"<|im_start|>system\n{control}")
    if messages is CHAT:
        assert system == f"<|im_start|>system\n{control}\nYou are a helpful assistant.\n"
    assert ours.count("<|im_start|>system") == 1
    assert ours.endswith("<think>\n" if thinking else "<think></think>\n")  # the enable_thinking branch
    assert prompt_open_thinking(ours) is thinking


def test_thinking_none_and_kwarg_style(hf):
    plain = render_chat(CHATML, CHAT)
    assert "/think" not in plain and plain.endswith("<think>\n")  # enable_thinking undefined: the default branch
    kwarg = render_chat(CHATML, CHAT, thinking=False, thinking_style="kwarg")
    assert kwarg == hf["chatml"].apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True,
                                                     enable_thinking=False)
    assert "/no_think" not in kwarg and kwarg.endswith("<think></think>\n")


@pytest.mark.parametrize("thinking", [True, False])
def test_nano2_template_reads_the_control_from_the_system_prompt(hf, thinking):
    """A template that ignores enable_thinking and looks for /think, /no_think itself (as Nano 2's does)."""
    ours = render_chat(NANO2_DETECT, NO_SYSTEM, thinking=thinking)
    oracle = hf["nano2"].apply_chat_template(_with_system(NO_SYSTEM, "/think" if thinking else "/no_think"),
                                             tokenize=False, add_generation_prompt=True)
    assert ours == oracle
    assert ours.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n")
    assert prompt_open_thinking(ours) is thinking


def test_template_errors_and_bad_arguments():
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role critic"):
        render_chat(CHATML, [*NO_SYSTEM, {"role": "critic", "content": "no"}])
    with pytest.raises(ValueError, match="thinking_style='qwen'"):
        render_chat(CHATML, NO_SYSTEM, thinking=True, thinking_style="qwen")
    with pytest.raises(ValueError, match="enable_thinking=False contradicts thinking=True"):
        render_chat(CHATML, NO_SYSTEM, thinking=True, enable_thinking=False)
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox holds
        render_chat("{{ messages.__class__.__mro__ }}", NO_SYSTEM)


def test_toggle_with_list_content_and_empty_system():
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *NO_SYSTEM]
    out = render_chat("{{ messages[0]['content'] | tojson }}", parts, thinking=True, add_generation_prompt=False)
    assert json.loads(out) == [{"type": "text", "text": "/think"}, {"type": "text", "text": "Be brief."}]
    empty = [{"role": "system", "content": ""}, *NO_SYSTEM]
    assert render_chat("{{ messages[0]['content'] }}|{{ messages | length }}", empty, thinking=False,
                       thinking_style="llama-nemotron") == "detailed thinking off|2"


@pytest.mark.parametrize("text,open_", [
    ("", False), ("<|im_start|>assistant\n<think>\n", True), ("<think></think>", False),
    ("<think>a</think>\nanswer <think>", True), ("<think>a</think> b", False), ("no tags", False),
])
def test_prompt_open_thinking(text, open_):
    assert prompt_open_thinking(text) is open_


def test_prompt_open_thinking_when_end_contains_start():
    assert prompt_open_thinking("[x]t[/x]", start="x]", end="[/x]") is False
    assert prompt_open_thinking("[/x] x]", start="x]", end="[/x]") is True


def test_encode_rendered_prompt_with_special_ids(hf, tmp_path):
    """Our tokenizer, told to allow specials, gives the ids transformers' tokenize=True gives."""
    _backend().save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    prompt = render_chat(CHATML, CHAT, thinking=False)
    oracle = hf["chatml"].apply_chat_template(_with_system(CHAT, "/no_think"), tokenize=True,
                                              add_generation_prompt=True, enable_thinking=False)["input_ids"]
    ids = tok.encode(prompt, allow_special=True)
    assert ids == list(oracle)
    start = _backend().token_to_id("<|im_start|>")
    assert ids.count(start) == 5 and start not in tok.encode(prompt)  # the default path keeps them as text


def test_load_chat_template_variants(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert load_chat_template(tmp_path) == CHATML
    listed = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": NANO2_DETECT}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": listed}))
    assert load_chat_template(tmp_path) == NANO2_DETECT
    assert load_chat_template(tmp_path, name="tool_use") == "T"
    with pytest.raises(ValueError, match="no template named 'rag'; it has \\['default', 'tool_use'\\]"):
        load_chat_template(tmp_path, name="rag")
    (tmp_path / "chat_template.jinja").write_text(CHATML, encoding="utf-8")  # the separate file wins
    assert load_chat_template(tmp_path) == CHATML
    with pytest.raises(ValueError, match="tokenizer_dir="):
        load_chat_template(tmp_path / "chat_template.jinja")


# ---------------------------------------------------------------------------------------------- chat() and budgets

def test_thinking_budget_for_byte_tokenizer():
    from nemojax.data.tokenizers import ByteTokenizer

    budget = thinking_budget_for(ByteTokenizer(), 12, grace=4)
    assert budget.start_ids == tuple(b"<think>") and budget.end_ids == tuple(b"</think>")
    assert budget.newline_ids == (10,) and (budget.budget, budget.grace_tokens) == (12, 4)
    assert thinking_budget_for(ByteTokenizer(), 30).grace_tokens == 3  # 10% by default
    with pytest.raises(ValueError, match="end='' is invalid: must be a non-empty string"):
        thinking_budget_for(ByteTokenizer(), 5, end="")


def test_thinking_budget_for_special_tokens(tmp_path):
    """With the tags as special tokens each is one id; a tag that encodes to nothing is refused by name; a
    vocabulary without newline tokens gives no newline ids."""
    _backend().save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    budget = thinking_budget_for(tok, 8)
    assert budget.start_ids == (_backend().token_to_id("<think>"),)
    assert budget.end_ids == (_backend().token_to_id("</think>"),)
    assert budget.newline_ids == ()
    with pytest.raises(ValueError, match="start=' ' encodes to no tokens with HFTokenizer"):
        thinking_budget_for(tok, 8, start=" ")


def test_chat_prompts_toggle_fallback_and_tokenizer_template(tmp_path):
    from nemojax.data.tokenizers import ByteTokenizer

    off = chat_prompts(ByteTokenizer(), NO_SYSTEM, template=CHATML, thinking="off")
    assert off == [render_chat(CHATML, NO_SYSTEM, thinking=False)]
    assert off[0].startswith("<|im_start|>system\n/no_think\n<|im_end|>") and off[0].endswith("<think></think>\n")
    # no template anywhere: "role: content" lines and a final "assistant:"
    assert chat_prompts(ByteTokenizer(), [[{"role": "system", "content": "Be brief."}, *NO_SYSTEM], NO_SYSTEM],
                        thinking="on") == ["system: /think\nBe brief.\nuser: Hi there\nassistant:",
                                           "system: /think\nuser: Hi there\nassistant:"]
    # an HFTokenizer brings the template of its folder
    _backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    assert chat_prompts(HFTokenizer(tmp_path), CHAT, thinking=True) == [render_chat(CHATML, CHAT, thinking=True)]
    with pytest.raises(ValueError, match="thinking='maybe' is invalid"):
        chat_prompts(ByteTokenizer(), NO_SYSTEM, thinking="maybe")
    with pytest.raises(ValueError, match="messages\\[1\\] is invalid"):
        chat_prompts(ByteTokenizer(), [NO_SYSTEM, []])


def test_chat_thinking_budget_forces_the_end_tag_in_time():
    """A random model never closes its thinking by itself; with budget N and grace g the bytes of "</think>" start
    exactly where the budget rule says: at the first step >= N after a newline, or at N + g (continuing a partial
    tag the model had begun). Checked on a batch of two conversations whose template opens <think>."""
    import nemojax
    from nemojax.data.tokenizers import ByteTokenizer

    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=260, pattern="M*-", runtime={"dtype": "float32"})
    model = nemojax.Model.init(config, 3)
    N, g = 6, 3
    end = list(b"</think>")
    out = chat(model, ByteTokenizer(), [CHAT, NO_SYSTEM], template=CHATML, thinking=True, thinking_budget=N,
               grace=g, max_new_tokens=N + g + len(end) + 4)
    assert len(out.tokens) == 2
    for tokens, text in zip(out.tokens, out.text, strict=True):
        force = next(p for p in range(N, N + g + 1) if p == N + g or tokens[p - 1] == 10)
        begun = max(k for k in range(len(end)) if tokens[force - k:force] == end[:k])
        first = force - begun
        assert tokens[first:first + len(end)] == end and first <= N + g
        assert all(tokens[i:i + len(end)] != end for i in range(first))
        assert "</think>" in text
    decode = ByteTokenizer().decode
    for tokens, reasoning, answer in zip(out.tokens, out.reasoning, out.answer, strict=True):
        first = next(i for i in range(len(tokens)) if tokens[i:i + len(end)] == end)
        assert reasoning == decode(tokens[:first]).strip()
        assert answer == decode(tokens[first + len(end):]).strip()


@pytest.mark.parametrize("tokens,open_,want", [
    ([1, 2, 8, 3, 4], True, ([1, 2], [3, 4])),  # the prompt opened the block
    ([7, 1, 2, 8, 3], False, ([1, 2], [3])),  # the reply opens it
    ([0, 7, 1, 8, 3], False, ([1], [3])),  # ... after blank tokens (id 0 is blank here)
    ([5, 7, 1, 8, 3], False, (None, [5, 7, 1, 8, 3])),  # "<think>" after text is not a thinking block
    ([1, 2, 3], False, (None, [1, 2, 3])),
    ([1, 2, 3], True, ([1, 2, 3], [])),  # never closed: all reasoning
    ([8, 3, 8], True, ([], [3, 8])),  # closed at once; a later end tag is answer text
    ([9, 9, 1, 6, 6, 2], False, ([1], [2])),  # multi-token tags
])
def test_split_reasoning(tokens, open_, want):
    start, end = ([9, 9], [6, 6]) if 9 in tokens else ([7], [8])
    assert split_reasoning(tokens, start, end, open_=open_, is_blank=lambda ids: set(ids) <= {0}) == want


def test_chat_splits_reasoning_at_special_tags(tmp_path):
    """With "<think>" / "</think>" as special tokens `.text` loses the boundary (special tokens are dropped);
    `.reasoning` and `.answer` keep it. A random model over the word-level vocabulary thinks until the budget
    forces the end tag (or it emits one itself)."""
    import nemojax

    _backend().save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path)
    end = _backend().token_to_id("</think>")
    config = nemojax.presets.get("nemotron-h-8b-tiny", vocab_size=tok.vocab_size, pattern="M*-",
                                 runtime={"dtype": "float32"})
    model = nemojax.Model.init(config, 5)
    out = chat(model, tok, [CHAT, NO_SYSTEM], template=CHATML, thinking=True, thinking_budget=3, grace=0,
               max_new_tokens=9, eos_ids=[])
    for tokens, text, reasoning, answer in zip(out.tokens, out.text, out.reasoning, out.answer, strict=True):
        cut = tokens.index(end)
        assert cut <= 3
        assert reasoning == tok.decode(tokens[:cut]).strip() and answer == tok.decode(tokens[cut + 1:]).strip()
        assert text == tok.decode(tokens)
    assert any(out.answer) and any(out.reasoning)
