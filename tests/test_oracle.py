"""Random choreography programs on every executor against the independent oracles of ``tests/oracle.py``, with
the cache's bookkeeping checked after every step (docs/semantics.md).

A program is a list of ops over message *indices*: ``Prefill``, ``Decode`` (one parallel batch), ``Free`` and
``Refused`` (a batch every executor must refuse). Each prefill and each call of a batch takes the next index, so
the ops of one program mean the same on every executor. An op that names a message an executor never made (its
creation was refused for capacity) is skipped there.

What ``tests/test_properties.py`` (torch backend == dense reference) and ``tests/test_semantics.py`` (one rule per
test) leave out is checked here: sampled and stopped decoding, moved parents (explicit offsets, linearize,
negative shifts) read by later calls, frees and row reuse under capacity pressure, the BOS-template prefix, the
re-encoding baseline with and without prefix reuse, and the runner.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import choreo
from choreo.cache import CapacityError
from tests.conftest import build_tiny
from tests.helpers import CONVERSATION, hf_greedy, serial_prompt_ids
from tests.oracle import BaselineOracle, Block, Oracle, Turn, block_mask
from tests.test_bos import BOS_TEMPLATE

WORDS = ["red", "blue", "cats", "sing", "under", "the", "moon", "seven", "quietly", "river", "and", "why?", "Q:",
         "1.", "ok", "no"]
VOCAB = 49152  # the embedded tokenizer's, which every tiny model uses
AMPLE = 1024  # tokens of capacity no program comes near (the store's initial size: it never grows)
# CI must not depend on an example database or on chance: the examples are a function of the test alone.
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are far too small to gain from intra-op threads, and on a loaded 2-core machine threads
    that wait for each other make them ~10x slower (one property: 1.5 s with one thread, 14-19 s with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tokenizer):
    """models(template, kind): a tiny fp64 model over ChatML ("chatml", the embedded tokenizer's template) or over
    a template that writes one BOS token per conversation ("bos", ``tests/test_bos.py``)."""
    if len(tokenizer) != VOCAB:
        pytest.skip(f"the programs draw teacher token ids for the embedded tokenizer's {VOCAB}, not {len(tokenizer)}")
    bos = copy.deepcopy(tokenizer)
    bos.bos_token, bos.chat_template = "<|endoftext|>", BOS_TEMPLATE
    tokenizers = {"chatml": tokenizer, "bos": bos}
    return functools.cache(lambda template, kind="llama-gqa": build_tiny(tokenizers[template], kind))


# ------------------------------------------------------------------------------------------------ programs
class Lin(NamedTuple):
    """offsets = ``choreo.linearize(parents, start)``: the parents back to back from ``start`` (None: the floor)."""

    start: int | None = None


Offsets = None | Lin | tuple[int | None, ...]  # None: every parent where it is; a tuple: per parent (None keeps it)


class CallSpec(NamedTuple):
    parents: tuple[int, ...]
    offsets: Offsets
    fields: dict  # the other keyword fields of ``choreo.Call``


class Prefill(NamedTuple):
    text: str
    role: str
    parents: tuple[int, ...]
    offsets: Offsets
    new_offset: int | None


class Decode(NamedTuple):
    calls: tuple[CallSpec, ...]  # one parallel batch


class Free(NamedTuple):
    targets: tuple[int, ...]


class Refused(NamedTuple):
    """A parallel batch whose last call is bad, so the whole batch must be refused and leave no trace, the rows
    reserved for the calls before it included: "freed-parent" (it also reads message ``freed``: KeyError),
    "bad-teacher-token" (the id vocab_size: ValueError) or "over-capacity" (max_tokens = capacity: ValueError naming it;
    CapacityError where the baseline's re-encoded prompt alone outgrows the store)."""

    why: str
    calls: tuple[CallSpec, ...]
    freed: int | None = None


REFUSALS = {"freed-parent": KeyError, "bad-teacher-token": ValueError, "over-capacity": ValueError}


@st.composite
def placements(draw, live):
    """(parents, offsets, new_offset) over the live message indices."""
    parents = tuple(draw(st.lists(st.sampled_from(sorted(live)), unique=True, max_size=4))) if live else ()
    mode = draw(st.sampled_from(["default", "default", "linearize", "linearize-at", "explicit"]))
    offsets = None
    if parents and mode == "linearize":
        offsets = Lin()
    elif parents and mode == "linearize-at":
        offsets = Lin(draw(st.integers(0, 50)))
    elif parents and mode == "explicit":  # often below the parent's start: a negative shift
        offsets = tuple(draw(st.one_of(st.none(), st.integers(0, 70))) for _ in parents)
    return parents, offsets, draw(st.one_of(st.none(), st.none(), st.integers(0, 90)))


@st.composite
def call_specs(draw, live):
    parents, offsets, new_offset = draw(placements(live))
    fields = dict(role=draw(st.sampled_from(["assistant", "assistant:bob", "user"])), new_offset=new_offset,
                  prefix=draw(st.sampled_from(["", "", "To Bob: ", '{"d": '])))
    if draw(st.integers(0, 3)) == 0:  # teacher forcing, of any ids (special ones included); [] forces an empty turn
        teacher = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5)) if draw(st.integers(0, 3)) else []
        fields.update(teacher_tokens=teacher, keep_logits=True)
    else:
        fields["max_tokens"] = draw(st.integers(1, 6))
        if draw(st.booleans()):  # 1e-30: logits / t overflow, the draw is among the max-logit tokens
            fields.update(temperature=draw(st.sampled_from([1e-30, 0.7, 1.0, 1.5])),
                          top_p=draw(st.sampled_from([1.0, 0.9, 0.5])), seed=draw(st.integers(0, 2 ** 32 - 1)))
        if draw(st.booleans()):  # "x ": tokens rarely end in a space, so these stops span two tokens
            stops = ["e", "the", "\n", "e ", "s ", "t ", "d "]
            fields.update(stop=draw(st.lists(st.sampled_from(stops), min_size=1, max_size=2)),
                          max_tokens=draw(st.integers(4, 12)))
    return CallSpec(parents, offsets, fields)


@st.composite
def programs(draw, max_ops: int = 7, refusals: bool = True):
    ops, live, freed, n = [], set(), set(), 0  # n: indices taken so far
    kinds = ["prefill", "prefill", "decode", "decode", "decode", "free", "free"] + ["refused"] * refusals
    for _ in range(draw(st.integers(2, max_ops))):
        kind = draw(st.sampled_from(kinds))
        if kind == "free" and live:
            targets = tuple(draw(st.lists(st.sampled_from(sorted(live)), unique=True, min_size=1, max_size=2)))
            ops.append(Free(targets))
            live -= set(targets)
            freed |= set(targets)
        elif kind == "refused":
            why = draw(st.sampled_from(sorted(REFUSALS) if freed else ["bad-teacher-token", "over-capacity"]))
            *good, bad = draw(st.lists(call_specs(live), min_size=1, max_size=3))
            gone = draw(st.sampled_from(sorted(freed))) if why == "freed-parent" else None
            if gone is not None:
                offsets = bad.offsets + (None,) if isinstance(bad.offsets, tuple) else bad.offsets
                bad = bad._replace(parents=bad.parents + (gone,), offsets=offsets)
            ops.append(Refused(why, (*good, bad), gone))
        elif kind == "decode":
            batch = tuple(draw(st.lists(call_specs(live), min_size=1, max_size=3)))
            ops.append(Decode(batch))
            live |= set(range(n, n + len(batch)))
            n += len(batch)
        else:
            parents, offsets, new_offset = draw(placements(live))
            text = " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)))
            role = draw(st.sampled_from(["system", "user", "assistant", "assistant:ann", "raw"]))
            ops.append(Prefill(text, role, parents, offsets, new_offset))
            live.add(n)
            n += 1
    return ops


def created(op) -> int:
    """How many message indices an op takes."""
    return 1 if isinstance(op, Prefill) else len(op.calls) if isinstance(op, Decode) else 0


# ------------------------------------------------------------------------------------------------ executors
class Run(NamedTuple):
    outcomes: list[str]  # per op: "ok", "refused", "skip" or "CapacityError"
    made: dict[int, choreo.Message]  # every message made, by index, freed ones included


def executor_offsets(spec: Offsets, parents: list[choreo.Message]):
    return choreo.linearize(parents, spec.start) if isinstance(spec, Lin) else spec


def to_call(spec: CallSpec, msgs: dict) -> choreo.Call:
    parents = [msgs[i] for i in spec.parents]
    return choreo.Call(parents=parents, offsets=executor_offsets(spec.offsets, parents), **spec.fields)


def apply(ex, op, first: int, made: dict, live: dict) -> str:
    """Run one op on an executor; ``first``: the first index it takes. Returns its outcome."""
    if isinstance(op, Free):
        if not all(i in live for i in op.targets):
            return "skip"
        ex.free(*[live.pop(i) for i in op.targets])
    elif isinstance(op, Prefill):
        if not all(i in live for i in op.parents):
            return "skip"
        parents = [live[i] for i in op.parents]
        made[first] = live[first] = ex.prefill(op.text, role=op.role, parents=parents, new_offset=op.new_offset,
                                               offsets=executor_offsets(op.offsets, parents))
    elif isinstance(op, Decode):
        if not all(i in live for c in op.calls for i in c.parents):
            return "skip"
        for k, msg in enumerate(ex.decode([to_call(c, live) for c in op.calls])):
            made[first + k] = live[first + k] = msg
    else:
        if not all(i in made for c in op.calls for i in c.parents) or op.freed in live:
            return "skip"  # a parent was never made, or the message to be read freed was never freed here
        *good, bad = [to_call(c, made) for c in op.calls]
        bad = dataclasses.replace(bad, **{
            "freed-parent": {}, "bad-teacher-token": dict(teacher_tokens=[3, ex.model.spec.vocab_size]),
            "over-capacity": dict(teacher_tokens=None, keep_logits=False, max_tokens=ex.engine.store.capacity)}[op.why])
        with pytest.raises((REFUSALS[op.why], CapacityError)):  # under pressure a good call may be refused first
            ex.decode([*good, bad])
        return "refused"
    return "ok"


def held(ex) -> list[choreo.Message]:
    """What owns store rows: a Choreographer's listed messages and its BOS prefix; a Baseline's internal encodings
    (kept while a chain may be reused, else released at the end of each call)."""
    if isinstance(ex, choreo.Baseline):
        return list(ex._internal.values())
    return ex.messages + ([ex._prefix] if ex._prefix is not None else [])


def state(ex) -> tuple:
    """Everything a refused call must leave as it was: usage and peak, free rows, messages, passes, owners."""
    owners = [(m.row, m.length) for m in held(ex)]
    extra = (dict(ex._refs), sorted(ex._chains)) if isinstance(ex, choreo.Baseline) else ()
    return (ex.memory(), list(ex.engine.store._free), [m.id for m in ex.messages], ex.engine.forward_passes,
            owners, extra)


def evicted_only(ex, before: tuple) -> bool:
    """Whether the state differs from ``before`` only by cached prompts a Baseline with prefix reuse evicted (it
    makes room for a call before knowing that the call still does not fit, as when the store is fragmented)."""
    if not (isinstance(ex, choreo.Baseline) and ex.prefix_reuse):
        return False
    now = state(ex)
    same = lambda i: now[i] == before[i]  # noqa: E731
    return (same(2) and same(3) and set(now[5][1]) < set(before[5][1])
            and now[0]["tokens_used"] < before[0]["tokens_used"] and now[0]["tokens_peak"] == before[0]["tokens_peak"])


def check_bookkeeping(ex, live: dict, snapshots: dict, peak_before: int) -> None:
    """After every op: counts, the peak, rows owned exactly once, and cached K/V never rewritten."""
    mem, store = ex.memory(), ex.engine.store
    assert mem["messages"] == len(live) and {m.id for m in ex.messages} == {m.id for m in live.values()}
    assert peak_before <= mem["tokens_peak"] and mem["tokens_used"] <= mem["tokens_peak"], mem
    assert mem["tokens_used"] <= mem["tokens_allocated"] <= mem["tokens_capacity"], mem
    owners = held(ex)
    if isinstance(ex, choreo.Baseline) and not ex.prefix_reuse:
        assert not owners, "the baseline kept an encoding it cannot reuse"
    rows = [r for m in owners for r in range(m.row, m.row + m.length)]
    free = [r for start, n in store._free for r in range(start, start + n)]
    assert len(rows) == mem["tokens_used"], (len(rows), mem)
    assert sorted(rows + free) == list(range(mem["tokens_allocated"])), "store rows owned twice, or lost"
    for m in owners:  # (L, Hkv, length, D) each
        k, v = store.read(m.row, m.length)
        if m in snapshots:
            assert torch.equal(k, snapshots[m][0]) and torch.equal(v, snapshots[m][1]), f"K/V of {m} changed"
        else:
            snapshots[m] = (k, v)
    for m in set(snapshots) - set(owners):
        del snapshots[m]


def run_program(ex, ops) -> Run:
    made, live, snapshots, outcomes, n = {}, {}, {}, [], 0
    for op in ops:
        first, n = n, n + created(op)
        before, peak = state(ex), ex.memory()["tokens_peak"]
        try:
            outcome = apply(ex, op, first, made, live)
        except CapacityError:  # a program may outgrow a small store
            outcome = "CapacityError"
        except ValueError as error:  # ... or a call may reserve more rows than it holds (max_tokens or teacher)
            if "more than the store's capacity" not in str(error):
                raise
            outcome = "CapacityError"
        if outcome != "ok":
            assert state(ex) == before or evicted_only(ex, before), f"{op} ({outcome}) changed the executor's state"
        check_bookkeeping(ex, live, snapshots, peak)
        outcomes.append(outcome)
    return Run(outcomes, made)


# ------------------------------------------------------------------------------------------------ oracles
def oracle_offsets(spec: Offsets, parents: list[Turn], floor: int):
    """What ``executor_offsets`` gives, computed apart: linearize starts at the floor (after BOS) by default."""
    if not isinstance(spec, Lin):
        return spec
    starts, pos = [], floor if spec.start is None else spec.start
    for p in parents:
        starts.append(pos)
        pos += len(p.ids)
    return starts


def run_oracle(oracle: Oracle, ops, outcomes) -> dict[int, Turn]:
    """The oracle's messages for the ops an executor ran ("ok"); parallel calls are computed one by one."""
    turns, n = {}, 0
    for op, outcome in zip(ops, outcomes):
        first, n = n, n + created(op)
        if outcome != "ok":
            continue
        if isinstance(op, Prefill):
            ps = [turns[i] for i in op.parents]
            turns[first] = oracle.prefill(op.text, op.role, ps, oracle_offsets(op.offsets, ps, oracle.floor),
                                          op.new_offset)
        elif isinstance(op, Decode):
            for k, c in enumerate(op.calls):
                ps = [turns[i] for i in c.parents]
                turns[first + k] = oracle.decode({**c.fields, "offsets": oracle_offsets(c.offsets, ps, oracle.floor)},
                                                 ps)
    return turns


def assert_same(got: dict, want: dict, what: str, *, subset: bool = False, atol: float = 1e-5) -> None:
    """The same messages (start, token ids, content range) and, for teacher-forced calls, the same logits.
    ``subset``: ``got`` may lack messages of ``want`` (those a small store refused)."""
    assert set(got) <= set(want) if subset else sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for i, m in got.items():
        w = want[i]
        assert (m.start, list(m.ids), tuple(m.content)) == (w.start, list(w.ids), tuple(w.content)), f"{what}: {i}"
        if w.logits is not None:
            torch.testing.assert_close(m.logits, w.logits, atol=atol, rtol=atol, msg=lambda e: f"{what}: {i}: {e}")


# ------------------------------------------------------------------------------------------------ the oracles
def test_block_mask_worked_example():
    a, b, c = Block([1, 2], [0, 1], []), Block([3, 4], [2, 3], [0]), Block([5], [4], [1])
    assert block_mask([a, b, c]).int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                     [1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("template", ["chatml", "bos"])
def test_the_oracles_of_a_serial_conversation_equal_hugging_face_generate(models, template):
    """Every turn reading the whole conversation before it is ordinary prompting, for both oracles."""
    model = models(template)
    want = hf_greedy(model, serial_prompt_ids(model.tokenizer, CONVERSATION), 8)
    for oracle in (Oracle(model, bos=template == "bos"), BaselineOracle(model, bos=template == "bos")):
        turns = []
        for role, text in CONVERSATION:
            turns.append(oracle.prefill(text, role, list(turns)))
        assert oracle.decode(dict(max_tokens=8), turns).tokens == want, type(oracle).__name__


# ------------------------------------------------------------------------------------------------ properties
# Each program runs in an ample store (no refusals for capacity: one oracle run covers every executor), then in a
# store of only ``tight`` tokens: there calls are refused, rows freed and reused, and every message that is still
# made must be the one the oracle made (a message depends only on its parents, made alike).
@pytest.mark.parametrize("template", ["chatml", "bos"])
@settings(max_examples=20, **SETTINGS)
@given(ops=programs(), kind=st.sampled_from(["llama-gqa", "qwen2-bias"]), tight=st.integers(16, 64))
def test_choreographer_matches_the_oracle(models, template, ops, kind, tight):
    """Torch and reference backends == the instance oracle: every message's start, tokens (greedy, sampled,
    stopped) and teacher-forced logits; bookkeeping after every op; refusals leave no trace."""
    model = models(template, kind)
    runs = {att: run_program(choreo.Choreographer(model, attention=att, capacity=AMPLE), ops)
            for att in ("torch", "reference")}
    assert runs["torch"].outcomes == runs["reference"].outcomes and "CapacityError" not in runs["torch"].outcomes
    turns = run_oracle(Oracle(model, bos=template == "bos"), ops, runs["torch"].outcomes)
    for att, run in runs.items():
        assert_same(run.made, turns, f"{att} vs oracle")
    pressed = run_program(choreo.Choreographer(model, capacity=tight), ops)
    assert_same(pressed.made, turns, f"capacity {tight} vs oracle", subset=True)


@pytest.mark.parametrize("template", ["chatml", "bos"])
@settings(max_examples=12, **SETTINGS)
@given(ops=programs(), tight=st.integers(16, 64))
def test_baseline_matches_the_serial_prompt_oracle(models, template, ops, tight):
    """Baseline, with and without prefix reuse, == plain causal prompting of BOS + parents by position + header;
    with reuse (cached chains hold rows) also in a tight store."""
    model = models(template)
    runs = {reuse: run_program(choreo.Baseline(model, prefix_reuse=reuse, capacity=AMPLE), ops)
            for reuse in (False, True)}
    assert runs[False].outcomes == runs[True].outcomes and "CapacityError" not in runs[False].outcomes
    turns = run_oracle(BaselineOracle(model, bos=template == "bos"), ops, runs[False].outcomes)
    for reuse, run in runs.items():
        assert_same(run.made, turns, f"baseline (prefix_reuse={reuse}) vs oracle")
    pressed = run_program(choreo.Baseline(model, prefix_reuse=True, capacity=tight), ops)
    assert_same(pressed.made, turns, f"baseline (prefix_reuse=True, capacity {tight}) vs oracle", subset=True)


async def workflow(session, ops):
    """A program without refusals as a runner workflow; returns every message it made, by index."""
    made, live, n = {}, {}, 0
    for op in ops:
        first, n = n, n + created(op)
        if isinstance(op, Free):
            session.free(*[live.pop(i) for i in op.targets])
        elif isinstance(op, Prefill):
            parents = [live[i] for i in op.parents]
            made[first] = live[first] = await session.prefill(op.text, role=op.role, parents=parents,
                                                              offsets=executor_offsets(op.offsets, parents),
                                                              new_offset=op.new_offset)
        else:
            for k, msg in enumerate(await session.decode([to_call(c, live) for c in op.calls])):
                made[first + k] = live[first + k] = msg
    return made


@pytest.mark.parametrize("executor", ["choreo", "baseline", "reuse"])
@settings(max_examples=6, **SETTINGS)
@given(progs=st.lists(programs(max_ops=5, refusals=False), min_size=2, max_size=3),
       template=st.sampled_from(["chatml", "bos"]), max_concurrent=st.integers(1, 4), fuse=st.booleans())
def test_runner_instances_equal_each_run_alone(models, executor, progs, template, max_concurrent, fuse):
    """Several instances sharing forward passes (prefills fused into the reading pass or not) give each instance
    what it gets run alone, and leave nothing behind but the BOS prefix."""
    model = models(template)

    def make():
        if executor == "choreo":
            return choreo.Choreographer(model)
        return choreo.Baseline(model, prefix_reuse=executor == "reuse")

    ex = make()
    runner = choreo.Runner(ex, max_concurrent=max_concurrent, progress=False, fuse_prefills=fuse)
    got = runner.run([functools.partial(workflow, ops=ops) for ops in progs])
    prefix = [ex._prefix] if ex._prefix is not None else []  # a Choreographer's BOS stays for its lifetime
    assert ex.memory()["messages"] == 0 and held(ex) == prefix
    assert ex.memory()["tokens_used"] == sum(m.length for m in prefix)
    for k, ops in enumerate(progs):
        alone = run_program(make(), ops)
        assert set(alone.outcomes) == {"ok"}
        assert_same(got[k], alone.made, f"instance {k} of {len(progs)} vs alone", atol=1e-6)
