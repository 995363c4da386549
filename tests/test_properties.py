"""Hypothesis: over random message DAGs, offsets and parallel calls, the torch backend equals the dense reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import choreo

WORDS = ["red", "blue", "cats", "sing", "under", "the", "moon", "seven", "quietly", "river", "and", "why?"]


@st.composite
def programs(draw):
    """A random choreography: prefills with random parents/offsets, then a parallel batch of teacher-forced calls."""
    n_prefill = draw(st.integers(1, 5))
    steps = []
    for i in range(n_prefill):
        parents = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=3)) if i else []
        offsets = ([draw(st.one_of(st.none(), st.integers(0, 60))) for _ in parents]
                   if parents and draw(st.booleans()) else None)
        new_offset = draw(st.one_of(st.none(), st.integers(0, 80)))
        text = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)))
        role = draw(st.sampled_from(["system", "user", "assistant:ann"]))
        steps.append((text, role, parents, offsets, new_offset))
    calls = []
    for _ in range(draw(st.integers(1, 3))):
        parents = draw(st.lists(st.integers(0, n_prefill - 1), unique=True, max_size=4))
        offsets = ([draw(st.one_of(st.none(), st.integers(0, 60))) for _ in parents]
                   if parents and draw(st.booleans()) else None)
        teacher = draw(st.lists(st.integers(3, 400), min_size=1, max_size=5))
        calls.append((parents, offsets, teacher))
    return steps, calls


def run(model, attention, program):
    steps, calls = program
    ch = choreo.Choreographer(model, attention=attention)
    msgs = []
    for text, role, parents, offsets, new_offset in steps:
        msgs.append(ch.prefill(text, role=role, parents=[msgs[p] for p in parents], offsets=offsets,
                               new_offset=new_offset))
    out = ch.decode([choreo.Call(parents=[msgs[p] for p in parents], offsets=offsets, teacher_tokens=teacher,
                                 keep_logits=True)
                     for parents, offsets, teacher in calls])
    greedy = ch.decode([choreo.Call(parents=[msgs[p] for p in parents], offsets=offsets, max_tokens=4)
                        for parents, offsets, _ in calls])
    return ch, msgs, out, greedy


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs())
def test_torch_backend_matches_dense_reference(tiny_gqa, program):
    ch_t, msgs_t, out_t, greedy_t = run(tiny_gqa, "torch", program)
    ch_r, msgs_r, out_r, greedy_r = run(tiny_gqa, "reference", program)
    for a, b in zip(msgs_t, msgs_r):
        assert (a.start, a.ids) == (b.start, b.ids)
        torch.testing.assert_close(ch_t.engine.store.read(a.row, a.length)[0],
                                   ch_r.engine.store.read(b.row, b.length)[0], atol=1e-9, rtol=1e-9)
    for a, b in zip(out_t, out_r):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert [m.tokens for m in greedy_t] == [m.tokens for m in greedy_r]
