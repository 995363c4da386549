"""Bad input gets an error naming the bad value, and leaves the cache exactly as it was."""

from __future__ import annotations

import pytest

import choreo
from choreo.cache import CapacityError


def snapshot(ex):
    memory = {k: v for k, v in ex.memory().items() if k != "tokens_peak"}  # a high-water mark may move
    return memory, list(ex.engine.store._free), [m.id for m in ex.messages]


@pytest.fixture(params=["choreographed", "baseline"])
def setup(request, tiny_gqa):
    cls = choreo.Choreographer if request.param == "choreographed" else choreo.Baseline
    ex = cls(tiny_gqa, capacity=256)
    sys = ex.prefill("Be brief.", role="system")
    gone = ex.prefill("Forget me.", role="user", parents=[sys])
    ex.free(gone)
    return ex, sys, gone


BAD = {
    "unknown parent id": (lambda ex, s, g: ex.decode(role="assistant", parents=[12345]), KeyError, "12345"),
    "freed parent": (lambda ex, s, g: ex.decode(role="assistant", parents=[g]), KeyError, "freed"),
    "offsets length": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[0, 1]), ValueError, "2 entries"),
    "negative offset": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], offsets=[-4]), ValueError, "-4"),
    "negative new_offset": (lambda ex, s, g: ex.prefill("x", role="user", new_offset=-1), ValueError, "-1"),
    "empty text": (lambda ex, s, g: ex.prefill("", role="user", parents=[s]), ValueError, "non-empty"),
    "unknown role": (lambda ex, s, g: ex.prefill("hi", role="wizard", parents=[s]), ValueError, "wizard"),
    "max_tokens 0": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], max_tokens=0), ValueError, "max_tokens"),
    "top_p 0": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], top_p=0.0), ValueError, "top_p"),
    "duplicate parent": (lambda ex, s, g: ex.decode(role="assistant", parents=[s, s]), ValueError, "twice"),
    "capacity exceeded": (lambda ex, s, g: ex.decode(role="assistant", parents=[s], max_tokens=1000),
                          CapacityError, "capacity"),
    "one bad call in a parallel batch": (
        lambda ex, s, g: ex.decode([choreo.Call(parents=[s], max_tokens=5), choreo.Call(parents=[s], max_tokens=900)]),
        CapacityError, "capacity"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_rejected_and_the_cache_is_unchanged(setup, case):
    ex, sys, gone = setup
    action, error, text = BAD[case]
    before = snapshot(ex)
    with pytest.raises(error, match=text):
        action(ex, sys, gone)
    assert snapshot(ex) == before
    # ... and the executor still works.
    assert ex.decode(role="assistant", parents=[sys], max_tokens=2).tokens


def test_free_twice_is_an_error(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    m = ch.prefill("hello", role="user")
    ch.free(m)
    with pytest.raises(KeyError, match="freed"):
        ch.free(m)


def test_message_of_another_executor_is_rejected(tiny_gqa):
    a, b = choreo.Choreographer(tiny_gqa), choreo.Choreographer(tiny_gqa)
    m = a.prefill("hello", role="user")
    b.prefill("other", role="user")
    with pytest.raises(KeyError):
        b.decode(role="assistant", parents=[m])


def test_unknown_attention_backend():
    with pytest.raises(ValueError, match="'flash'"):
        choreo.attention.get_backend("flash")


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        choreo.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        choreo.load_model(str(tmp_path))
