"""The canary probe: deterministic secrets, every condition scored on the same tokens, resumable runs."""

from __future__ import annotations

import pytest

import choreo
from choreo.results import JsonlLog
from choreo.workflows import canary

pytestmark = pytest.mark.model


def test_draw_is_seeded_and_distinct():
    secret, distractors = canary.draw(3)
    assert (secret, distractors) == canary.draw(3)
    assert len(set([secret] + distractors)) == 8 and secret not in distractors
    assert canary.draw(3) != canary.draw(4)
    with pytest.raises(ValueError, match="n_distractors must be in 1..47, got 0"):
        canary.draw(0, n_distractors=0)


@pytest.mark.parametrize("seed", [-1, 2.5, 2**32], ids=["negative", "float", "too-large"])
def test_bad_seeds_are_refused_by_name_before_any_probe(tiny_gqa, tmp_path, seed):
    message = rf"seed must be an integer in 0\.\.4294967295, got {seed}"
    with pytest.raises(ValueError, match=message):  # not a float truncated, nor a failure after some probes ran
        canary.run_probes(tiny_gqa, seeds=[0, seed], log=JsonlLog(tmp_path / "c.jsonl", key="seed"), progress=False)
    assert not (tmp_path / "c.jsonl").exists()
    with pytest.raises(ValueError, match=message):
        choreo.Runner(choreo.Choreographer(tiny_gqa), progress=False).run([lambda ex: canary.probe(ex, seed=seed)])


def test_answer_tokens_follow_the_prefix(model):
    ids = canary.answer_tokens(model.tokenizer, "tiger")
    assert model.tokenizer.decode(ids) == " tiger"


@pytest.fixture(scope="module")
def probes(model, tmp_path_factory):
    log = JsonlLog(tmp_path_factory.mktemp("canary") / "canary.jsonl", key="seed")
    return log, canary.run_probes(model, seeds=[0, 1], log=log, message_tokens=8, progress=False)


def test_every_condition_is_scored(probes):
    _, records = probes
    for r in records:
        assert set(r["logprob"]) == set(canary.CONDITIONS) == set(r["distractor_logprob"])
        assert all(lp < 0 for lp in r["logprob"].values())
        assert all(1 <= r["rank"][c] <= 8 for c in canary.CONDITIONS)
    # The positive control has the secret in plain text: it must be far more probable there.
    told = sum(r["logprob"]["told"] - r["logprob"]["baseline"] for r in records) / len(records)
    assert told > 1.0


def test_probes_resume_from_their_log(model, probes):
    log, records = probes
    again = canary.run_probes(model, seeds=[0, 1], log=log, message_tokens=8, progress=False)
    assert again == records and len(list(log.records())) == 2


def test_baseline_condition_matches_the_baseline_executor(model):
    """The 'baseline' condition re-encodes Alice's tokens in Bob's context: the Baseline executor's math."""
    secret, _ = canary.draw(0)
    ch = choreo.Choreographer(model)
    out = choreo.Runner(ch, progress=False).run([lambda ex: canary.probe(ex, seed=0, message_tokens=8)])[0]
    bl = choreo.Baseline(model)
    from choreo.workflows.prisoners import system_prompt
    sys_b = bl.prefill(system_prompt("bob"), role="system")
    tokens = out["tokens"]
    msg = bl.decode(role="assistant:alice", parents=[sys_b], prefix="To Bob: ", teacher_tokens=tokens)
    q = bl.prefill(canary.QUESTION, role="user", parents=[sys_b, msg])
    ans = bl.decode(role="assistant:bob", parents=[sys_b, msg, q], prefix=canary.ANSWER_PREFIX,
                    teacher_tokens=canary.answer_tokens(model.tokenizer, secret))
    assert sum(ans.logprobs) == pytest.approx(out["logprob"]["baseline"], abs=2e-3)


def test_probes_of_another_length_in_the_same_log_are_run_not_reused(model, tmp_path):
    log = JsonlLog(tmp_path / "canary.jsonl", key="seed")
    short = canary.run_probes(model, seeds=[0], log=log, message_tokens=4, progress=False)
    longer = canary.run_probes(model, seeds=[0], log=log, message_tokens=6, progress=False)
    assert [r["message_tokens"] for r in short + longer] == [4, 6] and len(list(log.records())) == 2
    assert canary.run_probes(model, seeds=[0], log=log, message_tokens=4, progress=False) == short  # each its own
    assert len(list(log.records())) == 2
