"""Positions, parallel calls, re-positioning, leakage and blockage (docs/semantics.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import choreo
from choreo.model import rerotate


def test_default_start_is_one_past_the_largest_visible_position(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system")
    assert sys.start == 0
    a = ch.prefill("Question one?", role="user", parents=[sys])
    b = ch.prefill("Question two, longer than one?", role="user", parents=[sys])
    assert a.start == b.start == sys.end  # parallel siblings share positions
    ans = ch.decode(role="assistant", parents=[sys, a, b], max_tokens=3)
    assert ans.start == max(a.end, b.end)
    moved = ch.decode(role="assistant", parents=[sys, a], offsets=[None, 100], max_tokens=2)
    assert moved.start == 100 + a.length
    fixed = ch.decode(role="assistant", parents=[sys], new_offset=7, max_tokens=2)
    assert fixed.start == 7


def test_linearize_lays_parents_back_to_back(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system")
    a = ch.prefill("Question one?", role="user", parents=[sys])
    b = ch.prefill("Question two?", role="user", parents=[sys])
    assert choreo.linearize([sys, a, b]) == [0, sys.length, sys.length + a.length]
    assert choreo.linearize([a, b], start=5) == [5, 5 + a.length]


@pytest.mark.parametrize("delta", [-3, 1, 17, 250])
def test_moving_a_message_equals_encoding_it_there(tiny_gqa, delta):
    """Keys rotated by delta at read time equal the keys of the conversation encoded delta later."""
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("You are a poet.", role="system", new_offset=10)
    here = ch.prefill("Write about rain.", role="user", parents=[sys])
    sys_later = ch.prefill("You are a poet.", role="system", new_offset=10 + delta)
    there = ch.prefill("Write about rain.", role="user", parents=[sys_later])
    assert there.start == here.start + delta
    k = ch.engine.store.k
    for layer in range(tiny_gqa.spec.n_layers):
        k_here = k[layer][:, here.row:here.row + here.length]  # (Hkv, n, D)
        k_there = k[layer][:, there.row:there.row + there.length]
        moved = rerotate(k_here, torch.full((here.length,), delta), tiny_gqa.inv_freq)
        torch.testing.assert_close(moved, k_there, atol=1e-6, rtol=1e-6)
    # Values never change with position (layer 0 sees identical inputs).
    v = ch.engine.store.v[0]
    torch.testing.assert_close(v[:, here.row:here.row + here.length], v[:, there.row:there.row + there.length])


def test_offsets_equal_reencoding_at_the_new_positions(tiny_gqa):
    """Attending to a parent moved by an offset == attending to a copy prefilled at that position."""
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("You are a poet.", role="system")
    copy = ch.prefill("You are a poet.", role="system", new_offset=40)
    teacher = [11, 22, 33]
    a = ch.decode(role="assistant", parents=[sys], offsets=[40], teacher_tokens=teacher, keep_logits=True)
    b = ch.decode(role="assistant", parents=[copy], teacher_tokens=teacher, keep_logits=True)
    assert a.start == b.start
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_parallel_decoding_equals_decoding_each_alone(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("You are a poet.", role="system")
    qs = [ch.prefill(t, role="user", parents=[sys]) for t in ("Rain?", "A long question about snow and ice?", "Sun")]
    calls = [choreo.Call(role="assistant", parents=[sys, q], max_tokens=10 + 3 * i) for i, q in enumerate(qs)]
    together = ch.decode(calls)
    alone = [ch.decode([c])[0] for c in calls]
    assert [m.tokens for m in together] == [m.tokens for m in alone]


def test_sampling_is_reproducible_and_independent_of_batching(tiny_gqa):
    def run(parallel: bool):
        ch = choreo.Choreographer(tiny_gqa)
        sys = ch.prefill("You are a poet.", role="system")
        calls = [choreo.Call(role="assistant", parents=[sys], max_tokens=12, temperature=1.0, top_p=0.9, seed=s)
                 for s in range(4)]
        return [m.tokens for m in (ch.decode(calls) if parallel else [ch.decode([c])[0] for c in calls])]

    first = run(True)
    assert first == run(True) == run(False)
    assert len({tuple(t) for t in first}) > 1  # different seeds draw different samples


def test_siblings_do_not_see_each_other(tiny_gqa):
    """Blockage: a message's encoding is the same whether or not a parallel sibling exists."""
    alone = choreo.Choreographer(tiny_gqa)
    sys = alone.prefill("Answer both.", role="system")
    q2 = alone.prefill("What is two plus two?", role="user", parents=[sys])
    both = choreo.Choreographer(tiny_gqa)
    sys_b = both.prefill("Answer both.", role="system")
    both.prefill("What is the capital of France?", role="user", parents=[sys_b])
    q2_b = both.prefill("What is two plus two?", role="user", parents=[sys_b])
    for store, m in ((alone.engine.store, q2), (both.engine.store, q2_b)):
        assert m.start == sys.length
    k_alone = alone.engine.store.read(q2.row, q2.length)[0]
    k_both = both.engine.store.read(q2_b.row, q2_b.length)[0]
    torch.testing.assert_close(k_alone, k_both)
    # ... while a serial encoding of the same message differs (it would see the first question).
    serial = choreo.Choreographer(tiny_gqa)
    s = serial.prefill("Answer both.", role="system")
    q1 = serial.prefill("What is the capital of France?", role="user", parents=[s])
    q2_s = serial.prefill("What is two plus two?", role="user", parents=[s, q1])
    k_serial = serial.engine.store.read(q2_s.row, q2_s.length)[0]
    assert not torch.allclose(k_serial[1:], k_alone[1:])


@pytest.mark.model
def test_leakage_is_visible_on_the_embedded_model(model):
    """A consumer of a message encoded with a secret in view differs from the re-encoding baseline."""
    secret = "The password is PLUM-42. Never reveal it."
    teacher = model.tokenizer.encode("The password is", add_special_tokens=False)
    out = {}
    for kind, ex in (("choreo", choreo.Choreographer(model)), ("baseline", choreo.Baseline(model))):
        private = ex.prefill(secret, role="system")
        public = ex.decode(role="assistant:alice", parents=[private], teacher_tokens=model.tokenizer.encode(
            "Hello Bob, nice weather today.", add_special_tokens=False))
        bob_sys = ex.prefill("You are Bob.", role="system")
        ask = ex.prefill("What was the password Alice was told?", role="user", parents=[bob_sys, public])
        out[kind] = ex.decode(role="assistant", parents=[bob_sys, public, ask], teacher_tokens=teacher,
                              keep_logits=True)
    p_choreo, p_base = (out[k].logits.log_softmax(-1) for k in ("choreo", "baseline"))
    kl = torch.nn.functional.kl_div(p_choreo, p_base, log_target=True, reduction="batchmean")
    assert kl > 1e-3, f"no visible difference between cached and re-encoded messages (KL {kl:.2e})"


def test_raw_segments_in_series_equal_the_whole_turn(tiny_gqa):
    """role="raw" pieces of one user turn, each attending to the earlier ones, encode exactly like the turn."""
    ch = choreo.Choreographer(tiny_gqa)
    whole = ch.prefill("Question 1: Rain?\nQuestion 2: Snow?", role="user")
    head = ch.prefill("<|im_start|>user\nQuestion 1: Rain?\n", role="raw")
    tail = ch.prefill("Question 2: Snow?<|im_end|>\n", role="raw", parents=[head])
    assert head.ids + tail.ids == whole.ids and tail.start == head.length
    store = ch.engine.store
    torch.testing.assert_close(torch.cat([store.read(head.row, head.length)[0],
                                          store.read(tail.row, tail.length)[0]], 2),
                               store.read(whole.row, whole.length)[0], atol=1e-9, rtol=1e-9)
    with pytest.raises(ValueError, match="raw"):
        ch.decode(role="raw", parents=[head])


def test_visibility_is_not_transitive(tiny_gqa):
    """C lists only B; B was encoded over A. Overwriting A's cached rows after B is encoded leaves C unchanged:
    C reads B's keys and values, never A's."""
    def c_logits(spoil: bool):
        ch = choreo.Choreographer(tiny_gqa)
        a = ch.prefill("Alpha says the secret word is lantern.", role="system")
        b = ch.prefill("Beta repeats what it heard.", role="user", parents=[a])
        if spoil:
            store = ch.engine.store
            for layer in range(len(store.k)):
                store.k[layer][:, a.row:a.row + a.length] = 1e3
                store.v[layer][:, a.row:a.row + a.length] = -1e3
        return ch.decode(role="assistant", parents=[b], teacher_tokens=[5, 6, 7], keep_logits=True).logits

    assert torch.equal(c_logits(spoil=False), c_logits(spoil=True))


def test_parallel_decode_siblings_share_their_start(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system")
    q = ch.prefill("Name a colour.", role="user", parents=[sys])
    x, y = ch.decode([choreo.Call(parents=[sys, q], max_tokens=3, temperature=1.0, seed=s) for s in (0, 1)])
    assert x.start == y.start == q.end


def test_a_turn_ends_at_its_end_of_turn_token_without_keeping_it(tiny_gqa, monkeypatch):
    """The sampled stop token is not content; the footer is written once and the unused reservation is returned."""
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system")
    free = ch.decode(role="assistant", parents=[sys], max_tokens=6)  # what greedy decoding produces here
    stop = free.tokens[2]
    monkeypatch.setattr(ch.format, "stop_ids", lambda role: frozenset({stop}))
    used = ch.memory()["tokens_used"]
    cut = ch.decode(role="assistant", parents=[sys], max_tokens=6)
    assert cut.tokens == free.tokens[:2] and stop not in cut.tokens
    footer = ch.format.footer("assistant")
    assert cut.ids[-len(footer):] == footer and cut.ids.count(footer[0]) == 1
    assert ch.memory()["tokens_used"] == used + cut.length  # the 6-token reservation shrank to the message


@pytest.mark.parametrize("kind", ["choreographed", "baseline"])
@pytest.mark.parametrize("k", [1, 16, 17, 40])
def test_generation_stops_once_the_stop_string_is_complete(tiny_gqa, kind, k):
    """However long the stop string (the text of the first k tokens greedy decoding gives), the call ends on the
    token that completes it, keeps that token, and closes the turn."""
    ex = choreo.Choreographer(tiny_gqa) if kind == "choreographed" else choreo.Baseline(tiny_gqa)
    sys = ex.prefill("You are terse.", role="system")
    q = ex.prefill("Hi there", role="user", parents=[sys])
    free = ex.decode(role="assistant", parents=[sys, q], max_tokens=60)
    assert len(free.tokens) == 60  # the tiny model never ends its turn by itself here
    stop = ex.format.decode(free.tokens[:k])
    cut = ex.decode(role="assistant", parents=[sys, q], max_tokens=60, stop=["never in the text", stop])
    assert cut.tokens == free.tokens[:k] and cut.text == stop
    assert cut.ids[-len(ex.format.footer("assistant")):] == ex.format.footer("assistant")


PREFILL_TEXTS = ["Hello", "\nHello", "\n\nHello", "\n", " ", "Hello\n\n"]


@pytest.mark.parametrize("text", PREFILL_TEXTS, ids=[repr(t) for t in PREFILL_TEXTS])
def test_a_prefills_tokens_hold_its_text_however_it_tokenizes(tiny_gqa, text):
    """The turn is encoded as the template renders it (a leading newline may merge with the header's); its
    ``tokens`` are the ones that hold the text, in both executors, and both still decode alike after it."""
    out = {}
    for kind in ("choreographed", "baseline"):
        ex = choreo.Choreographer(tiny_gqa) if kind == "choreographed" else choreo.Baseline(tiny_gqa)
        sys = ex.prefill("You are terse.", role="system")
        msg = ex.prefill(text, role="user", parents=[sys])
        assert msg.ids == ex.format.encode(text, "user") and msg.text == text
        assert text in tiny_gqa.tokenizer.decode(msg.tokens) and msg.tokens
        out[kind] = msg.ids, msg.content, ex.decode(role="assistant", parents=[sys, msg], max_tokens=6).tokens
    assert out["choreographed"] == out["baseline"]


INTEGERS = {"int": int, "numpy int64": np.int64, "numpy uint8": np.uint8, "numpy int32": np.int32,
            "0-d torch tensor": torch.tensor}


@pytest.mark.parametrize("kind", list(INTEGERS), ids=list(INTEGERS))
def test_positions_may_be_any_integer_type(tiny_gqa, kind):
    """Offsets, new_offset and linearize's start accept numpy and 0-d torch integers, stored as Python ints."""
    as_int = INTEGERS[kind]
    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system", new_offset=as_int(0))
    q = ch.prefill("Name a colour.", role="user", parents=[sys], offsets=[as_int(5)], new_offset=as_int(30))
    a = ch.decode(role="assistant", parents=[sys, q], offsets=choreo.linearize([sys, q], start=as_int(2)),
                  max_tokens=2)
    assert (sys.start, q.start, a.start) == (0, 30, 2 + sys.length + q.length)
    assert all(type(m.start) is int for m in (sys, q, a))


@pytest.mark.parametrize("kind", ["choreographed", "baseline"])
def test_a_pass_computes_logits_only_for_the_rows_its_calls_read(tiny_gqa, kind):
    """A teacher-forced call beside a long prompt: the pass's logits hold the forced call's content and end of turn
    and the other call's last row, not every row of the pass (a Baseline call's whole re-encoded prompt), and the
    forced call's log-probabilities are those of the same call alone."""
    ex = choreo.Choreographer(tiny_gqa) if kind == "choreographed" else choreo.Baseline(tiny_gqa)
    ex.engine.pass_rows = 1 << 20  # both calls in one pass, however padded (``first_chunk_passes``)
    long = ex.prefill("word " * 80, role="user")
    short = ex.prefill("hi", role="user")
    forced = choreo.Call(parents=[short], teacher_tokens=[11, 12, 13], keep_logits=True)
    alone = ex.decode([forced])[0]
    shapes, forward = [], tiny_gqa.forward

    def recording(*args, logits_index=None, **kwargs):
        shapes.append(tuple(logits_index.shape))
        return forward(*args, logits_index=logits_index, **kwargs)

    tiny_gqa.forward = recording
    try:
        _, together = ex.decode([choreo.Call(parents=[long], max_tokens=1), forced])
    finally:
        del tiny_gqa.forward
    assert shapes[0] == (2, 3 + 1)  # three forced tokens and the end of turn; the long prompt's last row
    assert together.logits.shape == (3, tiny_gqa.spec.vocab_size)
    np.testing.assert_allclose(together.logprobs, alone.logprobs, rtol=0, atol=1e-9)
