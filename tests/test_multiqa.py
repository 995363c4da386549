"""MultiQA: grading, question loading, and the workflow's layouts (same tokens; serial == baseline)."""

from __future__ import annotations

import json

import pytest

import choreo
from choreo.data.trivia import (Question, free_text_aliases, grade, load_questions, make_pairs, matches, with_numbers,
                                matches_item, normalize, overlapping, split_numbered, split_questions)
from choreo.workflows.multiqa import MultiQAConfig, multiqa, run_condition, turn_segments

FRANCE = Question(id="f", question="What is the capital of France?", aliases=("Paris",))
HAMLET = Question(id="h", question="Who wrote Hamlet?", aliases=("William Shakespeare", "Shakespeare"))
JAPAN = Question(id="j", question="What is the capital of Japan?", aliases=("Tokyo",))
CONTINENTS = Question(id="c", question="How many continents are there?", aliases=("7", "seven"))


def test_normalisation_is_triviaqa_style():
    assert normalize("The  Beatles!") == "beatles"
    assert normalize("An Apple, a day") == "apple day"
    assert matches("It was William Shakespeare.", HAMLET.aliases)
    assert not matches("Parisian cafes", FRANCE.aliases)
    assert matches("Washington, D.C.", ["Washington D.C."])


def test_numbered_answers_are_split_and_graded_per_item():
    assert split_numbered("1. Paris\n2. Shakespeare") == {1: "Paris", 2: "Shakespeare"}
    assert split_numbered("Question 1: Paris\nAnswer 2) Shakespeare") == {1: "Paris", 2: "Shakespeare"}
    assert grade("1. Paris\n2. Shakespeare", [FRANCE, HAMLET]) == [True, True]
    assert grade("1. Shakespeare", [FRANCE, HAMLET]) == [False, True]  # item 2 missing: whole response
    assert grade("1. Paris\n2. Paris", [FRANCE, HAMLET]) == [True, False]
    assert grade("The capital of France is Paris.", [FRANCE, HAMLET]) == [True, False]  # free text
    # A number past Python's int() limit (4,300 digits) numbers no item: graded, not a crash
    assert grade("9" * 5000 + ". Lyon\n2. Shakespeare", [FRANCE, HAMLET]) == [False, True]
    assert split_numbered("1. Paris " + "2" * 5000 + ". Tokyo") == {1: "Paris " + "2" * 5000 + ". Tokyo"}


@pytest.mark.parametrize("response, expected", [
    ("Question 1: What is the capital of France?\nAnswer 1: Paris\n"
     "Question 2: What is the capital of Japan?\nAnswer 2: Tokyo", [True, True]),
    ("Q1: What is the capital of France?\nA1: Paris\nQ2: What is the capital of Japan?\nA2: Tokyo", [True, True]),
    ("1. What is the capital of France?\nAnswer 1: Paris\n2. Tokyo", [True, True]),  # answer beats plain "1."
    ("Answer 1: Lyon\nQuestion 1: What is the capital of France? Paris\n2. Tokyo", [False, True]),  # answer first
    ("Question 1: What is the capital of France?\nAnswer 1:\nQuestion 2: Capital of Japan?", [False, False]),
    ("Question 1: Paris\nQuestion 2: Tokyo", [True, True]),  # "Question i" used as the answer's label
], ids=["echoed-questions", "q-a-short-labels", "plain-then-answer", "answer-first", "empty-answer",
        "question-labels-only"])
def test_answer_items_win_over_echoed_questions(response, expected):
    assert grade(response, [FRANCE, JAPAN]) == expected


@pytest.mark.parametrize("text, items", [
    ("1. Tokyo 2. Paris", {1: "Tokyo", 2: "Paris"}),
    ("Sure! 1. Paris 2) Tokyo", {1: "Paris", 2: "Tokyo"}),
    ("**1.** Paris **2.** Tokyo", {1: "Paris", 2: "Tokyo"}),
    ("Question 1: Paris Answer 2: Tokyo", {1: "Paris", 2: "Tokyo"}),
    ("1. 3.14 2. Tokyo", {1: "3.14", 2: "Tokyo"}),  # a decimal is no marker
    ("1. Founded in 1999. 2. Tokyo", {1: "Founded in 1999.", 2: "Tokyo"}),  # nor a year ending a sentence
    ("1. Paris 3. Tokyo", {1: "Paris 3. Tokyo"}),  # only the next expected number splits
    ("1. Paris 2: Tokyo", {1: "Paris 2: Tokyo"}),  # a bare colon inline is no marker
    ("1. Paris 2.Tokyo", {1: "Paris 2.Tokyo"}),  # no space after the marker
    ("The answer is 1.\nThen 2. more", {}),  # a sentence's last word is no marker; "2." is not expected first
    ("1. Paris\n  2. Tokyo", {1: "Paris", 2: "Tokyo"}),  # indented line-start marker, found once
], ids=["inline", "preamble", "bold", "keywords", "decimal", "year", "skipped-number", "colon", "no-space",
        "sentence-end", "indented"])
def test_inline_numbered_items_are_split(text, items):
    assert split_numbered(text) == items


def test_swapped_inline_answers_grade_wrong():
    assert grade("1. Tokyo 2. Paris", [FRANCE, JAPAN]) == [False, False]
    assert grade("1. Paris 2. Tokyo", [FRANCE, JAPAN]) == [True, True]
    assert split_numbered("Question 1: Capital of France?\nAnswer 1: Paris 2. Shakespeare") == \
        {1: "Paris", 2: "Shakespeare"}  # the docstring's example


@pytest.mark.parametrize("response, expected", [
    ("1. 7\n2. Paris", [True, True]),
    ("1. There are 7.\n2. Paris", [True, True]),
    ("1. (7)\n2. Paris", [True, True]),
    ("1. seven\n2. Paris", [True, True]),
    ("1. 7.5\n2. Paris", [False, True]),  # part of a number is not the token "7"
    ("1. 17\n2. Paris", [False, True]),
    ("1. 6\n2. Paris, population 7 million", [False, True]),  # a short alias counts only in its own item
    ("There are 7 continents; the capital is Paris.", [True, True]),  # free text: a whole token
    ("There are seven continents; the capital is Paris.", [True, True]),
    ("Question 7 is about Paris.", [False, True]),  # free text: a question's number is not an answer
    ("Q7 and #7: Paris", [False, True]),
    ("About 7.5 continents and Paris", [False, True]),
], ids=["bare", "sentence", "parenthesised", "long-alias", "decimal", "longer-number", "other-item", "free-text",
        "free-text-long", "free-text-question-number", "free-text-q-and-hash", "free-text-decimal"])
def test_short_aliases_match_whole_tokens_of_their_item(response, expected):
    assert grade(response, [CONTINENTS, FRANCE]) == expected


@pytest.mark.parametrize("response, aliases, correct", [
    ("A triangle has 3 sides.", ("three",), True),  # the committed MultiQA log's "The answer is: 3" to c077
    ("The answer is: 3", ("three",), True),
    ("1. three", ("3",), True),
    ("There are twenty of them", ("20",), True),
    ("There are 21 of them", ("twenty-one",), False),  # only zero to twenty
    ("It has 3 sides", ("four",), False),
], ids=["digit-for-word", "answer-is", "word-for-digit-item", "twenty", "past-twenty", "wrong-number"])
def test_numbers_up_to_twenty_are_the_same_answer_as_words_or_digits(response, aliases, correct):
    question = Question(id="n", question="How many?", aliases=aliases)
    assert grade(response, [question]) == [correct]


def test_number_spellings_make_questions_overlap():
    three = Question(id="a", question="How many sides has a triangle?", aliases=("three",))
    digits = Question(id="b", question="How many wheels has a tricycle?", aliases=("3",))
    assert overlapping(three, digits) and with_numbers(("three", "dozen")) == ("three", "dozen", "3")


def test_short_aliases_are_kept(tmp_path):
    data = {"Data": [{"QuestionId": "tq1", "Question": "How many continents are there?",
                      "Answer": {"Value": "7", "Aliases": ["7", "seven"]}},
                     {"QuestionId": "tq2", "Question": "Which letter is a vowel: B or E?",
                      "Answer": {"Value": "E", "Aliases": ["E"]}}]}
    (tmp_path / "tq.json").write_text(json.dumps(data))
    seven, vowel = load_questions(tmp_path / "tq.json")
    assert seven.aliases == ("7", "seven") and vowel.aliases == ("E",)  # a question with only a short alias loads
    assert free_text_aliases(seven.aliases) == ("seven",)
    assert matches_item("7 (seven)", ["7"]) and not matches_item("7.5", ["7"])
    assert grade("1. 7\n2. E", [seven, vowel]) == [True, True]
    assert Question(id="l", question="Q?", aliases=["x", "The"]).aliases == ("x", "The")  # list -> tuple, all kept


@pytest.mark.parametrize("aliases, error, message", [
    (("The", "!"), ValueError, r"question 'bad' has no alias left after normalisation: \('The', '!'\)"),
    ((), ValueError, "no alias left after normalisation: \\(\\)"),
    ("Paris", TypeError, "aliases must be a sequence of strings, got the string 'Paris'"),
], ids=["only-articles-and-punctuation", "none", "string"])
def test_unusable_aliases_are_refused(aliases, error, message):
    with pytest.raises(error, match=message):
        Question(id="bad", question="Q?", aliases=aliases)


def test_builtin_questions_and_pairs():
    qs = load_questions()
    assert len(qs) >= 100 and len({q.id for q in qs}) == len(qs)
    pairs = make_pairs(qs, 50, seed=1)
    assert len(pairs) == 50 and pairs == make_pairs(qs, 50, seed=1)
    assert all(a.id != b.id and not overlapping(a, b) for a, b in pairs)


def test_question_split_keeps_training_questions_out_of_every_evaluation_pair():
    qs = load_questions()
    evaluation, training = split_questions(qs, train_share=0.4, seed=0)
    assert (len(evaluation), len(training)) == (len(qs) - round(0.4 * len(qs)), round(0.4 * len(qs)))
    assert {q.id for q in evaluation}.isdisjoint(q.id for q in training)
    assert sorted(q.id for q in evaluation + training) == sorted(q.id for q in qs)
    assert (evaluation, training) == split_questions(qs, train_share=0.4, seed=0)  # seeded
    assert split_questions(qs, train_share=0.4, seed=1) != (evaluation, training)
    assert [qs.index(q) for q in training] == sorted(qs.index(q) for q in training)  # order kept
    held_out = {q.id for pair in make_pairs(training, 100, seed=1) for q in pair}
    assert held_out.isdisjoint(q.id for pair in make_pairs(evaluation, 100, seed=0) for q in pair)
    for share in (0, 1, 1.5, "0.4", True):
        with pytest.raises(ValueError, match="train_share must be a number in"):
            split_questions(qs, train_share=share, seed=0)
    with pytest.raises(ValueError, match="at least 2 questions on each side"):
        split_questions(qs[:3], train_share=0.5, seed=0)


def test_pairs_with_no_valid_partner_raise_instead_of_looping():
    paris = [Question(id=f"p{i}", question=f"Capital of France ({i})?", aliases=("Paris",)) for i in range(2)]
    with pytest.raises(ValueError, match=r"asked for 1 pairs, found 0: question 'p[01]' .* no partner among the 2"):
        make_pairs(paris, 1, seed=0)
    both = Question(id="both", question="Capitals of France and Japan?", aliases=("Paris Tokyo",))
    with pytest.raises(ValueError, match=r"asked for 30 pairs, found \d+: question 'both' .*overlapping answers"):
        make_pairs([FRANCE, JAPAN, both], 30, seed=0)  # "both" overlaps every other question
    twins = [Question(id="x", question="Capital of France?", aliases=("Paris",)),
             Question(id="x", question="Capital of Japan?", aliases=("Tokyo",))]
    with pytest.raises(ValueError, match="same id"):
        make_pairs(twins, 1, seed=0)


def test_rare_partner_is_found_not_skipped():
    """100 questions answered "Paris" and one "Tokyo": every Paris question's only partner is Tokyo, which 100
    random draws miss about 37% of the time; still every question is Q1 exactly once in the first 101 pairs."""
    paris = [Question(id=f"p{i}", question=f"Capital of France ({i})?", aliases=("Paris",)) for i in range(100)]
    pairs = make_pairs([*paris, JAPAN], 101, seed=0)
    assert sorted(a.id for a, _ in pairs) == sorted(q.id for q in [*paris, JAPAN])
    assert all("j" in (a.id, b.id) and a.id != b.id for a, b in pairs)


@pytest.mark.parametrize("n", [0, -1, True, 2.5], ids=["zero", "negative", "bool", "float"])
def test_pair_count_is_validated(n):
    with pytest.raises(ValueError, match=f"number of pairs must be an integer >= 1, got {n!r}"):
        make_pairs([FRANCE, JAPAN], n, seed=0)


@pytest.mark.parametrize("limit", [-1, 0, True, False, 1.5, "2"], ids=["minus-one", "zero", "true", "false",
                                                                      "float", "string"])
def test_question_limit_is_validated(limit):
    with pytest.raises(ValueError, match=f"limit must be an integer >= 1 or None, got {limit!r}"):
        load_questions(limit=limit)


def test_question_limit_keeps_the_first(tmp_path):
    rows = [{"question": f"Q{i}?", "aliases": [f"answer{i}"]} for i in range(3)]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [q.question for q in load_questions(tmp_path / "q.jsonl", limit=1)] == ["Q0?"]
    assert len(load_questions(tmp_path / "q.jsonl", limit=3)) == 3
    assert len(load_questions(tmp_path / "q.jsonl", limit=99)) == 3  # a limit above the count keeps all


def test_triviaqa_formats_load(tmp_path):
    original = {"Data": [{"Question": "Who wrote Hamlet?", "QuestionId": "tc_1",
                          "Answer": {"Value": "William Shakespeare", "Aliases": ["Shakespeare", "Bard"]}}]}
    (tmp_path / "web.json").write_text(json.dumps(original))
    (q,) = load_questions(tmp_path / "web.json")
    assert q.id == "tc_1" and q.aliases == ("William Shakespeare", "Shakespeare", "Bard")
    rows = [{"question": "Capital of Peru?", "question_id": "x", "answer": {"value": "Lima", "aliases": ["Lima"]}}]
    (tmp_path / "hf.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_questions(tmp_path / "hf.jsonl")[0].aliases == ("Lima",)


@pytest.mark.parametrize("content, message", [
    ('{"question": "Q?", "aliases": ["x1"]}\n{not json\n', "bad.jsonl:2: malformed JSON"),
    ('{"question": "Q?", "aliases": ["ok"]}\n{"question": "", "aliases": ["x1"]}\n', "bad.jsonl:2: missing or empty"),
    ('{"question": "Q?"}\n', "bad.jsonl:1: no answer aliases"),
])
def test_malformed_question_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_questions(tmp_path / "bad.jsonl")


def test_missing_question_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_questions(tmp_path / "nope.json")


def test_unknown_layout_and_condition(tiny_gqa):
    with pytest.raises(ValueError, match="unknown MultiQA condition 'sideways'"):
        run_condition(tiny_gqa, [[FRANCE, HAMLET]], condition="sideways", progress=False)
    ex = choreo.Choreographer(tiny_gqa)
    with pytest.raises(ValueError, match="unknown MultiQA layout"):
        choreo.Runner(ex, progress=False).run([lambda s: multiqa(s, [FRANCE], layout="diagonal")])


def test_segments_are_one_user_turn(tokenizer):
    """The segments concatenate to the chat template's rendering of one user turn holding both questions."""
    from choreo.chat import ChatFormat

    class Ex:
        format = ChatFormat(tokenizer)

    segs = turn_segments(Ex, [FRANCE, HAMLET], MultiQAConfig())
    ids = [t for s, _ in segs for t in s]
    whole = Ex.format.encode("Question 1: What is the capital of France?\nQuestion 2: Who wrote Hamlet?", "user")
    assert ids == whole


@pytest.mark.parametrize("instruction", ["Answer both questions.", "Answer both questions.\n"],
                         ids=["no-line-break", "own-line-break"])
def test_an_instruction_is_a_line_of_its_own(tokenizer, instruction):
    """The instruction never runs into "Question 1:"; one that ends its own line is not given a second break."""
    from choreo.chat import ChatFormat

    class Ex:
        format = ChatFormat(tokenizer)

    segs = turn_segments(Ex, [FRANCE, HAMLET], MultiQAConfig(instruction=instruction))
    assert segs[0][1].endswith("\nAnswer both questions.\n")
    whole = Ex.format.encode("Answer both questions.\nQuestion 1: What is the capital of France?\n"
                             "Question 2: Who wrote Hamlet?", "user")
    assert [t for s, _ in segs for t in s] == whole


def test_run_condition_takes_the_capacity_its_error_asks_for(tiny_gqa):
    pairs = [[FRANCE, HAMLET]] * 2
    with pytest.raises(choreo.cache.CapacityError, match=r"pass a lower batch= \(now 64\) or a larger capacity= "
                                                         r"\(now 150\)"):
        run_condition(tiny_gqa, pairs, condition="choreographed", capacity=150, progress=False)
    assert len(run_condition(tiny_gqa, pairs, condition="choreographed", capacity=150, batch=1, progress=False)) == 2


def test_layouts_place_questions(tiny_gqa):
    pairs = [[FRANCE, HAMLET]]
    out = {c: run_condition(tiny_gqa, pairs, condition=c, progress=False)[0]
           for c in ("baseline", "serial", "choreographed", "linearized")}
    s1, s2 = out["serial"]["question_starts"]
    p1, p2 = out["choreographed"]["question_starts"]
    l1, l2 = out["linearized"]["question_starts"]
    assert p1 == p2 == s1 == l1 and s2 == l2 > s1  # parallel: shared positions; linearized: serial positions
    assert out["serial"]["response"] == out["baseline"]["response"]  # same tokens, same attention


def test_serial_segments_reproduce_the_baseline_exactly(tiny_gqa):
    """Greedy fp64: the choreographed executor with serial segments equals ordinary prompting token for token."""
    qs = load_questions()[:12]
    pairs = [qs[i:i + 2] for i in range(0, 12, 2)]
    config = MultiQAConfig(max_tokens=12)
    base = run_condition(tiny_gqa, pairs, condition="baseline", config=config, progress=False)
    serial = run_condition(tiny_gqa, pairs, condition="serial", config=config, progress=False)
    assert [r["response"] for r in serial] == [r["response"] for r in base]
    plain = []
    for a, b in pairs:  # an ordinary user message holding both questions (no segments at all)
        ex = choreo.Baseline(tiny_gqa)
        sys = ex.prefill(config.system, role="system")
        q = ex.prefill(f"Question 1: {a.question}\nQuestion 2: {b.question}", role="user", parents=[sys])
        plain.append(ex.decode(role="assistant", parents=[sys, q], max_tokens=12).text)
    assert [r["response"] for r in base] == plain


@pytest.mark.model
def test_embedded_model_blockage_mechanics(model):
    """On the embedded model: every condition runs; serial == baseline; a forced answer prefix is kept."""
    pairs = make_pairs(load_questions(), 3, seed=0)
    config = MultiQAConfig(max_tokens=24, answer_prefix="1.")
    runs = {c: run_condition(model, pairs, condition=c, config=config, progress=False)
            for c in ("baseline", "serial", "choreographed", "linearized")}
    assert [r["response"] for r in runs["serial"]] == [r["response"] for r in runs["baseline"]]
    assert all(r["response"].startswith("1.") for rs in runs.values() for r in rs)


def test_baseline_traces_replay_as_parallel_and_fine_tune(tiny_gqa, tmp_path):
    """Traces keep raw segments; re-laid as parallel they replay through the choreographed executor; LoRA runs."""
    from choreo.finetune import FinetuneConfig, replay_loss, trained_adapter
    from choreo.lora import is_adapted
    from choreo.workflows.multiqa import SEGMENT_ROLE, collect_traces

    pairs = make_pairs(load_questions(), 4, seed=5)
    config = MultiQAConfig(max_tokens=6)
    traces = collect_traces(tiny_gqa, pairs, config=config, progress=False)
    events = traces[0]
    segs = [k for k, e in enumerate(events) if e.role == SEGMENT_ROLE]
    assert len(segs) == 3 and [events[k].parents for k in segs[1:]] == [(0, segs[0])] * 2
    answer = events[-1]
    assert answer.kind == "decode" and answer.offsets is None and answer.parents == (0, *segs)
    out = replay_loss(choreo.Choreographer(tiny_gqa), events)
    starts = [out.messages[k].start for k in segs[1:]]
    assert starts[0] == starts[1] and 0 < float(out.loss) < 100  # parallel question segments
    with trained_adapter(tiny_gqa, traces[:3], traces[3:], config=FinetuneConfig.preset("smoke"),
                         out_dir=tmp_path, progress=False) as result:
        assert is_adapted(tiny_gqa)
        assert run_condition(tiny_gqa, pairs[:1], condition="choreographed", config=config, progress=False)
    assert not is_adapted(tiny_gqa)
    assert result.summary()["steps"] == 2 and result.summary()["history"][0]["step"] == 0


@pytest.mark.parametrize("kind, cls", [("baseline", choreo.Baseline), ("choreographed", choreo.Choreographer)])
def test_make_executor_gives_each_condition_its_executor(tiny_gqa, kind, cls):
    from choreo.workflows.executors import make_executor

    ex = make_executor(tiny_gqa, kind, capacity=512)
    assert type(ex) is cls and ex.engine.store.capacity == 512


@pytest.mark.parametrize("kind", ["Baseline", "choreographer", "", None])
def test_make_executor_names_an_unknown_kind(tiny_gqa, kind):
    from choreo.workflows.executors import make_executor

    with pytest.raises(ValueError, match=rf"unknown executor {kind!r}; choose one of 'baseline', 'choreographed'"):
        make_executor(tiny_gqa, kind)


def test_the_baseline_executor_frees_each_prompt_when_its_call_ends(tiny_gqa):
    """What make_executor's capacity advice rests on: a re-encoding baseline holds a call's prompt only while the
    call runs (the store is empty between calls), while the choreographer keeps the instance's messages."""
    from choreo.workflows.executors import make_executor

    used = {}
    for kind in ("baseline", "choreographed"):
        ex = make_executor(tiny_gqa, kind)
        sys = ex.prefill("You are terse.", role="system")
        q = ex.prefill("Capital of France?", role="user", parents=[sys])
        a = ex.decode(role="assistant", parents=[sys, q], max_tokens=3)
        ex.decode(role="assistant", parents=[sys, q, a], max_tokens=3)
        used[kind] = ex.engine.store.used
    assert used["baseline"] == 0 and used["choreographed"] > 0
