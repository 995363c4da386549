"""MultiQA: grading, question loading, and the workflow's layouts (same tokens; serial == baseline)."""

from __future__ import annotations

import json

import pytest

import choreo
from choreo.data.trivia import (Question, grade, load_questions, make_pairs, matches, normalize, overlapping,
                                split_numbered)
from choreo.workflows.multiqa import MultiQAConfig, multiqa, run_condition, turn_segments

FRANCE = Question(id="f", question="What is the capital of France?", aliases=("Paris",))
HAMLET = Question(id="h", question="Who wrote Hamlet?", aliases=("William Shakespeare", "Shakespeare"))


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


def test_builtin_questions_and_pairs():
    qs = load_questions()
    assert len(qs) >= 100 and len({q.id for q in qs}) == len(qs)
    pairs = make_pairs(qs, 50, seed=1)
    assert len(pairs) == 50 and pairs == make_pairs(qs, 50, seed=1)
    assert all(a.id != b.id and not overlapping(a, b) for a, b in pairs)


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
