"""The concurrent runner: same results as sequential execution, shared forward passes, freeing, traces."""

from __future__ import annotations

import pytest
import torch

import choreo
from choreo.trace import load_traces, replay, save_traces


async def chat(ex, seed):
    sys = await ex.prefill("You are a poet.", role="system")
    q = await ex.prefill(f"Write about the number {seed}.", role="user", parents=[sys])
    a, b = await ex.decode([choreo.Call(role="assistant", parents=[sys, q], max_tokens=6 + seed % 3, seed=s,
                                        temperature=1.0) for s in (seed, seed + 100)])
    q2 = await ex.prefill("Shorter, please.", role="user", parents=[sys, q, a])
    c = await ex.decode(role="assistant", parents=[sys, q, a, q2], max_tokens=5, seed=seed)
    return [a.tokens, b.tokens, c.tokens]


@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline])
def test_concurrent_results_equal_sequential_and_everything_is_freed(tiny_gqa, kind):
    ex = kind(tiny_gqa)
    runner = choreo.Runner(ex, max_concurrent=8, progress=False)
    finished = []
    got = runner.run([lambda s, i=i: chat(s, i) for i in range(12)], on_result=lambda i, r: finished.append(i))
    alone = kind(tiny_gqa)
    one_at_a_time = choreo.Runner(alone, max_concurrent=1, progress=False)
    assert one_at_a_time.run([lambda s, i=i: chat(s, i) for i in range(12)]) == got
    assert sorted(finished) == list(range(12))
    assert ex.memory()["tokens_used"] == 0 and ex.memory()["messages"] == 0
    # Eight instances share their passes (51 passes against 168 one at a time; batches of 32 calls choreographed,
    # 16 baseline, against 4 and 2), and hold more of the cache at once.
    batched, solo = runner.stats, one_at_a_time.stats
    assert 3 * batched.forward_passes <= solo.forward_passes and batched.max_batch > 8, (batched, solo)
    assert batched.forward_passes < sum(len(t) for r in got for t in r)
    assert 0 < batched.peak_cache_tokens <= ex.engine.store.peak and solo.peak_cache_tokens <= alone.engine.store.peak
    assert batched.peak_cache_tokens > solo.peak_cache_tokens, (batched, solo)


def test_traces_replay_exactly_under_teacher_forcing(tiny_gqa, tmp_path):
    bl = choreo.Baseline(tiny_gqa)
    runner = choreo.Runner(bl, progress=False, trace=True)
    results = runner.run([lambda s, i=i: chat(s, i) for i in range(3)])
    save_traces(tmp_path / "t.jsonl", [runner.traces[i] for i in range(3)], meta=[{"seed": i} for i in range(3)])
    loaded = load_traces(tmp_path / "t.jsonl")
    assert [m for m, _ in loaded] == [{"seed": i} for i in range(3)]
    for (_, events), result in zip(loaded, results):
        msgs = replay(choreo.Baseline(tiny_gqa), events, teacher=False)  # re-sampling with the same seeds
        assert [m.tokens for m in msgs if m.role == "assistant"] == result
        forced = replay(choreo.Choreographer(tiny_gqa), events)
        assert [m.tokens for m in forced if m.role == "assistant"] == result


def test_workflow_errors_propagate_and_free(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)

    async def bad(ex):
        sys = await ex.prefill("x", role="system")
        await ex.decode(role="assistant", parents=[sys], max_tokens=0)

    with pytest.raises(ValueError, match="max_tokens"):
        choreo.Runner(ch, progress=False).run([bad])
    assert ch.memory()["tokens_used"] == 0


def test_malformed_trace_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"meta": {}, "events": []}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_traces(path)


def test_deferred_prefills_fuse_into_the_reading_pass_and_change_nothing(tiny_gqa):
    """Prompts a workflow prefills are encoded in the pass of the first call that reads them (parents and
    children in one pass), with the same result as eager, one-pass-per-message encoding."""
    async def chain(ex):
        sys = await ex.prefill("You are a poet.", role="system")
        q1 = await ex.prefill("Rain?", role="user", parents=[sys])
        q2 = await ex.prefill("And snow?", role="user", parents=[sys, q1])
        out = await ex.decode(role="assistant", parents=[sys, q1, q2], teacher_tokens=[5, 6, 7], keep_logits=True)
        return out.logits

    ch = choreo.Choreographer(tiny_gqa)
    runner = choreo.Runner(ch, progress=False)
    fused = runner.run([chain])[0]
    assert runner.stats.forward_passes == 1  # three prefills and the call's prompt in one pass
    apart = choreo.Runner(ch, progress=False, fuse_prefills=False)
    separate = apart.run([chain])[0]
    assert apart.stats.forward_passes == 4  # one pass per prefill, then the call
    sys = ch.prefill("You are a poet.", role="system")
    q1 = ch.prefill("Rain?", role="user", parents=[sys])
    q2 = ch.prefill("And snow?", role="user", parents=[sys, q1])
    eager = ch.decode(role="assistant", parents=[sys, q1, q2], teacher_tokens=[5, 6, 7], keep_logits=True).logits
    import torch

    torch.testing.assert_close(fused, eager, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(separate, eager, atol=1e-9, rtol=1e-9)


def test_freeing_a_prefill_before_its_pass_keeps_its_rows_until_then(tiny_gqa):
    """A workflow may free a prompt the runner has not encoded yet (it is encoded in the pass of the first call
    that reads it): the call that reads it still sees it, and its rows are not handed to a later message first."""
    async def wf(ex, free_early):
        s = await ex.prefill("You are a very long-winded and thorough assistant. " * 3, role="system")
        u = await ex.prefill("Name a colour.", role="user", parents=[s])
        if free_early:
            ex.free(s)
        a = await ex.decode(role="assistant", parents=[u], max_tokens=6, teacher_tokens=[5, 6, 7], keep_logits=True)
        return a.logits

    ch = choreo.Choreographer(tiny_gqa)
    kept, freed = (choreo.Runner(ch, progress=False).run([lambda ex, f=f: wf(ex, f)])[0] for f in (False, True))
    import torch

    torch.testing.assert_close(freed, kept, atol=0, rtol=0)
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0


@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline])
def test_a_failing_workflow_leaves_no_message_of_any_instance(tiny_gqa, kind):
    """When one instance raises, the others are closed with everything they created, calls in flight included."""
    async def ok(ex):
        sys = await ex.prefill("Be brief.", role="system")
        return (await ex.decode(role="assistant", parents=[sys], max_tokens=8)).tokens

    async def bad(ex):
        sys = await ex.prefill("Be brief.", role="system")
        await ex.decode(role="assistant", parents=[sys], max_tokens=1)
        raise RuntimeError("workflow failed")

    ex = kind(tiny_gqa)
    with pytest.raises(RuntimeError, match="workflow failed"):
        choreo.Runner(ex, progress=False).run([ok, bad, ok])
    assert ex.memory()["tokens_used"] == 0 and ex.memory()["messages"] == 0
    assert choreo.Runner(ex, progress=False).run([ok]) and ex.memory()["tokens_used"] == 0


def test_a_traced_call_naming_a_parent_by_id_is_refused_before_it_runs(tiny_gqa):
    ch = choreo.Choreographer(tiny_gqa)

    async def by_id(ex):
        sys = await ex.prefill("Be brief.", role="system")
        await ex.decode(role="assistant", parents=[sys.id], max_tokens=4)

    with pytest.raises(ValueError, match="Message objects"):
        choreo.Runner(ch, progress=False, trace=True).run([by_id])
    assert ch.engine.forward_passes == 0  # refused before the call ran (the prompt, never read, never encoded)
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0


def test_an_empty_recorded_output_replays_as_an_empty_turn(tiny_gqa):
    """A decode whose first sampled token ended the turn has no tokens; teacher-forced replay forces that empty
    turn (header and end-of-turn, as the sampled one left in the cache) instead of sampling afresh, so every later
    event sees the recorded conversation."""
    from choreo.trace import TraceEvent

    ch = choreo.Choreographer(tiny_gqa)
    sys = ch.prefill("Be brief.", role="system")
    empty = ch.decode(role="assistant", parents=[sys], teacher_tokens=[])
    assert empty.tokens == [] and empty.text == "" and empty.ids == ch.format.header("assistant") + ch.format.footer(
        "assistant")
    after = ch.prefill("Again?", role="user", parents=[sys, empty])
    events = [TraceEvent(kind="prefill", group=0, role="system", parents=(), text="Be brief."),
              TraceEvent(kind="decode", group=1, role="assistant", parents=(0,), tokens=(), max_tokens=8,
                         temperature=1.0, seed=3),
              TraceEvent(kind="prefill", group=2, role="user", parents=(0, 1), text="Again?")]
    for executor in (choreo.Choreographer(tiny_gqa), choreo.Baseline(tiny_gqa)):
        msgs = replay(executor, events)
        assert msgs[1].tokens == [] and msgs[1].length == empty.length
        assert msgs[2].start == after.start


@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline])
def test_a_full_store_names_the_runners_concurrency_and_leaves_nothing_behind(tiny_gqa, kind):
    """Many instances at once can fill a store that one instance fits in: the error says how many were live and
    what to change, every instance is closed, and fewer at a time then succeed on the same executor."""
    ex = kind(tiny_gqa, capacity=160)
    with pytest.raises(choreo.cache.CapacityError, match=r"with \d+ workflow instances live \(max_concurrent=12\)"):
        choreo.Runner(ex, max_concurrent=12, progress=False).run([lambda s, i=i: chat(s, i) for i in range(12)])
    assert ex.memory()["tokens_used"] == 0 and ex.memory()["messages"] == 0
    one_at_a_time = choreo.Runner(ex, max_concurrent=1, progress=False)
    assert len(one_at_a_time.run([lambda s, i=i: chat(s, i) for i in range(3)])) == 3


@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline])
def test_a_full_store_counts_the_instance_whose_call_did_not_fit(tiny_gqa, kind):
    """One instance at a time, its parallel calls together too many for the store: one instance was live."""
    async def wide(ex):
        sys = await ex.prefill("Be brief.", role="system")
        return await ex.decode([choreo.Call(role="assistant", parents=[sys], max_tokens=40, seed=s) for s in (0, 1)])

    ex = kind(tiny_gqa, capacity=64)
    with pytest.raises(choreo.cache.CapacityError, match=r"with 1 workflow instances live \(max_concurrent=1\)"):
        choreo.Runner(ex, max_concurrent=1, progress=False).run([wide])
    assert ex.memory()["tokens_used"] == 0


@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline])
def test_another_instances_call_in_flight_is_no_parent_until_it_returns(tiny_gqa, kind):
    """An instance that finds another's running decode among the executor's messages (the choreographer lists a
    call once it starts; the baseline lists its text message when it returns) can neither read nor free it; every
    message the run hands out has finished decoding, and nothing is left behind."""
    seen = []

    async def slow(ex):
        sys = await ex.prefill("Be brief.", role="system")
        return await ex.decode(role="assistant", parents=[sys], max_tokens=8)

    async def peeker(ex):
        first = await ex.decode(role="assistant", max_tokens=1)  # the other instance's call has started
        running = [m for m in ex.executor.messages if m.decoding]
        for m in running:
            with pytest.raises(ValueError, match=f"message {m.id} is still being decoded"):
                await ex.prefill("Child.", role="user", parents=[m.id])
            with pytest.raises(ValueError, match=f"message {m.id} is still being decoded"):
                ex.free(m)
        seen.extend((m, m.length) for m in running)  # the length it had then: its header and a few tokens
        return first

    ex = kind(tiny_gqa)
    out = choreo.Runner(ex, progress=False).run([slow, peeker])
    assert not any(m.decoding for m in out)
    if kind is choreo.Choreographer:
        (msg, length), = seen
        assert msg is out[0] and msg.length > length
    else:
        assert seen == []
    assert ex.memory()["tokens_used"] == 0 and ex.memory()["messages"] == 0


@pytest.mark.parametrize("fuse", [True, False], ids=["fused-prefills", "prefill-steps"])
def test_a_call_in_flight_when_a_workflow_fails_is_undone(tiny_gqa, fuse):
    ch = choreo.Choreographer(tiny_gqa)

    async def slow(ex):
        sys = await ex.prefill("Be brief.", role="system")
        return await ex.decode(role="assistant", parents=[sys], max_tokens=8)

    async def bad(ex):
        await ex.decode(role="assistant", max_tokens=1)
        raise RuntimeError("workflow failed")

    with pytest.raises(RuntimeError, match="workflow failed"):
        choreo.Runner(ch, progress=False, fuse_prefills=fuse).run([slow, bad])
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0


SINGLE_CALLS = {
    "a call": (lambda ex: ex.decode(choreo.Call(max_tokens=2)), "list of calls, got Call"),
    "a dict": (lambda ex: ex.decode({"max_tokens": 2}), "list of calls, got dict"),
    "a string": (lambda ex: ex.decode("hello"), "list of calls, got str"),
    "a list and fields": (lambda ex: ex.decode([choreo.Call(max_tokens=2)], seed=3), "no keyword fields.*seed"),
}


@pytest.mark.parametrize("case", list(SINGLE_CALLS), ids=list(SINGLE_CALLS))
def test_session_decode_refuses_what_choreographer_decode_refuses(tiny_gqa, case):
    action, message = SINGLE_CALLS[case]
    ch = choreo.Choreographer(tiny_gqa)
    with pytest.raises(TypeError, match=message):
        action(ch)

    async def workflow(ex):
        await ex.prefill("Be brief.", role="system")
        return await action(ex)

    with pytest.raises(TypeError, match=message):
        choreo.Runner(ch, progress=False).run([workflow])
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0


def test_numpy_positions_are_traced_as_ints(tiny_gqa, tmp_path):
    """A call may place messages with numpy integers; its trace records Python ints (JSON writes no numpy)."""
    import numpy as np

    async def placed(ex):
        sys = await ex.prefill("Be brief.", role="system", new_offset=np.int64(1))
        q = await ex.prefill("Hi.", role="user", parents=[sys], offsets=[np.int64(2)])
        return await ex.decode(role="assistant", parents=[sys, q], offsets=[np.int32(0), None],
                               new_offset=np.uint8(40), max_tokens=2)

    runner = choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False, trace=True)
    (msg,) = runner.run([placed])
    save_traces(tmp_path / "t.jsonl", [runner.traces[0]])
    (_, events), = load_traces(tmp_path / "t.jsonl")
    assert [(e.offsets, e.new_offset) for e in events] == [(None, 1), ((2,), None), ((0, None), 40)]
    assert events == runner.traces[0] and msg.start == 40


def _sync_workflow(ex):  # an async def's body without the async: returns None
    ex.executor.memory()


def _generator_workflow(ex):
    yield ex


NOT_COROUTINES = {
    "an int": (lambda ex: 5, "returned 5"),
    "None (async forgotten)": (_sync_workflow, "returned None"),
    "the async def itself, uncalled": (lambda ex: chat, "returned <function chat"),
    "a generator": (_generator_workflow, "returned <generator object"),
}


async def short(ex, seed, max_tokens=2):
    q = await ex.prefill(f"Say {seed}.", role="user")
    return (await ex.decode(role="assistant", parents=[q], max_tokens=max_tokens, seed=seed)).tokens


# (what workflow 2 returns, max_concurrent, fuse_prefills): started with the others (8), while another has a call
# in flight (2), after the others finished (1).
RUNS = [(case, 2, True) for case in NOT_COROUTINES] + [("an int", 8, True), ("an int", 2, False), ("an int", 1, True)]


@pytest.mark.parametrize("case,max_concurrent,fuse", RUNS, ids=[
    f"{case}-max_concurrent={n}-{'fused' if fuse else 'prefill-steps'}" for case, n, fuse in RUNS])
def test_a_workflow_returning_no_coroutine_is_named_and_the_others_are_closed(tiny_gqa, case, max_concurrent,
                                                                              fuse):
    """Workflow 2 returns no coroutine: a TypeError names it and what it returned, and every instance started is
    closed with what it created (its call in flight undone), none left un-awaited."""
    import gc
    import warnings

    bad, returned = NOT_COROUTINES[case]
    ch = choreo.Choreographer(tiny_gqa)
    workflows = [lambda ex: short(ex, 0), lambda ex: short(ex, 1, max_tokens=8), bad, lambda ex: short(ex, 3)]
    runner = choreo.Runner(ch, progress=False, max_concurrent=max_concurrent, fuse_prefills=fuse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError, match=rf"workflow 2 {returned}.*not a coroutine: .*async def taking a Session"):
            runner.run(workflows)
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0
    assert runner.run([lambda ex: short(ex, 0)])[0] and ch.memory()["tokens_used"] == 0


@pytest.mark.parametrize("fuse", [True, False])
def test_a_message_freed_by_one_instance_while_another_reads_it_keeps_its_rows(tiny_gqa, fuse):
    def run(free_shared):
        ch = choreo.Choreographer(tiny_gqa)
        shared = ch.prefill("You are a very long-winded and thorough assistant. " * 3, role="system")

        async def reader(ex):
            return (await ex.decode(parents=[shared], max_tokens=8)).tokens

        async def freer(ex):
            await ex.decode(max_tokens=1)  # the reader's decode is in flight from here on
            if free_shared:
                ex.free(shared)
            await ex.prefill("Overwrite these rows with something else entirely, please. " * 3, role="user")
            await ex.decode(max_tokens=3)

        tokens = choreo.Runner(ch, progress=False, fuse_prefills=fuse).run([reader, freer])[0]
        return tokens, ch.memory()["tokens_used"]

    kept, freed = run(False), run(True)
    assert freed[0] == kept[0] and freed[1] == 0  # the same tokens, and every row back in the end


def test_an_instance_whose_cleanup_fails_does_not_strand_the_others(tiny_gqa):
    async def slow(ex):
        s = await ex.prefill("Be brief.", role="system")
        return (await ex.decode(parents=[s], max_tokens=8)).tokens

    async def raises_in_finally(ex):
        s = await ex.prefill("Be brief.", role="system")
        try:
            return (await ex.decode(parents=[s], max_tokens=8)).tokens
        finally:
            raise KeyError("cleanup bug")

    async def decodes_in_finally(ex):
        s = await ex.prefill("Be brief.", role="system")
        try:
            return (await ex.decode(parents=[s], max_tokens=8)).tokens
        finally:
            await ex.decode(parents=[s], max_tokens=2)

    async def prefills_in_finally(ex):
        s = await ex.prefill("Be brief.", role="system")
        try:
            return (await ex.decode(parents=[s], max_tokens=8)).tokens
        finally:
            await ex.prefill("Bye now.", role="user", parents=[s])

    async def bad(ex):
        await ex.decode(max_tokens=1)
        raise RuntimeError("workflow failed")

    for broken in (raises_in_finally, decodes_in_finally, prefills_in_finally):
        for order in ([slow, broken, bad], [broken, slow, bad]):
            for fuse in (True, False):
                ch = choreo.Choreographer(tiny_gqa)
                with pytest.raises(RuntimeError, match="workflow failed") as info:
                    choreo.Runner(ch, progress=False, fuse_prefills=fuse).run(order)
                if broken is not prefills_in_finally or not fuse:  # a fused prefill returns without awaiting a pass
                    assert "while closing the other workflow instances" in " ".join(info.value.__notes__)
                where = (broken.__name__, fuse, ch.messages)
                assert ch.messages == [] and ch.memory()["tokens_used"] == 0 and not ch._live and not ch._held, where
                assert choreo.Runner(ch, progress=False).run([slow])[0]  # and the executor still works


def test_generator_parents_and_offsets_are_read_once_under_tracing(tiny_gqa):
    async def wf(ex):
        s = await ex.prefill("Be brief.", role="system")
        q = await ex.prefill("Name a colour.", role="user", parents=(m for m in [s]))
        a = await ex.decode(parents=(m for m in [s, q]), offsets=(o for o in [None, 30]), max_tokens=3)
        return q.parents, a.parents, a.start

    for trace in (True, False):
        runner = choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False, trace=trace)
        (q_parents, a_parents, start), = runner.run([wf])
        assert q_parents == (0,) and a_parents == (0, 1) and start > 30, trace
        if trace:
            assert [e.parents for e in runner.traces[0]] == [(), (0,), (0, 1)]
            assert runner.traces[0][2].offsets == (None, 30)


def test_a_free_replay_keeps_the_turns_that_were_forced_when_recorded(tiny_gqa):
    """``replay(teacher=False)`` samples again what was sampled; a scripted (teacher-forced) turn stays as it was,
    so every later call starts where it did."""
    from choreo.trace import replay

    async def scripted(ex):
        sys = await ex.prefill("Be brief.", role="system")
        said = await ex.decode(role="user", parents=[sys], teacher_tokens=[5013, 30])
        return await ex.decode(role="assistant", parents=[sys, said], max_tokens=4)

    runner = choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False, trace=True)
    last, = runner.run([scripted])
    events = runner.traces[0]
    assert events[1].forced and events[1].max_tokens == 256  # the Call default, never used by a forced turn
    msgs = replay(choreo.Choreographer(tiny_gqa), events, teacher=False)
    assert msgs[1].tokens == [5013, 30] and msgs[2].start == last.start and msgs[2].tokens == last.tokens


def test_an_executor_call_inside_a_workflow_never_reads_a_prompt_not_yet_encoded(tiny_gqa):
    """With fused prefills a Session's prefill is encoded in the runner's next step: a call made on the executor
    directly inside the workflow would read its rows before they are written. It is refused, naming the message;
    without fusing, or through the Session, the call reads the encoded prompt."""
    async def direct(ex):
        p = await ex.prefill("You are a poet who writes about rain.", role="system")
        out = ex.executor.decode(role="assistant", parents=[p], teacher_tokens=[5, 6, 7], keep_logits=True)
        ex.free(out)
        return out.logits

    ch = choreo.Choreographer(tiny_gqa)
    with pytest.raises(ValueError, match=r"message \d+ is not encoded yet: a prefill waiting for the runner's next "
                                         r"step .* call the Session's verbs"):
        choreo.Runner(ch, progress=False).run([direct])
    assert ch.memory()["tokens_used"] == 0 and ch.memory()["messages"] == 0
    unfused = choreo.Runner(ch, progress=False, fuse_prefills=False).run([direct])[0]
    p = ch.prefill("You are a poet who writes about rain.", role="system")
    eager = ch.decode(role="assistant", parents=[p], teacher_tokens=[5, 6, 7], keep_logits=True).logits
    assert torch.equal(unfused, eager)


def test_an_instances_error_names_it_and_the_counters_keep_the_work_done(tiny_gqa):
    async def fails_late(ex, i):
        out = await chat(ex, i)
        if i == 3:
            raise ValueError("parse failed")
        return out

    runner = choreo.Runner(choreo.Choreographer(tiny_gqa), max_concurrent=2, progress=False)
    finished = []
    with pytest.raises(ValueError, match="parse failed") as caught:
        runner.run([lambda s, i=i: fails_late(s, i) for i in range(5)], on_result=lambda i, r: finished.append(i))
    assert "raised by workflow instance 3 (of 5 in this run)" in caught.value.__notes__
    assert 0 < len(finished) < 5 and 3 not in finished
    assert runner.stats.instances == len(finished) and runner.stats.forward_passes > 0 and runner.stats.wall_s > 0


def test_traces_are_the_last_runs(tiny_gqa):
    runner = choreo.Runner(choreo.Baseline(tiny_gqa), progress=False, trace=True)
    runner.run([lambda s, i=i: chat(s, i) for i in range(3)])
    runner.run([lambda s: chat(s, 7)])
    assert sorted(runner.traces) == [0]


def test_awaiting_asyncio_inside_a_workflow_says_what_to_await(tiny_gqa):
    import asyncio

    async def gathered(ex):
        sys = await ex.prefill("Be brief.", role="system")
        return await asyncio.gather(ex.decode(role="assistant", parents=[sys], max_tokens=2),
                                    ex.decode(role="assistant", parents=[sys], max_tokens=2))

    async def sleeps(ex):
        await asyncio.sleep(0.01)

    ch = choreo.Choreographer(tiny_gqa)
    with pytest.raises(TypeError, match=r"only Session verbs can be awaited .* give ex.decode a list"):
        choreo.Runner(ch, progress=False).run([gathered])
    with pytest.raises(RuntimeError) as caught:
        choreo.Runner(ch, progress=False).run([sleeps])
    assert any("without asyncio" in note for note in caught.value.__notes__)
    assert ch.memory()["tokens_used"] == 0


# ------------------------------------------------------------------ first chunks of very different lengths
def _chunk(row: int, n: int, reads=()):
    """What ``first_chunk_passes`` reads of a job: its first chunk's rows and the segments it attends to."""
    from types import SimpleNamespace

    return SimpleNamespace(pending=[0] * n, fed=0, msg=SimpleNamespace(row=row),
                           segments=tuple((r, k, 0) for r, k in reads))


def test_first_chunks_of_very_different_lengths_take_separate_passes():
    from choreo.engine import first_chunk_passes

    headers = [_chunk(1000 + 10 * i, 5) for i in range(8)]
    prompt = _chunk(0, 300)
    passes = first_chunk_passes([headers[0], prompt, *headers[1:]], 64)
    assert passes == [[prompt], headers]  # longest first; each pass keeps the jobs' order
    assert first_chunk_passes([headers[0], prompt, *headers[1:]], 8 * 295) == [[headers[0], prompt, *headers[1:]]]
    alike = [_chunk(100 * i, n) for i, n in enumerate((3, 7, 5, 6, 4))]
    assert first_chunk_passes(alike, 64) == [alike]  # 10 rows of padding: cheaper than a pass
    assert first_chunk_passes(alike, 0) == [[alike[1]], [alike[3]], [alike[2]], [alike[4]], [alike[0]]]
    assert first_chunk_passes([], 64) == []
    # a header reading the prompt's rows runs in the short pass after it; a short prefill the prompt reads (and
    # the one that prefill reads) joins the prompt's pass: a pass's keys are written before any call of it attends
    reader = _chunk(2000, 5, reads=[(0, 300)])
    system = _chunk(3000, 4)
    question = _chunk(3100, 6, reads=[(3000, 4)])
    reading = _chunk(0, 300, reads=[(3100, 6)])
    assert first_chunk_passes([*headers, reader, prompt], 64) == [[prompt], [*headers, reader]]
    assert first_chunk_passes([*headers, system, question, reading], 64) == [[system, question, reading], headers]


def test_split_passes_respect_every_read_whatever_the_lengths():
    """Random chunk lengths and reads (a job reads only earlier ones, as prefills of one step do): every job is in
    exactly one pass, never before a job whose rows it reads, and with no reads no pass pads more than pass_rows
    rows beyond its tokens."""
    import random

    from choreo.engine import first_chunk_passes

    rng = random.Random(0)
    for _ in range(300):
        B, pass_rows = rng.randint(1, 12), rng.choice([0, 16, 64, 512])
        lengths = [rng.choice([1, 2, 5, 9, 40, 130, 700]) for _ in range(B)]
        rows = [sum(lengths[:i]) for i in range(B)]
        reads = [[k for k in range(i) if rng.random() < 0.15] for i in range(B)]
        jobs = [_chunk(rows[i], lengths[i], [(rows[k], lengths[k]) for k in reads[i]]) for i in range(B)]
        passes = first_chunk_passes(jobs, pass_rows)
        where = {id(j): p for p, group in enumerate(passes) for j in group}
        assert sorted(map(id, (j for g in passes for j in g))) == sorted(map(id, jobs))
        assert all(where[id(jobs[k])] <= where[id(jobs[i])] for i in range(B) for k in reads[i])
        assert all(sorted(group, key=jobs.index) == group for group in passes)
        if not any(reads):
            for group in passes:
                tokens, padded = sum(len(j.pending) for j in group), len(group) * max(len(j.pending) for j in group)
                assert padded - tokens <= pass_rows, [len(j.pending) for j in group]


def test_a_long_prompt_beside_short_headers_gives_the_one_pass_results(tiny_gqa):
    """Eight workflows start their calls while a ninth prefills a long document: the document goes in a pass of
    its own, then the nine calls' headers (one of them reading the document) in a second; every result equals
    the one-pass run's (``pass_rows`` too large to split), where every call attends in the pass that writes the
    document."""
    async def call(ex, k):
        sys = await ex.prefill("Be brief.", role="system")
        return (await ex.decode(role="assistant", parents=[sys], teacher_tokens=[5 + k, 6], keep_logits=True)).logits

    async def long_read(ex):
        doc = await ex.prefill(" ".join(["word"] * 200), role="user")
        return (await ex.decode(role="assistant", parents=[doc], teacher_tokens=[9, 10], keep_logits=True)).logits

    workflows = [lambda ex, k=k: call(ex, k) for k in range(8)] + [long_read]
    split = choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False)
    together = split.run(workflows)
    assert split.stats.forward_passes == 2  # the long prompt, then the nine headers (not one pass of 9 x 200 rows)
    one_pass = choreo.Choreographer(tiny_gqa)
    one_pass.engine.pass_rows = 1 << 20
    whole = choreo.Runner(one_pass, progress=False)
    expected = whole.run(workflows)
    assert whole.stats.forward_passes == 1
    for got, want in zip(together, expected):
        torch.testing.assert_close(got, want)


def test_pass_rows_defaults_to_the_devices_and_is_checked(tiny_gqa):
    from choreo.engine import PASS_ROWS, Engine

    assert Engine(tiny_gqa).pass_rows == PASS_ROWS["cpu"] and Engine(tiny_gqa, pass_rows=0).pass_rows == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"pass_rows must be an integer >= 0, got {bad!r}"):
            Engine(tiny_gqa, pass_rows=bad)


def test_the_peak_cache_use_counts_rows_reserved_between_steps(tiny_gqa, tokenizer):
    """With fused prefills, one instance reserves its next calls' rows while another, later in the same round,
    frees its own: both are held at once though no step sees it. The peak is the store's, and a store of that
    size runs the same workload."""
    from choreo import perf

    synth = perf.Synth(tokenizer, perf.Lengths(prompt_words=8, content_tokens=2))
    flows = [perf.make_shape("conversation", turns=t).workflow(synth) for t in (1, 4, 1, 4, 2, 3)]
    ex = perf.StepwiseChoreographer(tiny_gqa)
    runner = choreo.Runner(ex, max_concurrent=3, progress=False)
    runner.run(flows)
    assert runner.stats.peak_cache_tokens == ex.engine.store.peak > 0
    sized = perf.StepwiseChoreographer(tiny_gqa, capacity=runner.stats.peak_cache_tokens)
    choreo.Runner(sized, max_concurrent=3, progress=False).run(flows)  # no CapacityError
