"""Branch-solve-merge: branch parsing, coverage matching, concept loading, layouts, judge, trace re-layout."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import choreo
from choreo.data.concepts import BUILTIN_CONCEPTS, coverage, found, inflections, load_concept_sets
from choreo.cache import CapacityError
from choreo.workflows.bsm import (MAX_SEED, BSMConfig, as_layout, bsm, judge_diagnostics, judge_outcome,
                                  parse_branch, parse_verdict, run_condition, run_judge, stories_digest)

CONCEPTS = ["dog", "ball", "park", "dance", "river", "art"]
TINY_CONFIG = BSMConfig(branch_tokens=8, solve_tokens=6, merge_tokens=6)


def test_parse_branch():
    text = "Topic: a day out\nGroup 1: Dog, ball and park.\nGroup 2: dance, river, art, unicorn"
    assert parse_branch(text, CONCEPTS) == ("a day out", ["dog", "ball", "park"], ["dance", "river", "art"])
    assert parse_branch("**Group 2:** art\nTopic - x\n**Group 1:** dog", CONCEPTS) == ("x", ["dog"], ["art"])
    assert parse_branch("Topic: x\nGroup 1: dog", CONCEPTS) is None  # no second group
    assert parse_branch("Group 1: dog\nGroup 2: art", CONCEPTS) is None  # no topic
    assert parse_branch("Topic: x\nGroup 1: dog, art\nGroup 2: art", CONCEPTS) is None  # art taken by group 1


@pytest.mark.parametrize("text, expected", [
    ("Topic:\nGroup 1: dog\nGroup 2: art", None),                      # the topic never reads a group's line
    ("Topic:\nA walk\nGroup 1: dog\nGroup 2: art", ("A walk", ["dog"], ["art"])),
    ("Topic: x\nGroup 1:\n- dog\n- ball\nGroup 2:\n1. park\n2) rivers", ("x", ["dog", "ball"], ["park", "river"])),
    ("Topic: x\nGroup 1:\n- dog\n\n- ball\nGroup 2: art", ("x", ["dog", "ball"], ["art"])),  # markdown's blank lines
    ("Topic: x\nGroup 1:\n- dog\nNotes:\n- ball\nGroup 2: art", ("x", ["dog"], ["art"])),  # another line ends it
    ("Topic: a day out\n**Group 1:**\n\n* dog\n* ball\n\n**Group 2:**\n\n* park",
     ("a day out", ["dog", "ball"], ["park"])),
    ("Topic: x\n1. Group 1: dog, ball\n2. Group 2: park", ("x", ["dog", "ball"], ["park"])),  # numbered groups
    ("Topic: x\nGroup 1: the dog, a ball\nGroup 2: an art", ("x", ["dog", "ball"], ["art"])),  # articles
    ("Topic: x\nGroup 1: dog ball dance\nGroup 2: art", ("x", ["dog", "ball", "dance"], ["art"])),  # no commas
    ("Topic: x\nGroup 1: dog\nGroup 2: a river walk", ("x", ["dog"], ["river"])),  # words of an unknown item
    ("Topic: x\nGroup 1 (fun): dogs, dancing\nGroup 2 (outdoors): park and art",
     ("x", ["dog", "dance"], ["park", "art"])),
    ("Topic: x\nGroup 1 (dog-walking): dog\nGroup 2: art", ("x", ["dog"], ["art"])),
    ("Topic: x\nGroup 1: dogs, dog\nGroup 2: dog, art", ("x", ["dog"], ["art"])),  # an inflection is its concept
], ids=["topic-then-group", "topic-next-line", "bullets", "blank-lines-between-bullets", "other-line-ends-bullets",
        "markdown-bold-groups", "numbered-groups", "articles", "no-commas", "unknown-item-words",
        "parenthesis-inflections", "hyphen-in-parenthesis", "inflection-taken"])
def test_parse_branch_awkward_layouts(text, expected):
    assert parse_branch(text, CONCEPTS) == expected


def test_coverage_substring_versus_word():
    story = "At the start, the dogs danced by the river."
    assert found("art", story, method="substring") and not found("art", story)
    assert found("dog", story) and found("dance", story) and not found("ball", story)
    assert found("dance", "they were dancing") and not found("wine", "a cold wind") and found("wine", "wines")
    assert coverage(["dog", "art", "river", "ball"], story) == 0.5
    assert coverage(["dog", "art", "river", "ball"], story, method="substring") == 0.75
    with pytest.raises(ValueError, match="unknown matching method 'stem'"):
        found("dog", story, method="stem")


# (concept, word in a story): the concept plus one regular suffix, regularly spelled.
INFLECTED = [("run", "running"), ("run", "runner"), ("swim", "swimming"), ("shop", "shopping"), ("shop", "shopped"),
             ("stop", "stopped"), ("city", "cities"), ("party", "parties"), ("party", "partied"), ("carry", "carrier"),
             ("happy", "happiest"), ("carry", "carrying"), ("dry", "dryer"), ("tie", "tying"), ("tie", "tied"),
             ("dance", "dancing"), ("dance", "danced"), ("dance", "dancer"), ("free", "freeing"), ("box", "boxes"),
             ("tomato", "tomatoes"), ("jump", "jumped"), ("play", "played"), ("visit", "visited"),
             ("travel", "travelled"), ("travel", "traveled"), ("quit", "quitting"), ("snow", "snowing"),
             ("dog", "dog's"), ("Dog", "DOGS")]
# (concept, word) that must not match: another word, an irregular form, or a misspelled inflection.
NOT_INFLECTED = [("cat", "catalog"), ("sit", "site"), ("sit", "sites"), ("art", "start"), ("car", "cares"),
                 ("car", "card"), ("car", "caring"), ("hat", "hated"), ("win", "wind"), ("wine", "wind"),
                 ("tie", "tier"), ("be", "bed"), ("be", "best"), ("run", "ran"), ("swim", "swam"), ("leaf", "leaves"),
                 ("child", "children"), ("city", "citizen"), ("dog", "hotdog")]


@pytest.mark.parametrize("concept,word", INFLECTED, ids=[f"{c}-{w}" for c, w in INFLECTED])
def test_word_matching_takes_regular_inflections(concept, word):
    assert found(concept, f"Then {word}, at last.")
    assert word.lower() in inflections(concept) or word.lower() == f"{concept.lower()}'s"


@pytest.mark.parametrize("concept,word", NOT_INFLECTED, ids=[f"{c}-{w}" for c, w in NOT_INFLECTED])
def test_word_matching_rejects_other_words(concept, word):
    assert not found(concept, f"Then {word}, at last.")


def test_inflections_example():
    assert inflections("run") == ("run", "runs", "running", "runned", "runner", "runners", "runnest")
    assert inflections("city")[:2] == ("city", "cities")


def test_builtin_concept_sets_are_deterministic():
    a = load_concept_sets(None, n=3, size=10, seed=2)
    assert a == load_concept_sets(None, n=3, size=10, seed=2)
    assert a[1:] == load_concept_sets(None, n=2, skip=1, size=10, seed=2)
    assert all(len(set(s)) == 10 and set(s) <= set(BUILTIN_CONCEPTS) for s in a)


def test_commongen_file_loading_and_errors(tmp_path):
    rows = [{"concepts": ["Dog", "ball"]}, {"concepts": ["park", "kite", "wind"]}]
    (tmp_path / "commongen_hard.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_concept_sets(tmp_path, n=2) == [["dog", "ball"], ["park", "kite", "wind"]]
    assert load_concept_sets(tmp_path, n=1, skip=1) == [["park", "kite", "wind"]]
    with pytest.raises(ValueError, match="has 2 concept sets; 3 needed"):
        load_concept_sets(tmp_path, n=3)
    (tmp_path / "commongen_hard.jsonl").write_text('{"concepts": ["a", "b"]}\n{"concepts": "oops"}\n')
    with pytest.raises(ValueError, match=r"commongen_hard.jsonl:2: expected"):
        load_concept_sets(tmp_path, n=2)
    (tmp_path / "commongen_hard.jsonl").write_text('{"concepts": ["a", "b"]}\n{broken\n')
    with pytest.raises(ValueError, match=r"commongen_hard.jsonl:2: malformed JSON"):
        load_concept_sets(tmp_path, n=2)
    with pytest.raises(FileNotFoundError, match="commongen_hard.jsonl"):
        load_concept_sets(tmp_path / "missing", n=1)


def test_bad_options():
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        BSMConfig(temperature=-1)
    with pytest.raises(ValueError, match="merge_tokens must be an integer >= 1"):
        BSMConfig(merge_tokens=0)
    with pytest.raises(ValueError, match="unknown BSM condition 'fancy'"):
        run_condition(None, [CONCEPTS], condition="fancy")
    with pytest.raises(ValueError, match="size must be an integer in 2..154, got 1"):
        load_concept_sets(None, n=1, size=1)
    with pytest.raises(ValueError, match="BSMConfig.system must be a non-empty system prompt, got ''"):
        BSMConfig(system="")
    with pytest.raises(ValueError, match="BSMConfig.system must be a non-empty system prompt, got None"):
        BSMConfig(system=None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n="3"), "n must be an integer >= 1, got '3'"),
    (dict(n=2.5), "n must be an integer >= 1, got 2.5"),
    (dict(n=0), "n must be an integer >= 1, got 0"),
    (dict(n=1, skip=-1), "skip must be an integer >= 0, got -1"),
    (dict(n=1, skip=1.0), "skip must be an integer >= 0, got 1.0"),
    (dict(n=1, size=3.0), "size must be an integer in 2..154, got 3.0"),
], ids=["string", "float", "zero", "negative-skip", "float-skip", "float-size"])
def test_concept_set_loader_names_the_bad_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_concept_sets(None, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=-1), r"seed must be an integer in 0\.\.\d+, got -1"),
    (dict(seed=1.0), r"seed must be an integer in 0\.\.\d+, got 1.0"),
    (dict(seed=MAX_SEED), rf"seed must be an integer in 0\.\.{MAX_SEED - 1}, got {MAX_SEED}"),
    (dict(seeds=[3, MAX_SEED + 1]), rf"seeds\[1\] must be an integer in 0\.\.{MAX_SEED}, got {MAX_SEED + 1}"),
], ids=["negative", "float", "last-instance-too-large", "seeds-too-large"])
def test_seeds_are_checked_before_anything_runs(tiny_gqa, kwargs, message):
    """The seed the caller passed is named (not the call seed 4 * seed derived from it), before any instance runs."""
    assert MAX_SEED == (2**32 - 1 - 3) // 4  # the merge of the last allowed instance samples with seed 2**32 - 1
    with pytest.raises(ValueError, match=message):
        run_condition(tiny_gqa, [CONCEPTS, CONCEPTS], condition="baseline", config=TINY_CONFIG, progress=False,
                      **kwargs)
    with pytest.raises(ValueError, match=r"seed must be an integer in 0\.\.\d+, got -1"):
        choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False).run(
            [lambda ex: bsm(ex, CONCEPTS, layout="parallel", seed=-1, config=TINY_CONFIG)])


def test_run_condition_takes_the_capacity_its_error_asks_for(tiny_gqa):
    with pytest.raises(CapacityError, match=r"pass a lower batch= \(now 64\) or a larger capacity= \(now 200\)"):
        run_condition(tiny_gqa, [CONCEPTS] * 2, condition="choreographed", config=TINY_CONFIG, capacity=200,
                      progress=False)
    out = run_condition(tiny_gqa, [CONCEPTS] * 2, condition="choreographed", config=TINY_CONFIG, capacity=200,
                        batch=1, progress=False)
    assert len(out) == 2


def test_verdicts():
    assert parse_verdict(" B. Story B is better") == "B"
    assert parse_verdict("Both are fine") is None


@pytest.mark.parametrize("text, verdict", [
    (" A or B", None), (" Story A and Story B", None), (" A, B", None), ("A/B", None),  # the question echoed
    ("A story that is better is Story B", "B"),  # the article, then a letter
    ("Story B is better. A is weak.", "B"),  # only the first sentence is read for both letters
    (" A.", "A"), (" b", "B"),
])
def test_a_first_sentence_naming_both_letters_is_no_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def _merge_parents(executor, layout):
    """Run one instance with a fixed split and return the merge message's effective parent positions."""
    seen = {}

    async def wf(ex):
        out = await bsm(ex, CONCEPTS, layout=layout, seed=3, config=TINY_CONFIG,
                        split=("a day", CONCEPTS[:3], CONCEPTS[3:]))
        seen.update(out)
        return out

    runner = choreo.Runner(executor, progress=False, trace=True)
    runner.run([wf])
    merge = [e for e in runner.traces[0] if e.kind == "decode"][-1]
    return seen, merge, runner.traces[0]


def test_layouts_and_paired_seeds(tiny_gqa):
    base, base_merge, base_trace = _merge_parents(choreo.Baseline(tiny_gqa), "linearized")
    lin, lin_merge, _ = _merge_parents(choreo.Choreographer(tiny_gqa), "linearized")
    par, par_merge, _ = _merge_parents(choreo.Choreographer(tiny_gqa), "parallel")
    assert base["stories"] == lin["stories"] == par["stories"]  # same prompts and seeds before the merge
    # Linearized merges see the baseline's positions, but not its encoding: the baseline re-encodes story 1
    # attending to story 0's branch, the cached story 1 never saw it. So the merged texts may differ.
    assert base_merge.offsets == lin_merge.offsets
    assert par_merge.offsets is None and lin_merge.offsets is not None
    assert [e.offsets for e in as_layout(base_trace, "parallel")] == [None] * len(base_trace)
    assert 0 <= base["coverage"]["word"] <= 1 and 0 <= base["coverage"]["substring"] <= 1


def test_the_distillation_teacher_reads_the_merge_prompt_the_baseline_read(tiny_gqa):
    """A baseline trace re-laid for the parallel layout drops the merge's offsets; without them a re-encoding
    replay would order the merge's parents by position (both solve prompts, then both stories), a prompt the
    baseline never read. The teacher replays the trace as recorded (``as_recorded``): the recorded offsets."""
    from choreo.finetune import Teacher
    from choreo.trace import TraceEvent, as_recorded

    _, _, base_trace = _merge_parents(choreo.Baseline(tiny_gqa), "linearized")
    relaid = as_layout(base_trace, "parallel")
    assert as_recorded(relaid) == list(base_trace)
    assert [TraceEvent.from_json(e.to_json()) for e in relaid] == relaid  # saved traces keep the recorded offsets
    merge = max(i for i, e in enumerate(base_trace) if e.kind == "decode")
    with torch.no_grad():
        teacher = Teacher(tiny_gqa, calls="last")(relaid)[merge]
        recorded = Teacher(tiny_gqa, calls="last")(base_trace)[merge]
        forgotten = Teacher(tiny_gqa, calls="last")([dataclasses.replace(e, recorded_offsets=None)
                                                     for e in relaid])[merge]
    torch.testing.assert_close(teacher, recorded, atol=0, rtol=0)
    assert (teacher - forgotten).abs().max() > 1e-3  # another prompt: the order of the merge's parents matters


def test_unparsed_branch_scores_zero(tiny_gqa):
    out = run_condition(tiny_gqa, [CONCEPTS], condition="choreographed", config=TINY_CONFIG, progress=False)[0]
    assert not out["parsed"], out  # the fp64 random model's branch does not follow the format (deterministic)
    assert out["coverage"] == {"word": 0.0, "substring": 0.0} and out["merged"] == ""


def test_judge_needs_both_orders(tiny_gqa):
    assert run_judge(tiny_gqa, [("", "")], progress=False) == [
        {"outcome": "tie", "orders": [], "stories": stories_digest("", "")}]
    assert run_judge(tiny_gqa, [("A story.", "")], progress=False) == [
        {"outcome": "A", "orders": [], "stories": stories_digest("A story.", "")}]
    (record,) = run_judge(tiny_gqa, [("The dog ran.", "The cat sat.")], progress=False)
    assert record["outcome"] in ("A", "B", "tie") and len(record["orders"]) == 2
    assert record["stories"] == stories_digest("The dog ran.", "The cat sat.") != stories_digest("The cat sat.",
                                                                                                 "The dog ran.")
    for order in record["orders"]:  # each order's raw answer is kept with its parse
        assert isinstance(order["text"], str) and order["verdict"] == parse_verdict(order["text"])
    ab, ba = (o["verdict"] for o in record["orders"])
    assert record["outcome"] == choreo.stats.combine_orders(ab, {"A": "B", "B": "A"}.get(ba))


def _order(text):
    return {"text": text, "verdict": parse_verdict(text)}


def test_judge_diagnostics_tell_position_bias_from_unparsable_answers():
    biased = {"outcome": "tie", "orders": [_order(" A"), _order(" A.")]}
    unparsable = {"outcome": "tie", "orders": [_order(" Both"), _order(" A")]}
    win = {"outcome": "B", "orders": [_order(" B"), _order(" A")]}
    empty = {"outcome": "A", "orders": []}
    d = judge_diagnostics([biased, biased, unparsable, win, empty])
    assert d == {"n": 5, "not_logged": 0, "asked": 4, "verdicts": 8, "unparsable": 1, "position_a": 2,
                 "position_b": 0, "consistent": 1}
    old = judge_diagnostics(["tie", "tie", biased])  # records that kept only the outcome
    assert (old["not_logged"], old["asked"], old["position_a"]) == (2, 1, 1)
    assert [judge_outcome(r) for r in ("tie", "A", win)] == ["tie", "A", "B"]


def test_halves_branch_mode(tiny_gqa):
    from choreo.workflows.bsm import halves

    assert halves(["a", "b", "c"]) == (["a", "b"], ["c"])
    with pytest.raises(ValueError, match="BSMConfig.branch must be one of"):
        BSMConfig(branch="random")
    config = BSMConfig(branch="halves", branch_tokens=6, solve_tokens=4, merge_tokens=4)
    out = run_condition(tiny_gqa, [CONCEPTS], condition="linearized", config=config, progress=False)[0]
    if out["parsed"]:  # an empty topic (the tiny model may stop at once) also counts as a failure
        assert out["groups"] == [CONCEPTS[:3], CONCEPTS[3:]] and out["topic"]


@pytest.mark.parametrize("reply, calls", [("\nA day at the beach\n", 2), (" A day at the beach\n", 1)],
                         ids=["topic-on-the-next-line", "topic-on-its-line"])
def test_halves_topic_may_start_on_the_next_line(tiny_gqa, monkeypatch, reply, calls):
    """A halves-mode topic written on the line after "Topic:" is read (as ``_topic`` reads the model mode's), not an
    empty topic: the branch reply is continued past its opening line break. One on the first line takes one call."""
    import choreo.engine

    tok = tiny_gqa.tokenizer
    script = [t for line in reply.split("\n")[:-1] for t in tok.encode(line, add_special_tokens=False)
              + tok.encode("\n", add_special_tokens=False)]  # the branch's tokens, each line break its own token
    real, drawn = choreo.engine.sample, []

    def scripted(logits, **kwargs):  # the first tokens sampled are the branch reply's
        drawn.append(None)
        return script[len(drawn) - 1] if len(drawn) <= len(script) else real(logits, **kwargs)

    monkeypatch.setattr(choreo.engine, "sample", scripted)
    config = BSMConfig(branch="halves", branch_tokens=12, solve_tokens=3, merge_tokens=3)
    (out,), (trace,) = run_condition(tiny_gqa, [CONCEPTS], condition="choreographed", config=config,
                                     progress=False, trace=True)
    assert out["parsed"] and out["topic"] == "A day at the beach", out
    assert out["branch"] == "Topic:" + reply and out["groups"] == [CONCEPTS[:3], CONCEPTS[3:]]
    branch_calls = [e for e in trace if e.kind == "decode" and e.prefix.startswith("Topic:")]
    assert len(branch_calls) == calls and {e.seed for e in branch_calls} == {0}
