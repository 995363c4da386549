from __future__ import annotations

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
