"""MATH problems, answer extraction and grading; Tree of Thoughts and the direct call on a tiny model."""

from __future__ import annotations

import json
import threading

import pytest

import choreo
from choreo.data.math import (BUILTIN_SIZE, FILE_NAME, equivalent, extract_answer, gold_answer, grade, last_boxed,
                              load_problems, split_problems)
from choreo.workflows.tot import (DirectConfig, ToTConfig, direct_trace, majority, parse_vote, run_condition,
                                  tree_of_thoughts)


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{\\dfrac{9}{7}}", "\\dfrac{9}{7}"),  # the last one
    ("\\boxed {(3, -1)}", "(3, -1)"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\frac{1}{2}", None),  # never closed
    ("no box here", None),
    ("\\boxed{3}. Double-check: \\boxed{3", "3"),  # the last one cut off at the token cap: the last closed one
    ("\\boxed{a} \\boxed{b{c}} \\boxed{d", "b{c}"),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def test_first_box_for_the_parallel_debate():
    text = "\\boxed{1} then, on reflection, \\boxed{2} and \\boxed{3"
    assert extract_answer(text, which="first") == "1" and extract_answer(text) == "2"
    assert grade("1", text, which="first")["correct"] and not grade("1", text)["correct"]
    assert extract_answer("ANSWER: 5", which="first") == "5"  # no box: the ANSWER line either way
    with pytest.raises(ValueError, match="which must be 'last' or 'first', got 'middle'"):
        extract_answer(text, which="middle")


@pytest.mark.parametrize("text, answer", [
    ("... so the answer is \\boxed{9/7}", "9/7"),
    ("work\nANSWER: $12$.", "12"),
    ("answer: 3\nmore text\nANSWER: 5", "5"),  # the last ANSWER line
    ("ANSWER: \\boxed{4} and ANSWER: 6", "4"),  # a box inside the last ANSWER line wins
    ("ANSWER:   ", None),
    ("\\boxed{}", None),
    ("the answer is 10", None),  # a bare number is not an answer
    ("So the final answer is 11.", "11"),  # Minerva's answer sentence
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("ANSWER: 3\nThe final answer is 4", "3"),  # an ANSWER line wins over the sentence
    ("ANSWER: 4\n\nTo check the answer: substitute 4 back.", "4"),  # a lower-case "answer:" mid-sentence is not one
    ("To check the answer: substitute 4 back.", None),
    ("ANSWER: **4**", "4"),  # markdown bold
    ("**ANSWER:** $7$.", "7"),
    ("- **Answer**: 9", "9"),
    ("> ANSWER: x = 2", "x = 2"),
    ('Hence, the answer is "ANSWER: 10".', "10"),  # upper-case ANSWER: anywhere
    ("Now, you have your final answer: 3", "3"),
    ('End with a line of the form "ANSWER: <final answer>".', None),  # the instruction's placeholder echoed
    ('Write "ANSWER: <final answer>".\n\nThe final answer is 26.', "26"),
    ("Step 3: 5+7=12.\nThe final answer is:", None),  # a sentence with nothing after its colon
    ("The final answer is: 12", "12"),
    ("The final answer is:\n$12$", "12"),
    ("The final answer is: .", None),  # punctuation alone
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5"),  # Minerva's whole line: the inner one
    ("Final answer: the final answer was 6.", "6"),
    ("Your final answer is:\nYour answer is:", None),  # the next line introduces an answer it never gives
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


# Adversarial responses from the review (/tmp/audit_math/adv.out): the later of the last box and the last ANSWER
# line, empty boxes skipped, "\\boxed 5" without braces read as the MATH reference extractor reads it
@pytest.mark.parametrize("text, last, first", [
    ("The first is \\boxed{3}. Then ... ANSWER: 10", "10", "3"),  # the ANSWER line comes later
    ("ANSWER: 10, so \\boxed{3}", "3", "3"),  # the box comes later
    ("$\\boxed{5}$ and ANSWER: 7", "7", "5"),
    ("ANSWER: \\boxed{5}", "5", "5"),
    ("\\boxed{}. ANSWER: 2", "2", "2"),  # an empty box is no answer
    ("I put my final answer in \\boxed{}. Then x = \\boxed{5}", "5", "5"),
    ("\\boxed{4} then \\boxed{ }", "4", "4"),
    ("\\boxed 5", "5", "5"),
    ("so $\\boxed 1/2$.", "1/2", "1/2"),
    ("\\boxed 7.\nThat is all.", "7", "7"),
    ("\\boxed{1} \\boxed 2", "2", "1"),
    ("\\boxed{}", None, None),
], ids=["answer-after-box", "box-after-answer", "dollar-box-then-answer", "box-in-answer-line", "empty-box-then-answer",
        "empty-box-first", "blank-box-last", "unbraced", "unbraced-in-dollars", "unbraced-then-period",
        "braced-then-unbraced", "only-empty"])
def test_extract_answer_adversarial(text, last, first):
    assert extract_answer(text) == last and extract_answer(text, which="first") == first


def test_grading_works_off_the_main_thread():
    """math_verify times itself with signal.alarm, which raises off the main thread: grading must not read that
    as "not equal" (the runner's callbacks and thread pools grade off the main thread)."""
    out = {}

    def work():
        out["equal"] = equivalent("\\frac{1}{2}", "0.5")
        out["graded"] = grade("\\frac{1}{2}", "so \\boxed{0.5}")
        out["different"] = equivalent("\\frac{1}{2}", "0.4")

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert out == {"equal": True, "graded": {"correct": True, "extracted": "0.5"}, "different": False}
    assert equivalent("\\frac{1}{2}", "0.5")  # and still on the main thread


@pytest.mark.parametrize("solution, problem, gold", [
    ("answers are $\\boxed{-2}$ and $\\boxed{1}$.", "Find all solutions, separated by comma(s).", "-2, 1"),
    ("$\\boxed{3}$ or $\\boxed{\\frac{2}{5}}$", "Enter all the solutions, separated by commas.", "3, \\frac{2}{5}"),
    ("$\\boxed{1}$, again $\\boxed{1}$", "Enter all solutions, separated by commas.", "1"),  # distinct ones
    ("$d=\\boxed{-3}$. Note: $\\boxed{3}$ is also accepted.", "What is the common difference?", "3"),
    ("$\\boxed{\\frac{2+\\sqrt{53}}{53}}$ so $\\boxed{161}$", "Find $a+b+c+d$.", "161"),
    ("box $\\boxed{4}$ then $\\boxed{}$", "What number?", "4"),  # an empty box skipped
])
def test_gold_answer_joins_the_boxes_of_several_answers(solution, problem, gold):
    assert gold_answer(solution, problem) == gold
    assert grade(gold_answer(solution, problem), f"\\boxed{{{gold}}}")["correct"]


@pytest.mark.parametrize("response, correct, extracted", [
    ("The solutions are $\\boxed{-2}$ and $\\boxed{1}$.", True, "-2, 1"),
    ("$\\boxed{1}$ and $\\boxed{-2}$", True, "1, -2"),  # math_verify compares the answers as a set
    ("$\\boxed{-2, 1}$", True, "-2, 1"),
    ("try $\\boxed{-2}$, so ANSWER: -2, 1", True, "-2, 1"),  # a later ANSWER line is the answer as it stands
    ("only $\\boxed{1}$", False, "1"),
])
def test_a_response_that_boxes_several_answers_apart_is_read_as_the_gold_is(response, correct, extracted):
    problem = "Find all real x. Enter all the solutions, separated by commas."
    assert grade("-2, 1", response, problem=problem) == {"correct": correct, "extracted": extracted}
    assert grade("1", "$\\boxed{-2}$ then $\\boxed{1}$", problem="What is x?")["extracted"] == "1"  # one answer


def test_gold_answer_rules():
    solution, problem = "$\\boxed{-2}$ and $\\boxed{1}$", "separated by commas"
    assert gold_answer(solution, problem, rule="last") == "1"
    assert not grade(gold_answer(solution, problem), "\\boxed{1}")["correct"]  # one root of two is wrong
    assert gold_answer("no box", problem) is None
    with pytest.raises(ValueError, match="rule must be 'joined' or 'last', got 'first'"):
        gold_answer(solution, problem, rule="first")


@pytest.mark.parametrize("gold, answer, same", [
    ("\\frac{9}{7}", "9/7", True),
    ("\\dfrac{1}{2}", "0.5", True),
    ("(3,-1)", "(3, -1)", True),
    ("x^2+1", "1+x^2", True),
    ("2", "3", False),
    ("\\frac{1}{3}", "0.33", False),
    ("10", "\\text{ten", False),  # unparsable LaTeX is not shown equal, and does not raise
    ("12", "1 2", False),  # spacing between digits separates them
    ("123", "1 23", False),
    ("x+1", "x + 1", True),
    ("1000", "1\\,000", True),
])
def test_equivalent(gold, answer, same):
    assert equivalent(gold, answer) is same


def test_grade_needs_an_extracted_answer():
    assert grade("10", "the answer is 10") == {"correct": False, "extracted": None}
    assert grade("10", "ANSWER: 10") == {"correct": True, "extracted": "10"}


def test_builtin_problems_are_deterministic_and_graded_by_their_answers():
    a, b = load_problems(None), load_problems(None)
    assert len(a) == BUILTIN_SIZE and a == b and len({p.id for p in a}) == BUILTIN_SIZE
    for p in a[:30]:
        assert grade(p.answer, f"ANSWER: {p.answer}")["correct"], p
    assert {p.type for p in a} == {"arithmetic", "equation", "fractions"}


def test_split_is_disjoint_seeded_and_independent_of_order():
    problems = load_problems(None)
    evaluation, train = split_problems(problems, n_eval=20, n_train=30, seed=3)
    assert not {p.id for p in evaluation} & {p.id for p in train} and len(evaluation) == 20 and len(train) == 30
    again, _ = split_problems(list(reversed(problems)), n_eval=20, seed=3)
    assert again == evaluation  # file order does not matter; nor does n_train
    assert split_problems(problems, n_eval=20, seed=4)[0] != evaluation
    with pytest.raises(ValueError, match="only 1000 exist"):
        split_problems(problems, n_eval=900, n_train=200)
    with pytest.raises(ValueError, match="n_eval must be an integer >= 1, got 0"):
        split_problems(problems, n_eval=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_eval=2.5), "n_eval must be an integer >= 1, got 2.5"),
    (dict(n_eval="2"), "n_eval must be an integer >= 1, got '2'"),
    (dict(n_eval=2, n_train=-1), "n_train must be an integer >= 0, got -1"),
    (dict(n_eval=2, n_train=1.0), "n_train must be an integer >= 0, got 1.0"),
], ids=["float", "string", "negative-train", "float-train"])
def test_split_sizes_are_checked_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_problems(load_problems(None), **kwargs)


def test_math_file_loading_and_errors(tmp_path):
    rows = [{"id": "algebra/2", "problem": "1+1?", "level": "Level 1", "type": "Algebra",
             "solution": "It is $\\boxed{2}$."},
            {"id": "algebra/1", "problem": "Half?", "solution": "$\\boxed{\\frac{1}{2}}$"},
            {"id": "algebra/3", "problem": "Roots, separated by commas?", "solution": "$\\boxed{-2}$, $\\boxed{1}$"}]
    (tmp_path / FILE_NAME).write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_problems(tmp_path)
    assert [(p.id, p.answer, p.level) for p in problems] == [
        ("algebra/2", "2", "Level 1"), ("algebra/1", "\\frac{1}{2}", ""), ("algebra/3", "-2, 1", "")]
    assert [p.answer for p in load_problems(tmp_path, gold="last")] == ["2", "\\frac{1}{2}", "1"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems(tmp_path / "missing")
    for bad, message in [({"id": "a/1", "problem": "p", "solution": "no box"}, "has no \\\\boxed"),
                         ({"id": "a/1", "problem": "", "solution": "\\boxed{1}"}, "non-empty string fields"),
                         (rows[0], "duplicate problem id")]:
        (tmp_path / FILE_NAME).write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            load_problems(tmp_path)


def test_votes_and_majority():
    assert parse_vote(" Solution #3, because", 8) == 3
    assert parse_vote(" #2", 8) == 2 and parse_vote(" 1. The first", 8) == 1
    assert parse_vote(" 10 x 1", 8) is None and parse_vote(" 5.5x", 8) is None and parse_vote(" none", 8) is None
    assert parse_vote(" 0", 8) is None
    assert parse_vote(" 03", 8) == 3 and parse_vote(" 0" + "1" * 5000, 8) is None  # no int() of 5,000 digits
    assert parse_vote(" " + "1" * 5000, 12) is None and parse_vote(" 12", 12) == 12
    assert majority([2, 3, 3, 2]) == 2  # a tie goes to the index seen first
    assert majority([None, 4, 1, 1]) == 1 and majority([None, None]) is None


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="ToTConfig.voters must be an integer >= 1, got 0"):
        ToTConfig(voters=0)
    with pytest.raises(ValueError, match="ToTConfig.temperature must be a finite number >= 0"):
        ToTConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="DirectConfig.answer_tokens"):
        DirectConfig(answer_tokens=True)
    with pytest.raises(ValueError, match="ToTConfig.system must be a non-empty system prompt, got None"):
        ToTConfig(system=None)
    with pytest.raises(ValueError, match="DirectConfig.system must be a non-empty system prompt, got ' '"):
        DirectConfig(system=" ")


TINY = ToTConfig(proposals=3, voters=2, propose_tokens=5, vote_tokens=3, answer_tokens=4)
PROBLEM = "Compute $2 + 3$."


def _traced(executor, layout):
    runner = choreo.Runner(executor, progress=False, trace=True)
    (out,) = runner.run([lambda ex: tree_of_thoughts(ex, PROBLEM, layout=layout, seed=5, config=TINY)])
    return out, [e for e in runner.traces[0] if e.kind == "decode"]


def test_layouts_structure_and_paired_seeds(tiny_gqa):
    base, base_calls = _traced(choreo.Baseline(tiny_gqa), "linearized")
    lin, _ = _traced(choreo.Choreographer(tiny_gqa), "linearized")
    par, par_calls = _traced(choreo.Choreographer(tiny_gqa), "parallel")
    # The arms part at the votes, not before: the same prompts and seeds give the same proposals. (Linearized
    # votes need not equal the baseline's: the baseline re-encodes the proposals attending to each other.)
    assert base["proposals"] == lin["proposals"] == par["proposals"]
    assert [p.split(":")[0] for p in par["proposals"]] == ["Solution #1", "Solution #2", "Solution #3"]
    assert len(par_calls) == 3 + 2 + 1 and len(par["votes"]) == 2 and 1 <= par["winner"] <= 3
    assert [c.seed for c in par_calls] == [c.seed for c in base_calls] == list(range(6 * 5, 6 * 5 + 6))
    voters, final = par_calls[3:5], par_calls[5]
    assert all(c.offsets is None for c in par_calls)
    assert all(c.offsets is not None for c in base_calls[3:])
    moved = list(base_calls[3].offsets)
    assert moved[-1] is None and moved[:-1] == sorted(set(moved[:-1])) and moved[0] == 0  # back to back, in order
    assert all(len(c.parents) == 2 + 3 + 1 for c in voters)  # system, vote request, every proposal, instruction
    assert len(final.parents) == 4 and final.parents[2] == par["winner"] + 1  # the winner's event (after sys, ask)


def test_run_condition_direct_and_errors(tiny_gqa):
    out = run_condition(tiny_gqa, [PROBLEM, PROBLEM], condition="direct", config=DirectConfig(answer_tokens=3),
                        progress=False)
    assert out[0] == out[1] and set(out[0]) == {"final"}  # greedy: the same problem gives the same text
    with pytest.raises(ValueError, match="unknown Tree-of-Thoughts condition 'linearized'"):
        run_condition(tiny_gqa, [PROBLEM], condition="linearized", progress=False)
    with pytest.raises(ValueError, match="seeds has 1 entries for 2 problems"):
        run_condition(tiny_gqa, [PROBLEM, PROBLEM], condition="baseline", config=TINY, seeds=[0], progress=False)
    with pytest.raises(ValueError, match="unknown Tree-of-Thoughts layout"):
        choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False).run(
            [lambda ex: tree_of_thoughts(ex, PROBLEM, layout="serial", seed=0, config=TINY)])


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), r"seed must be an integer in 0\.\.\d+, got -1"),
    (dict(seed=2.0), r"seed must be an integer in 0\.\.\d+, got 2.0"),
    (dict(seed=TINY.max_seed), rf"seed must be an integer in 0\.\.{TINY.max_seed - 1}, got {TINY.max_seed}"),
    (dict(seeds=[0, -4]), r"seeds\[1\] must be an integer in 0\.\.\d+, got -4"),
    (dict(seeds=[0, TINY.max_seed + 1]), rf"seeds\[1\] must be an integer in 0\.\.{TINY.max_seed}, got"),
], ids=["negative", "float", "last-instance-too-large", "seeds-negative", "seeds-too-large"])
def test_seeds_are_checked_before_anything_runs(tiny_gqa, kwargs, message):
    """The seed the caller passed is named, before any instance starts: not a call seed derived from it."""
    with pytest.raises(ValueError, match=message):
        run_condition(tiny_gqa, [PROBLEM, PROBLEM], condition="baseline", config=TINY, progress=False, **kwargs)
    assert TINY.max_seed == (2**32 - 1 - 5) // 6  # every call seed of the last instance fits: stride B + V + 1
    with pytest.raises(ValueError, match="seed must be an integer in 0..4294967295, got -1"):
        run_condition(tiny_gqa, [PROBLEM], condition="direct", seed=-1, progress=False)
    with pytest.raises(ValueError, match=rf"seed must be an integer in 0\.\.{TINY.max_seed}, got -1"):
        choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False).run(
            [lambda ex: tree_of_thoughts(ex, PROBLEM, layout="parallel", seed=-1, config=TINY)])


def test_direct_trace_carries_the_workflows_answer_over(tiny_gqa):
    """The direct call's own answer gives its own trace back; a Tree-of-Thoughts answer keeps the finisher's tokens
    and cap; an answer no call wrote (a moderator's, boxed) is a turn that ended by itself; each replays."""
    from choreo.finetune import replay_loss, sampled_end_of_turn

    config = DirectConfig(answer_tokens=4)
    out, traces = run_condition(tiny_gqa, [PROBLEM], condition="direct", config=config, progress=False, trace=True)
    own = traces[0]
    assert direct_trace(PROBLEM, out[0]["final"], events=own, tokenizer=tiny_gqa.tokenizer, config=config) == own

    tot_out, tot_traces = run_condition(tiny_gqa, [PROBLEM], condition="choreographed", config=TINY, progress=False,
                                        trace=True)
    finisher = tot_traces[0][-1]
    assert finisher.kind == "decode" and finisher.text == tot_out[0]["final"]
    from_tot = direct_trace(PROBLEM, tot_out[0]["final"], events=tot_traces[0], tokenizer=tiny_gqa.tokenizer)
    assert [e.kind for e in from_tot] == ["prefill", "prefill", "decode"] and from_tot[:2] == own[:2]
    answer = from_tot[-1]
    assert (answer.tokens, answer.max_tokens, answer.parents, answer.role) == \
        (finisher.tokens, finisher.max_tokens, (0, 1), "assistant")

    boxed = direct_trace(PROBLEM, "\\boxed{7}", events=tot_traces[0], tokenizer=tiny_gqa.tokenizer)[-1]
    assert list(boxed.tokens) == tiny_gqa.tokenizer.encode("\\boxed{7}", add_special_tokens=False)
    assert boxed.text == "\\boxed{7}" and not boxed.forced
    assert sampled_end_of_turn(boxed, choreo.Choreographer(tiny_gqa).format)  # its end-of-turn is trained
    for trace in (from_tot, direct_trace(PROBLEM, "\\boxed{7}", events=[], tokenizer=tiny_gqa.tokenizer)):
        loss = replay_loss(choreo.Choreographer(tiny_gqa), trace).loss
        assert 0 < float(loss) < 100
