from __future__ import annotations

import re

import pytest

from choreo.chat import ChatFormat, parse_role, stop_window


def test_no_default_system_prompt_in_single_messages(tokenizer):
    fmt = ChatFormat(tokenizer)
    text = tokenizer.decode(fmt.encode("hi", "user"))
    assert "SmolLM" not in text and text.startswith("<|im_start|>user")


def test_named_role_renders_the_name(tokenizer):
    fmt = ChatFormat(tokenizer)
    assert "alice" in tokenizer.decode(fmt.header("assistant:alice"))
    assert fmt.footer("assistant:alice") == fmt.footer("assistant")


def test_header_with_prefix_and_stop_ids(tokenizer):
    fmt = ChatFormat(tokenizer)
    assert tokenizer.decode(fmt.header("assistant", "To Bob: ")).endswith("To Bob: ")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in fmt.stop_ids("assistant")


@pytest.mark.parametrize("role", ["robot", "", "assistant:", "System", None])
def test_unknown_roles_are_rejected_by_name(role):
    with pytest.raises(ValueError, match="role"):
        parse_role(role)


# Texts whose first (or last) characters merge with the template's: ChatML's header ends in "\n".
AWKWARD_TEXTS = ["Hello", "\nHello", "\n\nHello", "\n", "\n\n", " ", " Hello", "Hello\n\n", "\u00e9", "\n\U0001f642",
                 "x<|im_end|>"]


class _SlowTokenizer:
    """The tokenizer without an offset mapping (as a slow, pure-Python tokenizer is)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        raise NotImplementedError("no offset mapping")


@pytest.mark.parametrize("offsets", [True, False], ids=["offset-mapping", "decoded-prefixes"])
@pytest.mark.parametrize("role", ["user", "assistant:bob"])
@pytest.mark.parametrize("text", AWKWARD_TEXTS, ids=[repr(t) for t in AWKWARD_TEXTS])
def test_the_content_span_holds_the_text_however_it_tokenizes(tokenizer, text, role, offsets):
    """The turn is tokenized as one string (what the template renders); the content span is the fewest tokens that
    hold all of the text: what lies outside it is the header's start and the footer's end."""
    fmt = ChatFormat(tokenizer if offsets else _SlowTokenizer(tokenizer))
    ids, (a, b) = fmt.encode_turn(text, role)
    assert ids == fmt.encode(text, role)
    header, footer = fmt._split(role)
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=False)  # noqa: E731
    assert text in decode(ids[a:b])
    assert header.startswith(decode(ids[:a])) and footer.endswith(decode(ids[b:]))
    assert text not in decode(ids[a + 1:b]) and text not in decode(ids[a:b - 1])


@pytest.mark.parametrize("length", [1, 15, 16, 17, 40, 200])
@pytest.mark.parametrize("kind", ["ascii", "multibyte"])
def test_a_stop_string_of_any_length_is_found_when_it_is_complete(tokenizer, length, kind):
    """After each sampled token the engine asks whether a stop string has appeared: not one token early, and not
    never (a string longer than a fixed window of tokens once was)."""
    fmt = ChatFormat(tokenizer)
    word = "Rain falls on the plain. " if kind == "ascii" else "\u00e9t\u00e9 \U0001f327\ufe0f \u96e8 "
    tokens = fmt._ids(word * 60)
    stop = fmt.decode(tokens[:length]).rstrip("\ufffd")  # whole characters: a token may hold part of one
    need = next(n for n in range(1, length + 1) if stop in fmt.decode(tokens[:n]))  # all of the text, no window
    assert fmt.hits_stop(tokens[:need], [stop])
    assert fmt.hits_stop(tokens[:need], ["zzz", stop]) and not fmt.hits_stop(tokens[:need], ["zzz"])
    assert not fmt.hits_stop(tokens[:need - 1], [stop])
    assert fmt.hits_stop(tokens[:need + 5], [stop])  # found later too (the engine stops at the first)


def test_the_stop_check_decodes_a_bounded_window(tokenizer, monkeypatch):
    """The cost per sampled token depends on the longest stop string, not on how much was generated."""
    fmt = ChatFormat(tokenizer)
    decoded = []
    monkeypatch.setattr(fmt, "decode", lambda ids: decoded.append(len(ids)) or tokenizer.decode(ids))
    tokens = fmt._ids("Rain falls on the plain. " * 200)
    assert not fmt.hits_stop(tokens, ["zzz", "\u96e8"])
    assert decoded == [stop_window(["zzz", "\u96e8"])] and decoded[0] < 20
    assert not fmt.hits_stop(tokens, [])


# Other families' templates, on a copy of the tokenizer with their special tokens. Llama 3.0 and 3.1 strip each
# content ("| trim"); 3.1 writes date lines into the first system message (and into one it adds when there is none);
# Mistral v0.3 folds the system prompt into the last user turn; v0.1 insists on user/assistant alternation.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ "
          "message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA31 = ("{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']"
           "|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
           "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
           "{{- 'Today Date: 26 Jul 2024\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
           "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
           "'<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
           "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
MISTRAL3 = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
            "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
            "{{- bos_token }}{%- for message in loop_messages %}{%- if (message['role'] == 'user') != "
            "(loop.index0 % 2 == 0) %}{{- raise_exception('roles must alternate') }}{%- endif %}"
            "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
            "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}{%- else %}"
            "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}{%- elif message['role'] == 'assistant' %}"
            "{{- ' ' + message['content'] + eos_token}}{%- else %}{{- raise_exception('no such role') }}{%- endif %}"
            "{%- endfor %}")
MISTRAL1 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
FAMILIES = {"llama3.0": LLAMA3, "llama3.1": LLAMA31, "mistral-v0.3": MISTRAL3, "mistral-v0.1": MISTRAL1}
EDGE_TEXTS = ["Be brief.", " Be brief.\n", "\n\nHi  ", "", "\n\U0001f642", " x<|eot_id|>y "]


def _family(tokenizer, template):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                         "<|end_header_id|>", "<|eot_id|>"]})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tok.chat_template = template
    return tok


def _hugging_face_ids(tok, conversation):
    text = tok.apply_chat_template([{"role": r, "content": c} for r, c in conversation], tokenize=False)
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("family", ["llama3.0", "llama3.1"])
@pytest.mark.parametrize("text", EDGE_TEXTS, ids=[repr(t) for t in EDGE_TEXTS])
def test_templates_that_trim_get_the_same_tokens_message_by_message(tokenizer, family, text):
    tok = _family(tokenizer, FAMILIES[family])
    fmt = ChatFormat(tok)
    conversation = [("system", text), ("user", text), ("assistant", text), ("user", "?")]
    mine = fmt.prefix_ids + sum((fmt.encode(c, r) for r, c in conversation), [])
    assert mine == _hugging_face_ids(tok, conversation)
    ids, (a, b) = fmt.encode_turn(text, "user")
    assert tok.decode(ids[a:b], skip_special_tokens=False) == text.strip()
    assert fmt.prefix_ids == [tok.bos_token_id]


def test_llama31_gives_every_system_message_the_first_ones_date_lines(tokenizer):
    """By design (module docstring): a message is encoded without knowing whether another system message
    precedes it."""
    fmt = ChatFormat(_family(tokenizer, LLAMA31))
    assert "Today Date" in fmt.tokenizer.decode(fmt.header("system"), skip_special_tokens=False)
    assert "Today Date" not in fmt.tokenizer.decode(fmt.header("user"), skip_special_tokens=False)


def test_a_template_that_folds_the_system_prompt_into_a_user_turn_is_refused_for_system(tokenizer):
    tok = _family(tokenizer, MISTRAL3)
    fmt = ChatFormat(tok)
    with pytest.raises(ValueError, match="'system' message.*drops the message's content"):
        fmt.encode("Be brief.", "system")
    assert tok.decode(fmt.encode("Hi", "user"), skip_special_tokens=False) == "[INST] Hi[/INST]"  # no "x" inside
    conversation = [("user", "Hi"), ("assistant", "Hello"), ("user", "More?")]
    assert fmt.prefix_ids + sum((fmt.encode(c, r) for r, c in conversation), []) == _hugging_face_ids(tok, conversation)


def test_a_template_that_insists_on_alternation_works_for_user_and_assistant(tokenizer):
    tok = _family(tokenizer, MISTRAL1)
    fmt = ChatFormat(tok)
    conversation = [("user", "Hi"), ("assistant", "Hello"), ("user", " More? ")]
    assert fmt.prefix_ids + sum((fmt.encode(c, r) for r, c in conversation), []) == _hugging_face_ids(tok, conversation)
    with pytest.raises(ValueError, match="'system' message.*alternate"):
        fmt.header("system")


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}", "rewrites the content"),
    ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] != 'user' %}{{ m['content'] }}{% endif %}\n"
     "{% endfor %}", "drops the message's content"),
    ("{% for m in messages %}[{{ messages | length }}] {{ m['content'] }}\n{% endfor %}", "changes the text"),
], ids=["upper", "drops-user", "counts-messages"])
def test_a_template_that_changes_contents_is_refused_naming_the_role(tokenizer, template, match):
    fmt = ChatFormat(_family(tokenizer, template))
    with pytest.raises(ValueError, match=f"'user' message.*{match}"):
        fmt.encode("Hi", "user")


LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")


def test_a_template_that_opens_every_user_turn_with_bos_keeps_it_in_the_turns(tokenizer):
    """Llama 2 writes BOS before every [INST]: once in a two-message conversation, so it was taken for a
    conversation prefix and kept in the user header too (two BOS where the template has one)."""
    tok = _family(tokenizer, LLAMA2)
    fmt = ChatFormat(tok)
    assert fmt.prefix_ids == []
    conversation = [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    assert sum((fmt.encode(c, r) for r, c in conversation), []) == _hugging_face_ids(tok, conversation)


def test_a_footer_that_opens_with_text_stops_at_its_special_token(tokenizer):
    """Llama 2's assistant footer is ' ' + eos: its first token is a bare space, which as a stop token ended
    answers at their first number (" 12" is a space, then "12", for SentencePiece tokenizers)."""
    tok = _family(tokenizer, LLAMA2)
    fmt = ChatFormat(tok)
    footer = fmt.footer("assistant")
    assert footer[-1] == tok.eos_token_id and footer[0] != tok.eos_token_id  # the space first
    assert fmt.stop_ids("assistant") == {tok.eos_token_id}
    chatml = ChatFormat(tokenizer)
    assert chatml.stop_ids("assistant") == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}


@pytest.mark.parametrize("stop", [["<|im_start|>"], ["fine", "Answer:<|im_end|>"]])
def test_a_stop_string_holding_a_special_token_is_refused(tokenizer, stop):
    """The stop check reads the generated text, which holds no special tokens: such a string never stops a call."""
    fmt = ChatFormat(tokenizer)
    message = re.escape(f"stop string {stop[-1]!r} holds the special token ") + ".*would never stop"
    with pytest.raises(ValueError, match=message):
        fmt.check_stop(stop, "assistant")
    fmt.check_stop(["\n\n", "Answer:", "<im_start>"], "assistant")  # text, however it looks


def test_an_end_of_turn_token_added_as_a_plain_token_still_stops(tokenizer):
    """A footer with no special token (its end-of-turn token added with special_tokens=False) stops at its first
    token, as before the rule that skips a footer's leading text."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["<|eot|>"], special_tokens=False)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>\n{% endfor %}"
    fmt = ChatFormat(tok)
    eot = tok.convert_tokens_to_ids("<|eot|>")
    assert fmt.footer("assistant")[0] == eot and eot not in fmt._no_text
    assert fmt.stop_ids("assistant") == {eot, tok.eos_token_id}


def test_a_footer_of_plain_text_is_no_stop_token(tokenizer):
    """A template whose turns end in a blank line: stopping at it would end every answer at its first paragraph
    break; only the tokenizer's EOS (and a special or added end-of-turn token, where there is one) stops."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    fmt = ChatFormat(tok)
    assert tok.convert_ids_to_tokens(fmt.footer("assistant")) == ["ĊĊ"]
    assert fmt.stop_ids("assistant") == {tok.eos_token_id}
