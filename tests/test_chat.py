from __future__ import annotations

import pytest

from choreo.chat import ChatFormat, parse_role


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
