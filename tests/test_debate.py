"""Multi-agent debate on MATH: the moderator's parser, the stopping rule, config checks, the call structure of both
debates (what each call attends to), layouts and paired seeds across conditions."""

from __future__ import annotations

import json

import pytest

import choreo
from choreo.workflows import debate
from choreo.workflows.debate import (AFFIRMATIVE_PROMPT, MODERATOR_PREFIX, NEGATIVE_PROMPT, SUMMARY_PROMPT,
                                     UPDATE_PROMPT, DebateConfig, call_seed, final_answer, iterative_debate,
                                     names_winner, parallel_debate, parse_moderator, reread, run_condition,
                                     usable_answer)

PROBLEM = "What is $2 + 3 \\cdot 4$?"
TINY = DebateConfig.preset("tiny")  # rounds=2, agents=2, a few tokens per call
THREE = DebateConfig(rounds=2, agents=3, answer_tokens=3, moderator_tokens=4, summary_tokens=3)
EXECUTORS = {"baseline": choreo.Baseline, "choreographed": choreo.Choreographer}


def _run(model, workflow, kind, layout, *, config=TINY, seed=3):
    runner = choreo.Runner(EXECUTORS[kind](model), progress=False, trace=True)
    out = runner.run([lambda ex: workflow(ex, PROBLEM, layout=layout, seed=seed, config=config)])[0]
    return out, runner.traces[0]


def _decodes(trace):
    return [i for i, e in enumerate(trace) if e.kind == "decode"]


# ---------------------------------------------------------------------------------------------------------------
# The moderator's verdict and the stopping rule
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ('{"reasoning": "B is right", "preference": "negative", "answer": "14"}', ("negative", "14")),
    ('{"reasoning": "x", "preference": "Affirmative", "answer": "\\\\frac{1}{2}"}', ("affirmative", "\\frac{1}{2}")),
    ('{"reasoning": "x", "preference": "affirmative", "answer": "\\frac{1}{2}"}', ("affirmative", "\\frac{1}{2}")),
    ('{"reasoning": "x", "preference": "negative", "answer": "$\\boxed{14}$"}', ("negative", "14")),
    ('{"reasoning": "x", "preference": "none", "answer": 14}', ("none", "14")),
    ('Sure! {"reasoning": "a \\"quote\\"", "preference": null, "answer": null} Done.', ("none", None)),
    ('{"reasoning": "x", "preference": "negative", "answer": ""}', ("negative", None)),
    ("""{"reasoning": "x", 'preference': 'negative', 'answer': '7'}""", ("negative", "7")),
    ("""{'preference': 'aff', 'answer': 'it\\'s $\\frac{1}{2}$'}""", ("affirmative", "it's $\\frac{1}{2}$")),
    ('{"preference": "negative", "answer": "it\'s 5"}', ("negative", "it's 5")),
    ('{"reasoning": "x", "preference": "negative", "answer": "neither"}', ("negative", "neither")),  # MATH's answer
    ('{"reasoning": "x", "preference": "the affirmative side", "answer": "3"}', ("affirmative", "3")),
], ids=["well-formed", "escaped-latex", "raw-latex", "boxed-in-dollars", "bare-number", "nulls-in-prose",
        "empty-answer", "single-quoted", "single-quoted-escape", "apostrophe-in-double-quotes", "neither-answer",
        "the-side"])
def test_parse_moderator_well_formed(text, expected):
    assert parse_moderator(text) == dict(zip(("preference", "answer"), expected))


@pytest.mark.parametrize("text,expected", [
    (MODERATOR_PREFIX + 'both say 14", "preference": "negative", "answer": "14', ("negative", "14")),
    (MODERATOR_PREFIX + 'both say 14", "preference": "negative", "ans', ("negative", None)),
    (MODERATOR_PREFIX + 'both say 14", "prefer', (None, None)),
    (MODERATOR_PREFIX + 'the affirmative", "preference": "aff', ("affirmative", None)),
], ids=["unterminated-answer", "cut-in-key", "cut-before-preference", "cut-in-preference"])
def test_parse_moderator_truncated(text, expected):
    assert parse_moderator(text) == dict(zip(("preference", "answer"), expected))


@pytest.mark.parametrize("text", ["", "garbage Nietzsche pprint", MODERATOR_PREFIX,
                                  'preference: negative, answer: 14',  # keys must be quoted
                                  '{"preference": "both", "answer": "  "}'],
                         ids=["empty", "noise", "prefix-only", "unquoted-keys", "unknown-preference"])
def test_parse_moderator_garbage(text):
    assert parse_moderator(text) == {"preference": None, "answer": None}


@pytest.mark.parametrize("answer", [
    "affirmative", "Negative", "the affirmative side", "negative's answer", "none", "None", "N/A", "n/a", "null",
    "yes", "No", "true", "FALSE", "\\text{none}", "Affirmative.", "<the final answer of the side you prefer>",
    "this is the final answer of the side you prefer", "<answer>", "", "  ", None,
])
def test_no_answer_in_the_answer_field(answer):
    assert usable_answer(answer) is None
    text = json.dumps({"reasoning": "x", "preference": "affirmative", "answer": answer})
    verdict = parse_moderator(text)
    assert verdict == {"preference": "affirmative", "answer": None} and not names_winner(verdict)


@pytest.mark.parametrize("answer", ["14", "-2, 1", "\\frac{1}{2}", "x = 3", "nonexistent", "yesterday's 5", "0"])
def test_usable_answers_are_kept(answer):
    assert usable_answer(f" {answer} ") == answer
    assert names_winner({"preference": "negative", "answer": answer})


def test_a_side_without_an_answer_gives_that_sides_last_message():
    aff, neg = "aff \\boxed{9}", "neg \\boxed{7}"
    for text, expected in [
        ('{"reasoning": "x", "preference": "negative", "answer": "negative"}', (neg, "negative")),
        ('{"reasoning": "x", "preference": "negative", "answer": "none"}', (neg, "negative")),
        ('{"reasoning": "x", "preference": "affirmative", "answer": "N/A"}', (aff, "affirmative")),
        ('{"reasoning": "x", "preference": "affirmative", "answer": "<the final answer of the side you prefer>"}',
         (aff, "affirmative")),
        ('{"reasoning": "x", "preference": "none", "answer": "none"}', (aff, "affirmative")),
        ('{"reasoning": "x", "preference": "negative", "answer": "8"}', ("\\boxed{8}", "moderator")),
    ]:
        assert final_answer([parse_moderator(text)], aff, neg) == expected, text


def _logged(verdicts, rounds_run):
    """A logged iterative record whose moderator wrote ``verdicts`` (one JSON text per round)."""
    transcript = []
    for r, text in enumerate(verdicts[:rounds_run]):
        transcript += [{"speaker": "affirmative", "text": f"aff {r} \\boxed{{{r}}}"},
                       {"speaker": "negative", "text": f"neg {r} \\boxed{{{10 + r}}}"},
                       {"speaker": "moderator", "text": text}]
    return {"final": "stale", "final_source": "moderator", "rounds": rounds_run,
            "moderator": [{"text": t, "preference": "?", "answer": "?"} for t in verdicts[:rounds_run]],
            "transcript": transcript}


def test_reread_judges_logged_debates_again():
    side_name = '{"reasoning": "x", "preference": "negative", "answer": "negative"}'
    winner = '{"reasoning": "x", "preference": "affirmative", "answer": "5"}'
    nothing = '{"reasoning": "x"}'
    # stopped at round 1 of 3 on a verdict that is no longer a winner: graded as the side's message, incomplete
    out = reread(_logged([side_name], 1), rounds=3)
    assert (out["final"], out["final_source"], out["complete"]) == ("neg 0 \\boxed{10}", "negative", False)
    assert out["moderator"][0]["answer"] is None and out["moderator"][0]["preference"] == "negative"
    # the same verdict at the last round: complete
    out = reread(_logged([nothing, side_name], 2), rounds=2)
    assert (out["final"], out["final_source"], out["complete"]) == ("neg 1 \\boxed{11}", "negative", True)
    # stopped on a real winner, or ran every round without one: complete
    out = reread(_logged([nothing, winner], 2), rounds=3)
    assert (out["final"], out["final_source"], out["complete"]) == ("\\boxed{5}", "moderator", True)
    out = reread(_logged([nothing, nothing, nothing], 3), rounds=3)
    assert (out["final"], out["final_source"], out["complete"]) == ("aff 2 \\boxed{2}", "affirmative", True)
    # went on past a verdict that names a winner now: not what the current rule runs
    assert not reread(_logged([winner, nothing], 2), rounds=2)["complete"]


def test_stopping_rule_and_final_answer():
    assert names_winner({"preference": "negative", "answer": "14"})
    assert names_winner({"preference": "affirmative", "answer": "x"})
    assert not names_winner({"preference": "affirmative", "answer": "affirmative"})  # a side's name is no answer
    assert not names_winner({"preference": "none", "answer": "14"})  # no side named
    assert not names_winner({"preference": "negative", "answer": None})  # no answer
    assert not names_winner({"preference": "negative", "answer": "  "})
    assert not names_winner({"preference": None, "answer": "14"})
    win, tie = {"preference": "negative", "answer": " 14 "}, {"preference": "none", "answer": "9"}
    assert final_answer([tie, win], "aff \\boxed{9}") == ("\\boxed{14}", "moderator")
    assert final_answer([win, tie], "aff \\boxed{9}") == ("aff \\boxed{9}", "affirmative")  # only the last counts
    assert final_answer([], "aff") == ("aff", "affirmative")


# ---------------------------------------------------------------------------------------------------------------
# Configuration and arguments
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("rounds", 0, "DebateConfig.rounds must be an integer in 1..16, got 0"),
    ("rounds", 17, "DebateConfig.rounds must be an integer in 1..16, got 17"),
    ("agents", 1, "DebateConfig.agents must be an integer in 2..16, got 1"),
    ("agents", 2.0, "DebateConfig.agents must be an integer in 2..16, got 2.0"),
    ("answer_tokens", 0, "DebateConfig.answer_tokens must be an integer >= 1, got 0"),
    ("moderator_tokens", True, "DebateConfig.moderator_tokens must be an integer >= 1, got True"),
    ("summary_tokens", -3, "DebateConfig.summary_tokens must be an integer >= 1, got -3"),
    ("temperature", -0.5, "DebateConfig.temperature must be a finite number >= 0, got -0.5"),
    ("top_p", 0, r"DebateConfig.top_p must be a number in \(0, 1\], got 0"),
])
def test_config_errors_name_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        DebateConfig(**{field: value})


def test_bad_arguments(tiny_gqa):
    with pytest.raises(ValueError, match="unknown DebateConfig preset 'huge'"):
        DebateConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown debate workflow 'star'"):
        run_condition(None, [PROBLEM], workflow="star", condition="baseline")
    with pytest.raises(ValueError, match="unknown debate condition 'linearized'"):
        run_condition(None, [PROBLEM], workflow="parallel", condition="linearized")
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 problems"):
        run_condition(tiny_gqa, [PROBLEM, PROBLEM], workflow="parallel", condition="baseline", seeds=[0])
    runner = choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False)
    with pytest.raises(ValueError, match="unknown debate layout 'serial'"):
        runner.run([lambda ex: iterative_debate(ex, PROBLEM, layout="serial", seed=0)])
    with pytest.raises(ValueError, match="non-empty problem string, got ' '"):
        runner.run([lambda ex: parallel_debate(ex, " ", layout="parallel", seed=0)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), r"seed must be an integer in 0\.\.4294966, got -1"),
    (dict(seed=2.0), r"seed must be an integer in 0\.\.4294966, got 2.0"),
    (dict(seed=debate.MAX_SEED), r"seed must be an integer in 0\.\.4294966, got 4294967"),
    (dict(seeds=[0, 4_294_968]), r"seeds\[1\] must be an integer in 0\.\.4294967, got 4294968"),
], ids=["negative", "float", "last-instance-too-large", "seeds-too-large"])
def test_seeds_are_checked_before_anything_runs(tiny_gqa, kwargs, message):
    """The seed the caller passed is named (not the call seed 1000 * seed + step derived from it), before any
    instance runs."""
    assert debate.call_seed(debate.MAX_SEED, debate.MAX_STEP) <= 2**32 - 1 < debate.call_seed(
        debate.MAX_SEED + 1, 0)  # every step of the last seed allowed fits a Call, and no more
    with pytest.raises(ValueError, match=message):
        run_condition(tiny_gqa, [PROBLEM, PROBLEM], workflow="parallel", condition="baseline", config=TINY,
                      progress=False, **kwargs)
    runner = choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False)
    for workflow in (iterative_debate, parallel_debate):
        with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.4294967, got -1"):
            runner.run([lambda ex: workflow(ex, PROBLEM, layout="parallel", seed=-1, config=TINY)])


# ---------------------------------------------------------------------------------------------------------------
# Call structure: what each call attends to
# ---------------------------------------------------------------------------------------------------------------

def _own_prefix(trace, system_event):
    """[system prompt, the problem turn prefilled right after it]."""
    problem = next(i for i, e in enumerate(trace) if e.kind == "prefill" and e.parents == (system_event,))
    assert trace[problem].text == debate.PROBLEM_PROMPT.format(problem=PROBLEM)
    return [system_event, problem]


def test_iterative_structure(tiny_gqa):
    out, trace = _run(tiny_gqa, iterative_debate, "choreographed", "parallel")
    # The fp64 random model's moderator names no winner, so the debate runs every round (deterministic).
    assert out["rounds"] == TINY.rounds, out
    systems = [i for i, e in enumerate(trace) if e.role == "system"]
    assert [trace[i].text for i in systems] == [debate.AFFIRMATIVE_SYSTEM, debate.NEGATIVE_SYSTEM,
                                                debate.MODERATOR_SYSTEM]
    own = dict(zip(debate.SPEAKERS, (_own_prefix(trace, s) for s in systems)))
    calls = _decodes(trace)
    assert len(calls) == 3 * TINY.rounds  # affirmative, negative, moderator per round, one call at a time
    assert len({trace[i].group for i in calls}) == len(calls)
    said, instructions = [], {"affirmative": AFFIRMATIVE_PROMPT, "negative": NEGATIVE_PROMPT}
    for r in range(TINY.rounds):
        for k, speaker in enumerate(debate.SPEAKERS):
            i = calls[3 * r + k]
            event = trace[i]
            assert event.role == f"assistant:{speaker}" and event.seed == call_seed(3, 3 * r + k)
            expected = own[speaker] + said  # the whole debate so far (debaters' messages only)
            if expected[2:]:  # every call but the opening proposal ends with a private instruction turn
                instr = trace[event.parents[-1]]
                assert instr.kind == "prefill" and instr.role == "user" and list(instr.parents) == expected
                text = instructions.get(speaker) or debate.MODERATOR_PROMPT.format(round=r + 1, rounds=TINY.rounds)
                assert instr.text == text
                expected = expected + [event.parents[-1]]
            assert list(event.parents) == expected, (r, speaker)
            if speaker == "moderator":
                assert event.prefix == MODERATOR_PREFIX and event.max_tokens == TINY.moderator_tokens
            else:
                said.append(i)
    moderator_calls = set(calls[2::3])
    assert not any(moderator_calls & set(e.parents) for e in trace)  # verdicts are side calls
    assert [t["speaker"] for t in out["transcript"]] == list(debate.SPEAKERS) * TINY.rounds
    assert [t["text"] for t in out["transcript"]][:2] == [trace[calls[0]].text, trace[calls[1]].text]
    assert out["moderator"][0]["text"] == MODERATOR_PREFIX + trace[calls[2]].text
    assert out["final_source"] == "affirmative" and out["final"] == trace[calls[3]].text  # last affirmative
    json.dumps(out)


def test_parallel_structure(tiny_gqa):
    out, trace = _run(tiny_gqa, parallel_debate, "choreographed", "parallel", config=THREE)
    A, R = THREE.agents, THREE.rounds
    calls = _decodes(trace)
    groups = {}
    for i in calls:
        groups.setdefault(trace[i].group, []).append(i)
    rounds = list(groups.values())  # one parallel group per agent round, one group per summary
    assert [len(g) for g in rounds] == [A] + [1, A] * R
    sys_agents, sys_summary = [i for i, e in enumerate(trace) if e.role == "system"]
    own, summariser = _own_prefix(trace, sys_agents), _own_prefix(trace, sys_summary)
    history = [[i] for i in rounds[0]]
    for a, i in enumerate(rounds[0]):  # independent answers: system prompt and problem only
        assert list(trace[i].parents) == own and trace[i].role == f"assistant:agent{a}"
        assert trace[i].seed == call_seed(3, a)
    for r in range(1, R + 1):
        (summary,), updates = rounds[2 * r - 1], rounds[2 * r]
        previous = [h[-1] for h in history]
        instr = trace[summary].parents[-1]
        assert list(trace[summary].parents) == summariser + previous + [instr]
        assert trace[instr].text == SUMMARY_PROMPT.format(agents=A)
        assert list(trace[instr].parents) == summariser + previous
        assert trace[summary].seed == call_seed(3, r * (A + 1) + A)
        for a, i in enumerate(updates):  # own history, the summary, a private instruction
            view = own + history[a] + [summary]
            instr = trace[i].parents[-1]
            assert list(trace[i].parents) == view + [instr], (r, a)
            assert trace[instr].text == UPDATE_PROMPT and list(trace[instr].parents) == view
            assert trace[i].role == f"assistant:agent{a}" and trace[i].seed == call_seed(3, r * (A + 1) + a)
            history[a].append(i)
    assert out["history"] == [[trace[i].text for i in h] for h in history]
    assert out["answers"] == [trace[h[-1]].text for h in history]
    assert out["summaries"] == [trace[rounds[2 * r - 1][0]].text for r in range(1, R + 1)]
    seeds = [trace[i].seed for i in calls]
    assert len(set(seeds)) == len(seeds) and all(3 * debate.SEED_STRIDE <= s < 4 * debate.SEED_STRIDE for s in seeds)
    json.dumps(out)


def test_a_side_named_without_an_answer_does_not_stop_the_debate(tiny_gqa, monkeypatch):
    verdicts = iter(['{"preference": "negative", "answer": "negative"}',
                     '{"preference": "negative", "answer": "none"}'])
    real = debate.parse_moderator
    monkeypatch.setattr(debate, "parse_moderator", lambda text: real(next(verdicts)))
    config = DebateConfig(rounds=2, answer_tokens=3, moderator_tokens=3)
    out, trace = _run(tiny_gqa, iterative_debate, "choreographed", "parallel", config=config)
    assert out["rounds"] == 2 and len(_decodes(trace)) == 6  # both rounds ran
    negative = [t["text"] for t in out["transcript"] if t["speaker"] == "negative"]
    assert out["final"] == negative[-1] and out["final_source"] == "negative"


def test_early_stop_when_the_moderator_names_a_winner(tiny_gqa, monkeypatch):
    verdicts = iter([{"preference": "none", "answer": "9"}, {"preference": "negative", "answer": "14"}])
    monkeypatch.setattr(debate, "parse_moderator", lambda text: next(verdicts))
    config = DebateConfig(rounds=3, answer_tokens=3, moderator_tokens=3)
    out, trace = _run(tiny_gqa, iterative_debate, "choreographed", "parallel", config=config)
    assert out["rounds"] == 2 and len(_decodes(trace)) == 6  # stopped after round 2 of 3
    assert out["final"] == "\\boxed{14}" and out["final_source"] == "moderator"
    assert [m["preference"] for m in out["moderator"]] == ["none", "negative"]


# ---------------------------------------------------------------------------------------------------------------
# Layouts and conditions
# ---------------------------------------------------------------------------------------------------------------

def _length(fmt, event) -> int:
    """Tokens of the message an event made: a prefill's whole turn; a decode's header, prefix, content, footer."""
    if event.kind == "prefill":
        return len(fmt.encode(event.text, event.role))
    return len(fmt.header(event.role, event.prefix)) + len(event.tokens) + len(fmt.footer(event.role))


@pytest.mark.parametrize("workflow", [iterative_debate, parallel_debate], ids=["iterative", "parallel"])
def test_layouts_and_paired_seeds(tiny_gqa, workflow):
    runs = {(kind, layout): _run(tiny_gqa, workflow, kind, layout) for kind, layout in
            (("baseline", "linearized"), ("choreographed", "linearized"), ("choreographed", "parallel"))}
    fmt = choreo.Choreographer(tiny_gqa).format
    floor = len(fmt.prefix_ids)
    for (kind, layout), (_, trace) in runs.items():
        for event in trace:
            if layout == "parallel" or not event.parents:
                assert event.offsets is None, (kind, layout, event)
                continue
            # linearized: the parents back to back in list order (the serial prompt the baseline encodes)
            lengths = [_length(fmt, trace[p]) for p in event.parents]
            assert list(event.offsets) == [floor + sum(lengths[:j]) for j in range(len(lengths))], (kind, event)

    def plan(trace):  # everything a call is asked, not what it produced
        return [(e.kind, e.role, e.parents, e.prefix, e.max_tokens, e.temperature, e.seed) for e in trace]

    traces = [trace for _, trace in runs.values()]
    assert plan(traces[0]) == plan(traces[1]) == plan(traces[2])  # same prompts and seeds in every condition
    assert all(e.temperature == 0.7 for e in traces[0] if e.kind == "decode")
    # The opening calls attend only to the speaker's own serial prefix (system prompt, problem turn): the same
    # tokens at the same positions in every condition, hence the same output. Later calls attend to messages
    # encoded in another speaker's context, which the baseline re-encodes: there the conditions may part.
    opening = [i for i in _decodes(traces[0]) if len(traces[0][i].parents) == 2]
    assert len(opening) == (1 if workflow is iterative_debate else TINY.agents)
    for i in opening:
        assert traces[0][i].tokens == traces[1][i].tokens == traces[2][i].tokens
        assert traces[0][i].tokens  # something was sampled


@pytest.mark.parametrize("workflow", ["iterative", "parallel"])
def test_run_condition(tiny_gqa, workflow):
    problems = [PROBLEM, "Solve $x + 1 = 3$."]
    results, traces = run_condition(tiny_gqa, problems, workflow=workflow, condition="baseline", config=TINY,
                                    seeds=[5, 9], progress=False, trace=True)
    assert len(results) == len(traces) == 2
    assert [min(e.seed for e in t if e.kind == "decode") for t in traces] == [call_seed(5, 0), call_seed(9, 0)]
    choreographed = run_condition(tiny_gqa, problems[:1], workflow=workflow, condition="choreographed", config=TINY,
                                  seed=5, progress=False)
    key = "final" if workflow == "iterative" else "answers"
    assert set(results[0]) == set(choreographed[0]) and key in results[0]
    json.dumps(results + choreographed)
