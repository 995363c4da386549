"""A chat template that writes a BOS token once per conversation (Llama 3 style): every executor holds it once,
shared by every call at position 0, and messages start after it (docs/protocols.md, "Engine facts")."""

from __future__ import annotations

import copy

import pytest
import torch

import choreo
from choreo.chat import ChatFormat
from tests.conftest import build_tiny
from tests.helpers import CONVERSATION, hf_greedy, make_executor, prefill_serial, serial_prompt_ids

BOS_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = BOS_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bos_model(bos_tokenizer):
    return build_tiny(bos_tokenizer, "llama-gqa")


def test_the_prefix_belongs_to_no_message(tokenizer, bos_tokenizer):
    fmt = ChatFormat(bos_tokenizer)
    assert fmt.prefix_ids == [bos_tokenizer.bos_token_id]
    assert fmt.header("system")[0] != bos_tokenizer.bos_token_id
    assert ChatFormat(tokenizer).prefix_ids == []  # ChatML: its bos_token opens every turn, not a conversation


CONVERSATIONS = {"with a system turn": CONVERSATION, "without one": CONVERSATION[1:],
                 "two system turns": [("system", "You are Alice."), ("system", "You are Bob.")] + CONVERSATION[1:]}


@pytest.mark.parametrize("kind", ["choreographed", "reference", "baseline", "baseline-reuse"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_serial_parents_equal_hugging_face_generate(bos_model, bos_tokenizer, kind, name):
    conversation = CONVERSATIONS[name]
    prompt = serial_prompt_ids(bos_tokenizer, conversation)
    assert prompt.count(bos_tokenizer.bos_token_id) == 1  # one BOS however many system turns
    ex = make_executor(kind, bos_model)
    msgs = prefill_serial(ex, conversation)
    out = ex.decode(role="assistant", parents=msgs, max_tokens=8)
    assert out.tokens == hf_greedy(bos_model, prompt, 8)
    assert msgs[0].start == 1 and out.start == msgs[-1].end


def test_the_prefix_is_cached_once_and_read_by_every_call(bos_model):
    ch = choreo.Choreographer(bos_model)
    alice = ch.prefill("You are Alice.", role="system")
    bob = ch.prefill("You are Bob.", role="system")
    assert alice.start == bob.start == 1 and alice.floor == 1
    assert ch.memory()["tokens_used"] == 1 + alice.length + bob.length and ch.memory()["messages"] == 2
    assert choreo.linearize([alice, bob]) == [1, 1 + alice.length]
    # A call with no parents still reads the prefix: it equals re-encoding BOS + its own tokens.
    alone = ch.decode(role="assistant", teacher_tokens=[5, 6], keep_logits=True)
    base = choreo.Baseline(bos_model).decode(role="assistant", teacher_tokens=[5, 6], keep_logits=True)
    assert alone.start == base.start == 1
    torch.testing.assert_close(alone.logits, base.logits, atol=1e-9, rtol=1e-9)
    ch.free(alice, bob, alone)
    assert ch.memory()["tokens_used"] == 1  # the prefix stays for the executor's lifetime


@pytest.mark.parametrize("what", ["bad-teacher-token", "decode-over-capacity", "batch-over-capacity",
                                  "prefill-over-capacity"])
def test_a_refused_first_call_leaves_no_prefix(bos_model, what):
    """The prefix's rows are reserved by the first call and encoded only once that call is accepted: a refused
    first call leaves the executor as it was (no row, no pass, the same peak), and the next call works."""
    from choreo.cache import CapacityError

    ch = choreo.Choreographer(bos_model, capacity=256)
    action, error = {
        "bad-teacher-token": (lambda: ch.decode(role="assistant", teacher_tokens=[10 ** 7]), ValueError),
        "decode-over-capacity": (lambda: ch.decode(role="assistant", max_tokens=1000), ValueError),  # names it
        "batch-over-capacity": (lambda: ch.decode([choreo.Call(max_tokens=100) for _ in range(3)]), CapacityError),
        "prefill-over-capacity": (lambda: ch.prefill("word " * 500, role="user"), CapacityError),
    }[what]
    before = (ch.memory(), ch.engine.forward_passes)
    with pytest.raises(error):
        action()
    assert (ch.memory(), ch.engine.forward_passes) == before
    msg = ch.decode(role="assistant", max_tokens=3)
    assert ch.memory()["tokens_used"] == ch.floor + msg.length and msg.start == ch.floor
