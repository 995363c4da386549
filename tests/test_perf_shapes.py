"""The performance shapes: every arm runs the same prompts and emits the same tokens (tiny random model)."""

from __future__ import annotations

import json
import math

import pytest

import choreo
from choreo import perf

LENGTHS = perf.Lengths(prompt_words=4, content_tokens=3)
SHAPES = [
    perf.make_shape("prisoners_dilemma", rounds=1),
    perf.make_shape("multiqa", k=3),
    perf.make_shape("branch_solve_merge", N=2),
    perf.make_shape("tree_of_thoughts", B=3, V=2),
    perf.make_shape("iterative_debate", rounds=2),
    perf.make_shape("parallel_debate", A=2, rounds=2),
    perf.make_shape("conversation", turns=2),
]
ARMS = perf.available_arms("cpu")


@pytest.fixture(scope="module")
def synth(tokenizer):
    return perf.Synth(tokenizer, LENGTHS)


@pytest.mark.parametrize("shape", SHAPES, ids=[s.label for s in SHAPES])
def test_every_arm_same_tokens(tiny_gqa, synth, shape):
    runs = {arm: [perf.run_once(tiny_gqa, shape, arm, synth)] for arm in ARMS}
    perf.check_identical(runs)
    first = {arm: r[0] for arm, r in runs.items()}
    generated = first["baseline"]["generated"]
    assert all(len(tokens) == LENGTHS.content_tokens for tokens in generated), generated
    # The re-encoding arms and Hugging Face encode the same serial prompts, token for token; baseline+prefix
    # encodes them past the prefix it reuses (test_prefix_reuse_is_not_charged_before_the_first_token).
    assert first["hf"]["tokens_processed"] == first["baseline"]["tokens_processed"]
    prompt_tokens = {arm: r["prompt_tokens"] for arm, r in first.items()}
    assert prompt_tokens["hf"] == prompt_tokens["baseline"] >= prompt_tokens["baseline+prefix"]
    assert [r["serial_calls"] for r in first.values()] == [arm == "hf" for arm in first]
    assert first["baseline+prefix"]["tokens_processed"] <= first["baseline"]["tokens_processed"]
    assert first["choreographed[torch]"]["tokens_processed"] <= first["baseline"]["tokens_processed"]
    assert len({r["calls"] for r in first.values()}) == 1 and len({r["stages"] for r in first.values()}) == 1


def test_generated_tokens_are_the_teacher_tokens(tiny_gqa, synth):
    shape = perf.make_shape("tree_of_thoughts", B=2, V=2)
    result = perf.run_once(tiny_gqa, shape, "choreographed[torch]", synth)
    tags = ["tot/cand0", "tot/cand1", "tot/vote0", "tot/vote1", "tot/answer"]
    assert result["generated"] == [synth.tokens(t) for t in tags]
    assert result["stages"] == 3 and result["calls"] == 5


def test_stepwise_decoding_takes_one_pass_per_token(tiny_gqa, synth):
    """Teacher tokens are fed one decode step each: prompt pass, n - 1 steps, a closing pass."""
    ex = perf.StepwiseChoreographer(tiny_gqa)
    prompt = ex.prefill("Hello there.", role="user")
    before = ex.engine.forward_passes
    msg = ex.decode(parents=[prompt], teacher_tokens=synth.tokens("x"))
    assert ex.engine.forward_passes - before == LENGTHS.content_tokens + 1
    assert msg.tokens == synth.tokens("x") and msg.ttft is not None and msg.ttft <= msg.latency
    plain = choreo.Choreographer(tiny_gqa)
    p2 = plain.prefill("Hello there.", role="user")
    assert plain.decode(parents=[p2], teacher_tokens=synth.tokens("x")).ids == msg.ids


@pytest.mark.parametrize("kind", [choreo.Choreographer, choreo.Baseline, perf.StepwiseChoreographer],
                         ids=["choreographed", "baseline", "stepwise"])
def test_ttft_ends_with_the_first_pass_and_latency_with_the_last(tiny_gqa, synth, monkeypatch, kind):
    """A call's clock starts when it is submitted (after ``decode`` is called, before its first pass) and its
    first token is read after its first pass, before its second: so the time to first token is at least the first
    pass and at most the time from the call to the second pass. Clock order only, no durations."""
    import time

    from choreo.model import Model

    ex = kind(tiny_gqa)
    prompt = ex.prefill("Hello there.", role="user")
    passes, forward = [], Model.forward

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        out = forward(self, *args, **kwargs)
        passes.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(Model, "forward", timed)
    how = dict(teacher_tokens=synth.tokens("x")) if kind is perf.StepwiseChoreographer else dict(max_tokens=6)
    t_call = time.perf_counter()
    msg = ex.decode(parents=[prompt], **how)
    t_done = time.perf_counter()
    assert len(passes) >= 2, passes
    (start0, end0), (start1, _) = passes[:2]
    assert end0 - start0 <= msg.ttft <= start1 - t_call, (msg.ttft, passes, t_call)
    assert passes[-1][1] - start0 <= msg.latency <= t_done - t_call, (msg.latency, passes, t_call, t_done)


def test_prefix_reuse_skips_tokens(tiny_gqa, synth):
    shape = perf.make_shape("iterative_debate", rounds=2)
    full = perf.run_once(tiny_gqa, shape, "baseline", synth)
    reuse = perf.run_once(tiny_gqa, shape, "baseline+prefix", synth)
    assert reuse["tokens_processed"] < full["tokens_processed"]


@pytest.mark.parametrize("shape", [perf.make_shape("iterative_debate", rounds=2),
                                   perf.make_shape("prisoners_dilemma", rounds=1)], ids=lambda s: s.label)
def test_prefix_reuse_is_not_charged_before_the_first_token(tiny_gqa, synth, shape):
    """baseline+prefix encodes prompt[reuse:] (reuse = len(job.origin[1])), and only that counts towards its
    TTFT bound: the tokens it saves are exactly the ones it reused."""
    ex = perf.make_executor(tiny_gqa, "baseline+prefix")
    full = perf.run_once(tiny_gqa, shape, "baseline", synth)
    reused0 = ex.reused_tokens
    reuse = perf.run_once(tiny_gqa, shape, "baseline+prefix", synth, ex)
    reused = ex.reused_tokens - reused0  # the sum over calls of len(job.origin[1])
    assert reused > 0
    assert reuse["prompt_tokens"] == full["prompt_tokens"] - reused
    assert full["tokens_processed"] - reuse["tokens_processed"] == reused
    again = perf.run_once(tiny_gqa, shape, "baseline+prefix", synth, ex)  # a reused executor: same counts
    assert again["stage_tokens"] == reuse["stage_tokens"]


def test_serial_hf_calls_get_no_ttft_bounds():
    """hf's TTFT includes the decodes of the calls ahead of it in its stage: no bound counts those."""
    hf = {"wall_s": 4.0, "ttft_sum_s": 3.0, "tokens_processed": 100, "prompt_tokens": 80, "forward_passes": 10,
          "stage_tokens": [[40, 40]], "serial_calls": True}
    fast = {"wall_s": 2.0, "ttft_sum_s": 1.0, "tokens_processed": 25, "prompt_tokens": 10, "forward_passes": 10,
            "stage_tokens": [[10]], "serial_calls": False}
    s = perf.speedups({"hf": [hf], "c": [fast]}, "hf", "c", cost={"fixed_s": 1.0, "per_token_s": 0.1})
    assert s["ttft"] == 3.0 and "ttft_bound" not in s and "ttft_model" not in s
    assert s["e2e_bound"] == 4.0 and "e2e_model" in s
    assert "passes" not in perf.report._x(s, "ttft") and "tokens" in perf.report._x(s, "e2e")


def test_speedups_and_bounds():
    slow = [{"wall_s": 4.0, "ttft_sum_s": 2.0, "tokens_processed": 100, "prompt_tokens": 80},
            {"wall_s": 6.0, "ttft_sum_s": 3.0, "tokens_processed": 100, "prompt_tokens": 80}]
    fast = [{"wall_s": 2.0, "ttft_sum_s": 0.5, "tokens_processed": 25, "prompt_tokens": 10},
            {"wall_s": 2.0, "ttft_sum_s": 0.5, "tokens_processed": 25, "prompt_tokens": 10}]
    s = perf.speedups({"b": slow, "c": fast}, "b", "c")
    assert s["e2e_rounds"] == [2.0, 3.0] and s["e2e"] == 2.5
    assert s["ttft"] == 5.0 and s["e2e_bound"] == 4.0 and s["ttft_bound"] == 8.0


def test_check_identical_names_the_arm():
    runs = {"a": [{"generated": [[1, 2]], "shape": "s"}], "b": [{"generated": [[1, 3]], "shape": "s"}]}
    with pytest.raises(AssertionError, match="arm 'b'"):
        perf.check_identical(runs)


def test_check_identical_compares_argmaxes_within_a_family_and_tolerates_near_ties():
    run = lambda argmax: [{"generated": [[1, 2]], "shape": "s", "argmax": [argmax], "call_prompt_tokens": [9]}]
    same, tie, other = [(5, 0.2), (7, 0.1)], [(5, 0.2), (8, 1e-5)], [(5, 0.2), (8, 0.05)]
    perf.check_identical({"choreographed[torch]": run(same), "choreographed[torch]+fused": run(tie),
                          "baseline": run(other)})  # across families argmaxes may differ; a near-tie is no error
    with pytest.raises(AssertionError, match=r"arm 'hf' computed another argmax than 'baseline'.*call 0, step 1"):
        perf.check_identical({"baseline": run(same), "hf": run(other)})
    with pytest.raises(AssertionError, match="serial prompts of other lengths"):
        perf.check_identical({"baseline": run(same), "hf": [dict(run(same)[0], call_prompt_tokens=[4])]})


class DropsParents(perf.StepwiseBaseline):
    """A broken baseline: re-encodes only the call's header, none of its parents."""

    def serial_prompt(self, call):
        prompt, start, parents = super().serial_prompt(call)
        return self.format.header(call.role, call.prefix), start, parents


class ReversesParents(perf.StepwiseBaseline):
    """A broken baseline: re-encodes the parents in reverse order (as many tokens, another computation)."""

    def serial_prompt(self, call):
        prompt, start, parents = super().serial_prompt(call)
        msgs = sorted((self.message(p) for p in call.parents), key=lambda m: m.start, reverse=True)
        ids = [t for m in msgs for t in m.ids]
        return list(self.format.prefix_ids) + ids + prompt[len(self.format.prefix_ids) + len(ids):], start, parents


@pytest.mark.parametrize("broken, match", [(DropsParents, "serial prompts of other lengths|another argmax"),
                                           (ReversesParents, "computed another argmax")],
                         ids=["drops-parents", "reverses-parents"])
def test_a_broken_arm_fails_the_identity_check(tiny_gqa, synth, broken, match):
    """The forced tokens are the same in every arm by construction; what the model computed from them is not: a
    baseline that drops its parents, or reads them in another order, is caught (by hf's prompt lengths, or by the
    argmaxes of the arms that compute the same attention)."""
    shape = perf.make_shape("tree_of_thoughts", B=2, V=2)
    good = {arm: [perf.run_once(tiny_gqa, shape, arm, synth)] for arm in ("choreographed[torch]", "baseline", "hf")}
    perf.check_identical(good)
    bad = dict(good, baseline=[perf.run_once(tiny_gqa, shape, "baseline", synth, broken(tiny_gqa))])
    assert bad["baseline"][0]["generated"] == good["baseline"][0]["generated"]  # what the old check compared
    with pytest.raises(AssertionError, match=match):
        perf.check_identical(bad)
    if broken is ReversesParents:
        assert bad["baseline"][0]["call_prompt_tokens"] == good["hf"][0]["call_prompt_tokens"]


def test_hf_book_allocates_no_kv_store(tiny_gqa):
    """The hf arm's book only keeps messages and builds prompts: a one-row store, not 1,024 rows inside the
    measured memory window."""
    session = perf.HFSession(tiny_gqa)
    assert session.book.memory()["bytes_allocated"] == tiny_gqa.spec.kv_bytes_per_token


@pytest.mark.parametrize("name, size, match", [
    ("tree_of_thoughts", {"B": 17, "V": 4}, "B=17 must be an integer in 1..16"),
    ("parallel_debate", {"A": 1}, "A=1 must be an integer in 2..8"),
    ("chess", {}, "unknown shape 'chess'"),
])
def test_shape_errors(name, size, match):
    with pytest.raises(ValueError, match=match):
        perf.make_shape(name, **size)


def test_unknown_arm_and_lengths(tiny_gqa):
    with pytest.raises(ValueError, match="unknown arm 'vllm'"):
        perf.make_executor(tiny_gqa, "vllm")
    with pytest.raises(ValueError, match="content_tokens must be an integer >= 1"):
        perf.Lengths(content_tokens=0)
    assert perf.available_arms("cpu") == ["choreographed[torch]", "choreographed[torch]+fused", "baseline",
                                          "baseline+prefix", "hf"]
    with pytest.raises(ValueError, match="BenchConfig.rounds must be an integer >= 1, got 0"):
        perf.BenchConfig(lengths=perf.Lengths(), rounds=0)


def test_fused_prefills_fold_prompts_into_the_first_reading_pass(tiny_gqa, synth):
    """Same tokens; fewer passes; the prompts count towards the tokens before the first token."""
    shape = perf.make_shape("tree_of_thoughts", B=3, V=2)
    plain = perf.run_once(tiny_gqa, shape, "choreographed[torch]", synth)
    fused = perf.run_once(tiny_gqa, shape, "choreographed[torch]+fused", synth)
    assert fused["generated"] == plain["generated"]
    assert fused["tokens_processed"] == plain["tokens_processed"]
    prompts = 6  # system, propose, vote, vote instruction, question, finish: one pass each when not fused
    assert fused["forward_passes"] == plain["forward_passes"] - prompts
    assert fused["prompt_tokens"] > plain["prompt_tokens"]
    assert [len(s) for s in plain["stage_tokens"]] == [1, 1, 1]  # one batched pass per stage


def test_hf_arm_counts_passes_and_per_call_first_tokens(tiny_gqa, synth):
    shape = perf.make_shape("tree_of_thoughts", B=3, V=2)
    hf = perf.run_once(tiny_gqa, shape, "hf", synth)
    base = perf.run_once(tiny_gqa, shape, "baseline", synth)
    assert [len(s) for s in hf["stage_tokens"]] == [3, 2, 1]  # calls run one after another
    assert sum(map(sum, hf["stage_tokens"])) == hf["prompt_tokens"] == base["prompt_tokens"]
    assert hf["forward_passes"] == hf["calls"] * (LENGTHS.content_tokens + 1)


def test_fit_affine_and_model_bounds():
    assert perf.fit_affine([1, 2, 3], [3.0, 5.0, 7.0]) == pytest.approx((1.0, 2.0))
    with pytest.raises(ValueError, match="two distinct x values"):
        perf.fit_affine([4, 4], [1.0, 2.0])
    cost = {"fixed_s": 1.0, "per_token_s": 0.1}
    slow = {"wall_s": 3.0, "ttft_sum_s": 2.0, "tokens_processed": 100, "prompt_tokens": 40, "forward_passes": 10,
            "stage_tokens": [[20], [20]]}
    fast = {"wall_s": 1.0, "ttft_sum_s": 1.0, "tokens_processed": 20, "prompt_tokens": 4, "forward_passes": 10,
            "stage_tokens": [[2], [2]]}
    assert perf.model_seconds(slow, cost) == pytest.approx({"ttft": 6.0, "e2e": 20.0})
    s = perf.speedups({"b": [slow], "c": [fast]}, "b", "c", cost=cost)
    assert s["ttft_bound"] == 10.0 and s["ttft_model"] == pytest.approx(6.0 / 2.4)
    assert s["e2e_bound"] == 5.0 and s["e2e_model"] == pytest.approx(20.0 / 12.0)


def test_table_row_shows_bounds_and_fused(tiny_gqa, synth):
    shape = perf.make_shape("multiqa", k=2)
    runs = perf.compare(tiny_gqa, shape, arms=["choreographed[torch]", "choreographed[torch]+fused", "baseline"],
                        lengths=LENGTHS, rounds=1, warmup=0)
    figure = perf.summarize(runs, "choreographed[torch]", cost={"fixed_s": 0.01, "per_token_s": 0.001})
    assert set(figure["speedups"]) == {"choreographed[torch]+fused", "baseline"} and "fused" in figure
    row = perf.table_rows({shape.label: figure}, {})[0]
    assert row[0] == "multiqa k=2" and "tokens" in row[1] and "passes" in row[3]
    assert "passes" in row[2] and "passes" in row[4]  # fused: end to end, and TTFT beside the unfused TTFT
    assert row[4].startswith(f"{figure['fused']['ttft']:.2f}x")


@pytest.mark.parametrize("folder, name", [("performance", "speedups"), ("performance", "speedups_suite"),
                                          ("performance_gpu", "speedups")])
def test_the_committed_speedups_table_rerenders_from_its_json(tmp_path, folder, name):
    """results/performance/speedups.md is what this code renders from speedups.json (data, provenance kept)."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "results" / folder
    stored = json.loads((folder / f"{name}.json").read_text())
    (tmp_path / f"{name}.json").write_text(json.dumps(stored))
    text = perf.rerender(tmp_path, name).read_text()
    assert text == (folder / f"{name}.md").read_text()
    assert "TTFT vs baseline, prefills fused (the same work in the window)" in text
    assert json.loads((tmp_path / f"{name}.json").read_text())["provenance"] == stored["provenance"]


def test_the_hf_note_does_not_deny_the_ttft_bounds_a_table_stores():
    """The GPU table was written before the hf arm's TTFT bounds were left out: its JSON holds them, so its note
    says they are not shown, not that there are none."""
    from pathlib import Path

    from choreo.perf.report import render_notes

    stored = json.loads((Path(__file__).resolve().parents[1] / "results" / "performance_gpu" / "speedups.json")
                        .read_text())
    notes = " ".join(render_notes(stored["data"], stored["provenance"]))
    assert "so the hf arm has no TTFT bounds" not in notes and "do not bound it and are not shown" in notes
    for figure in stored["data"]["figures"].values():
        for key in ("ttft_bound", "ttft_model"):
            figure["speedups"]["hf"].pop(key, None)
    assert "so the hf arm has no TTFT bounds" in " ".join(render_notes(stored["data"], stored["provenance"]))


def test_baseline_add_generated_is_a_parent_like_any_other(tiny_gqa):
    """The public route the hf arm takes: a message generated elsewhere joins the baseline's book."""
    bl = choreo.Baseline(tiny_gqa)
    q = bl.prefill("Hello there.", role="user")
    call = choreo.Call(role="assistant", parents=[q], max_tokens=3)
    prompt, start, parents = bl.serial_prompt(call)
    assert parents == (q.id,) and start == q.start + q.length and prompt[: q.length] == q.ids
    msg = bl.add_generated(call, [5, 6, 7])
    assert msg.tokens == [5, 6, 7] and bl.message(msg.id) is msg
    follow = bl.serial_prompt(choreo.Call(role="user", parents=[q, msg]))[0]
    assert follow[: len(prompt) - len(bl.format.header("assistant", ""))] == q.ids
    assert msg.ids == follow[q.length: q.length + msg.length]


def test_bench_command_line_reproduces_the_options():
    """The provenance of a bench table names the command that reproduces it, not a script path."""
    import argparse

    from choreo.perf.cli import _command, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--profile", "smoke", "--results-dir", "out dir", "--random-weights"])
    assert _command(args) == "choreo bench --profile smoke --results-dir 'out dir' --random-weights"
    assert _command(parser.parse_args(["bench", "--passes-only"])) == "choreo bench --profile small --passes-only"
    # --memory-only takes the profile recorded with the timings: the command that reproduces it names none
    args = parser.parse_args(["bench", "--results-dir", "out dir", "--memory-only"])
    assert _command(args) == "choreo bench --results-dir 'out dir' --memory-only"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--profile", "huge"])


def test_memory_window_holds_the_executor_and_its_store(tiny_gqa, monkeypatch):
    """The executor (whose KV store is allocated when it is made) is created after the peak RSS is reset and the
    RSS before the run is read: its store is part of the run's growth, as the table says."""
    from choreo.perf import memory

    events = []
    monkeypatch.setattr(memory, "trim_heap", lambda: events.append("trim") or True)
    monkeypatch.setattr(memory, "reset_peak_rss", lambda: events.append("reset") or True)
    make = memory.make_executor
    monkeypatch.setattr(memory, "make_executor", lambda *a: events.append("executor") or make(*a))
    shape = perf.make_shape("multiqa", k=2)
    result = memory.measure_memory_here(tiny_gqa, shape, "choreographed[torch]", LENGTHS)
    # Trimmed first: freed pages still resident would otherwise serve the executor without growing the RSS.
    assert events == ["trim", "reset", "executor"] and result["heap_trimmed"]
    assert result["kv_peak_bytes"] > 0 and result["rss_peak"] > 0 and result["rss_delta"] >= 0


def test_trim_heap_returns_freed_pages_where_glibc_allows():
    import platform

    trimmed = perf.trim_heap()
    assert isinstance(trimmed, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert trimmed


def _tiny_profile(**kwargs) -> perf.BenchConfig:
    return perf.BenchConfig(lengths=LENGTHS, shapes=(perf.make_shape("multiqa", k=2),), rounds=1, warmup=2,
                            scaling={"k": [perf.make_shape("multiqa", k=k) for k in (2, 3)]}, scaling_rounds=1,
                            pass_sizes=(), **kwargs)


def test_scaling_points_warm_up_as_the_table_and_say_so(tiny_gqa, tmp_path, monkeypatch):
    from choreo.perf import cli

    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", _tiny_profile(memory_arms=()))
    warmups = []
    measure = cli.measure_shape
    monkeypatch.setattr(cli, "measure_shape", lambda *a, **k: warmups.append(k["warmup"]) or measure(*a, **k))
    cli.bench(tiny_gqa, profile="tiny", results_dir=tmp_path, log=lambda _: None, progress=False, rss=False)
    assert warmups == [2, 2, 2]  # the table's shape, then both scaling points
    stored = json.loads((tmp_path / "performance" / "speedups.json").read_text())
    sizes = stored["provenance"]["sample_sizes"]
    assert (sizes["warmup"], sizes["scaling_rounds"], sizes["scaling_warmup"]) == (2, 1, 2)
    text = (tmp_path / "performance" / "speedups.md").read_text()
    assert ("Scaling plots: the choreographed arm (prompts prefilled apart) vs baseline only, 1 timed round(s) "
            "after 2 warm-up round(s)") in text
    assert "hf arm has no TTFT bounds" in text


def test_memory_only_keeps_the_timings_commit(tiny_gqa, tmp_path, monkeypatch):
    """--memory-only rewrites the table with new memory; the timings keep their command, date, load and commit."""
    from choreo.perf import cli

    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", _tiny_profile())
    cli.bench(tiny_gqa, profile="tiny", results_dir=tmp_path, log=lambda _: None, progress=False, rss=False,
              command="choreo bench --profile tiny")
    path = tmp_path / "performance" / "speedups.json"
    stored = json.loads(path.read_text())
    stored["provenance"]["git_commit"] = "0123abc"
    del stored["provenance"]["sample_sizes"]["scaling_warmup"]  # as written before scaling points warmed up
    path.write_text(json.dumps(stored))
    fake = {"rss_peak": 2**30, "rss_delta": 2**20, "kv_peak_bytes": 1, "cuda_peak_bytes": None}
    monkeypatch.setattr(cli, "measure_memory", lambda shape, arm, lengths, model_path=None: dict(fake, arm=arm))
    monkeypatch.setattr(cli, "check_memory_model", lambda *args, **kwargs: None)  # no subprocess loads anything
    for _ in range(2):  # the second re-measurement carries timings_git_commit from the first
        cli.remeasure_memory(tmp_path / "performance", tiny_gqa, command="choreo bench --memory-only")
        prov = json.loads(path.read_text())["provenance"]
        assert prov["timings_git_commit"] == "0123abc" and prov["timings_command"] == "choreo bench --profile tiny"
        assert prov["sample_sizes"]["scaling_warmup"] == 0
    assert "Timings measured at commit 0123abc" in (tmp_path / "performance" / "speedups.md").read_text()


def _timed_then_remeasured(tiny_gqa, tmp_path, monkeypatch, edit):
    """A tiny table timed by ``bench``, edited by ``edit(stored)``, then ``remeasure_memory`` on it."""
    from choreo.perf import cli

    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", _tiny_profile())
    cli.bench(tiny_gqa, profile="tiny", results_dir=tmp_path, log=lambda _: None, progress=False, rss=False)
    path = tmp_path / "performance" / "speedups.json"
    stored = json.loads(path.read_text())
    edit(stored)
    path.write_text(json.dumps(stored))
    fake = {"rss_peak": 2**30, "rss_delta": 2**20, "kv_peak_bytes": 1, "cuda_peak_bytes": None}
    monkeypatch.setattr(cli, "measure_memory", lambda shape, arm, lengths, model_path=None: dict(fake, arm=arm))
    monkeypatch.setattr(cli, "check_memory_model", lambda *args, **kwargs: None)  # no subprocess loads anything
    before = path.read_bytes()
    try:
        cli.remeasure_memory(tmp_path / "performance", tiny_gqa)
    except ValueError:
        assert path.read_bytes() == before  # nothing rewritten
        raise
    return json.loads(path.read_text())


def test_memory_only_keeps_the_timing_machine_in_the_provenance(tiny_gqa, tmp_path, monkeypatch):
    def timed_elsewhere(stored):
        stored["provenance"].update(device="Some CPU (16 threads)", cpu_count=16, threads=16,
                                    environment={"CHOREO_X": "1"})

    stored = _timed_then_remeasured(tiny_gqa, tmp_path, monkeypatch, timed_elsewhere)
    prov = stored["provenance"]
    assert (prov["timings_device"], prov["timings_cpu_count"], prov["timings_threads"]) == ("Some CPU (16 threads)",
                                                                                           16, 16)
    assert prov["timings_environment"] == {"CHOREO_X": "1"}
    text = (tmp_path / "performance" / "speedups.md").read_text()
    assert "on 16 cores at the end of the timed run" in text and "16 torch threads in the timing process" in text


def test_memory_only_keeps_the_timings_versions_protocols_and_scaling_rounds(tiny_gqa, tmp_path, monkeypatch):
    """The speed-ups ran under the timing run's libraries and protocols: they stay beside them (timings_*), the
    notes describe the protocol the timings used, and the scaling rounds are the ones stored."""
    def timed_elsewhere(stored):
        stored["provenance"].update(versions={"torch": "9.9.9-TIMED"}, protocol="OLD PROTOCOL",
                                    hf_protocol="OLD HF PROTOCOL", git_commit="0123abc")

    prov = _timed_then_remeasured(tiny_gqa, tmp_path, monkeypatch, timed_elsewhere)["provenance"]
    assert prov["timings_versions"] == {"torch": "9.9.9-TIMED"} and prov["versions"]["torch"] != "9.9.9-TIMED"
    assert (prov["timings_protocol"], prov["timings_hf_protocol"]) == ("OLD PROTOCOL", "OLD HF PROTOCOL")
    assert prov["sample_sizes"]["scaling_rounds"] == 1
    text = (tmp_path / "performance" / "speedups.md").read_text()
    assert "Protocol: OLD PROTOCOL;" in text and "hf arm: OLD HF PROTOCOL." in text
    assert "Timings measured at commit 0123abc with {'torch': '9.9.9-TIMED'};" in text


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["data"].update(device_type="cuda"), "was timed on .*peak memory is measured on CPU"),
    (lambda s: s["provenance"]["model"].update(sha256="f" * 64), "timed model .* not .*: pass the model it timed"),
    (lambda s: s["provenance"]["sample_sizes"].update(rounds=99), r"other sizes than profile 'tiny' has now \(rounds "
                                                                   r"99 then, \d+ now\)"),
    (lambda s: s["provenance"]["sample_sizes"].update(scaling_rounds=7), r"\(scaling_rounds 7 then, 1 now\)"),
], ids=["gpu-timings", "other-model", "other-sizes", "other-scaling-rounds"])
def test_memory_only_refuses_timings_its_memory_cannot_join(tiny_gqa, tmp_path, monkeypatch, edit, message):
    with pytest.raises(ValueError, match=message):
        _timed_then_remeasured(tiny_gqa, tmp_path, monkeypatch, edit)


def test_pass_costs_time_one_token_decode_steps(tiny_gqa, monkeypatch):
    """A decode step is timed as the difference between two teacher-forced decodes, STEPS passes apart, so the
    header and closing passes (several tokens per call) are not charged to it."""
    from choreo.perf import measure

    passes = []
    decode = choreo.Choreographer.decode

    def counting(self, calls, *a, **k):
        before = self.engine.forward_passes
        out = decode(self, calls, *a, **k)
        passes.append((len(calls[0].teacher_tokens), self.engine.forward_passes - before))
        return out

    monkeypatch.setattr(choreo.Choreographer, "decode", counting)
    costs = measure.pass_costs(tiny_gqa, sizes=(1, 8), batches=(1, 3), repeats=1)
    # A difference of two timings: its sign is the machine's noise on a tiny model (timings are benchmarks' to judge)
    assert set(costs["decode_step_s"]) == {1, 3} and all(math.isfinite(t) for t in costs["decode_step_s"].values())
    by_len = dict(passes)
    assert by_len[1 + measure.STEPS] - by_len[1] == measure.STEPS
    assert "teacher-forced" in costs["decode_step_method"]


def test_pass_cost_table_gives_how_far_the_affine_line_is_off(tiny_gqa, tmp_path):
    """The fixed cost's cause is named for the device it ran on; every row says how far the affine summary line is
    off the measured pass, and the notes give the largest residual over the measured range and over S <= 32."""
    from choreo.perf.report import write_pass_costs

    costs = {"fixed_s": 0.0312, "per_token_s": -1e-5, "prefill_s": {13: 0.0436, 37: 0.0257, 517: 0.0268},
             "decode_step_s": {1: 0.03}, "attention": "torch", "repeats": 3}
    text = write_pass_costs(tmp_path, tiny_gqa, costs, command="test").read_text()
    assert "on CPU, mostly streaming the weights" in text
    assert "off the measured passes by up to 29% (S=13: 43.6 ms measured, 31.1 ms on the line)" in text
    assert "over S <= 32, where choreographed TTFT passes lie, by up to 29%" in text
    assert "pass, S=37 tokens" in text and "+20%" in text  # 30.8 ms on the line / 25.7 ms measured
    assert "interpolated piecewise linearly" in text and "not that floor" in text
    # The largest residual by the same measure as the rows (line / measured - 1): S=1 (+18%), not S=8 (-13%),
    # which measured / line - 1 would rank first (+15% against -15%).
    costs = {"fixed_s": 0.0390, "per_token_s": 0.00089, "prefill_s": {1: 0.0339, 8: 0.0533, 512: 0.4972},
             "decode_step_s": {}, "attention": "torch", "repeats": 3}
    text = write_pass_costs(tmp_path, tiny_gqa, costs, command="test").read_text()
    assert "off the measured passes by up to 18% (S=1: 33.9 ms measured, 39.9 ms on the line)" in text


def test_the_pass_cost_table_records_the_conditions_its_notes_give(tiny_gqa, tmp_path, monkeypatch):
    """Load, cores and torch threads go into pass_cost.json's provenance and the note is rendered from there (not
    from the machine at rendering); a provenance without them says they are not recorded."""
    from choreo.perf import report

    monkeypatch.setattr(report.os, "getloadavg", lambda: (7.25, 1.0, 1.0))
    costs = {"fixed_s": 0.03, "per_token_s": 1e-4, "prefill_s": {1: 0.03, 8: 0.031}, "decode_step_s": {1: 0.03},
             "attention": "torch", "repeats": 3, "threads": 2}
    text = report.write_pass_costs(tmp_path, tiny_gqa, costs, command="test").read_text()
    prov = json.loads((tmp_path / "pass_cost.json").read_text())["provenance"]
    assert prov["load_average"][0] == 7.25 and prov["cpu_count"] >= 1 and prov["threads"] >= 1
    assert f"1-min load average 7.2 on {prov['cpu_count']} cores, 2 torch threads." in text
    assert report._pass_conditions({}, {}) == "load average not recorded, torch threads not recorded."


def test_pass_time_interpolates_the_measured_passes():
    """Piecewise linear between measured sizes, held below the smallest, extended along the last segment; the
    affine line only where no passes were measured (and JSON's string keys read as sizes)."""
    cost = {"prefill_s": {"1": 0.040, "4": 0.046, "32": 0.074}, "fixed_s": 1.0, "per_token_s": 1.0}
    assert perf.pass_time(cost, 1) == pytest.approx(0.040) and perf.pass_time(cost, 2) == pytest.approx(0.042)
    assert perf.pass_time(cost, 18) == pytest.approx(0.060) and perf.pass_time(cost, 60) == pytest.approx(0.102)
    assert perf.pass_time({"fixed_s": 1.0, "per_token_s": 0.5}, 4) == 3.0
    run = {"stage_tokens": [[4], [32]], "pass_tokens": {"1": 3, "32": 1}, "forward_passes": 4,
           "tokens_processed": 35}
    assert perf.model_seconds(run, cost) == pytest.approx({"ttft": 0.120, "e2e": 3 * 0.040 + 0.074})


def test_pass_costs_time_exact_sizes_without_tokenising(tiny_gqa, monkeypatch):
    """Each timed pass is one engine step over exactly S token ids (no chat header, no tokenising inside)."""
    from choreo.perf import measure

    seen = []
    step = measure.StepwiseChoreographer(tiny_gqa).engine.__class__.step

    def counting(self, jobs):
        seen.append(sum(len(j.pending) for j in jobs))
        return step(self, jobs)

    monkeypatch.setattr(measure.StepwiseChoreographer(tiny_gqa).engine.__class__, "step", counting)
    costs = measure.pass_costs(tiny_gqa, sizes=(1, 2, 4), batches=(1,), repeats=1)
    assert list(costs["prefill_s"]) == [1, 2, 4] and seen[:6] == [1, 1, 2, 2, 4, 4]  # a warm-up, then one timed
    assert costs["fit_max_residual"]["S"] in (1, 2, 4) and "no tokenising" in costs["pass_method"]


def test_an_interrupted_bench_leaves_the_pass_cost_table_as_it_was(tiny_gqa, tmp_path, monkeypatch):
    """The pass cost is written with the table that uses it, at the end: Ctrl-C during the shapes changes neither
    (a new pass_cost.md beside an old speedups.md would contradict that table's 'measured in the same run')."""
    from choreo.perf import cli as perf_cli

    monkeypatch.setattr(perf_cli, "pass_costs", lambda model, sizes: {"fixed_s": 0.03, "per_token_s": 1e-3})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(perf_cli, "measure_shape", interrupted)
    with pytest.raises(KeyboardInterrupt):
        perf_cli.bench(tiny_gqa, profile="small", results_dir=tmp_path, progress=False, rss=False, log=lambda s: None)
    assert not (tmp_path / "performance").exists()


def test_a_bench_interrupted_while_writing_its_table_keeps_the_old_pass_costs(tiny_gqa, tmp_path, monkeypatch):
    """speedups.json (which holds the cost its bounds used) is written first, pass_cost.json last: an interrupted
    write never leaves new costs beside a table whose bounds used the old ones."""
    import dataclasses

    from choreo.perf import cli

    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", dataclasses.replace(_tiny_profile(memory_arms=()),
                                                                         pass_sizes=(1, 2)))
    monkeypatch.setattr(cli, "pass_costs", lambda model, sizes: {
        "fixed_s": 0.09, "per_token_s": 1e-3, "prefill_s": {1: 0.09, 2: 0.09}, "decode_step_s": {},
        "attention": "torch", "repeats": 1})
    monkeypatch.setattr(cli, "measure_shape", lambda *args, **kwargs: {"speedups": {"baseline": {"e2e": 1.0}}})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "write_results", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.bench(tiny_gqa, profile="tiny", results_dir=tmp_path, progress=False, rss=False, log=lambda s: None)
    assert not (tmp_path / "performance" / "pass_cost.json").exists()


def test_no_triton_arm_for_heads_the_kernel_cannot_run(tmp_path, monkeypatch):
    """A head dim of 96 (not a power of two): the engine falls back to torch attention on CUDA, and so do the
    arms bench times and measures the memory of; a head dim the kernel runs keeps triton."""
    import types

    import torch

    from choreo.perf import cli

    assert perf.fast_arm("cuda", head_dim=96, dtype=torch.float32) == "choreographed[torch]"
    assert perf.available_arms("cuda", head_dim=96, dtype=torch.float32) == [
        "choreographed[torch]", "choreographed[torch]+fused", "baseline", "baseline+prefix", "hf"]
    assert perf.available_arms("cuda", head_dim=64, dtype=torch.bfloat16)[:3] == [
        "choreographed[torch]", "choreographed[triton]", "choreographed[triton]+fused"]
    assert perf.memory_arms(perf.BENCH_PROFILES["small"], "cuda", head_dim=96, dtype=torch.float32) == [
        "choreographed[torch]", "baseline"]
    spec = types.SimpleNamespace(device=torch.device("cuda"), head_dim=96, dtype=torch.float32)
    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", _tiny_profile(memory_arms=()))
    asked = []

    def measured(model, shape, arms, **kwargs):
        asked.append(list(arms))
        raise KeyboardInterrupt  # what bench asks for is all this checks

    monkeypatch.setattr(cli, "measure_shape", measured)
    with pytest.raises(KeyboardInterrupt):
        cli.bench(types.SimpleNamespace(spec=spec), profile="tiny", results_dir=tmp_path, progress=False,
                  log=lambda s: None)
    assert asked == [perf.available_arms("cuda", head_dim=96, dtype=torch.float32)]


def test_bench_refuses_memory_subprocesses_that_load_another_model(tiny_gqa, tmp_path, monkeypatch):
    """The subprocesses load ``model_path`` (None: the embedded model); their peak RSS beside another model's
    timings would describe a run that never was. Refused before anything is measured."""
    import types

    import torch

    from choreo.model import embedded_checkpoint
    from choreo.perf import cli
    from choreo.perf.memory import check_memory_model

    monkeypatch.setitem(perf.BENCH_PROFILES, "tiny", _tiny_profile())
    monkeypatch.setattr(cli, "measure_shape", lambda *args, **kwargs: pytest.fail("measured before the check"))
    with pytest.raises(ValueError, match=r"^bench: the memory subprocesses load the embedded model \(sha256 \w+, "
                                         r"torch.float32\), not the timed model 'llama' \(sha256 None, "
                                         r"torch.float64\); .*, or rss=False$"):
        cli.bench(tiny_gqa, profile="tiny", results_dir=tmp_path, progress=False, log=lambda s: None)
    sha = json.loads((embedded_checkpoint() / "choreo.json").read_text())["gguf_sha256"]
    embedded = types.SimpleNamespace(spec=types.SimpleNamespace(name="SmolLM2", sha256=sha, dtype=torch.float32))
    check_memory_model(embedded, None, where="bench")  # the same model: no error
    embedded.spec.dtype = torch.bfloat16
    with pytest.raises(ValueError, match="torch.bfloat16"):
        check_memory_model(embedded, None, where="bench")


@pytest.mark.parametrize("kwargs, message", [
    ({"rounds": 2, "warmup": -1}, "warmup must be an integer >= 0, got -1"),
    ({"rounds": -3}, "rounds must be an integer >= 1, got -3"),
    ({"rounds": 0, "warmup": 1}, "rounds must be an integer >= 1, got 0"),
], ids=["negative-warmup", "negative-rounds", "no-rounds"])
def test_compare_names_a_bad_round_count(tiny_gqa, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perf.compare(tiny_gqa, perf.make_shape("multiqa", k=2), arms=["baseline"], lengths=LENGTHS, **kwargs)


def test_pass_costs_and_device_name_their_bad_values(tiny_gqa):
    from choreo.perf.cli import check_device

    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got 0"):
        perf.pass_costs(tiny_gqa, sizes=(1, 2), batches=(1,), repeats=0)
    with pytest.raises(ValueError, match="sizes .* must each name at least one size"):
        perf.pass_costs(tiny_gqa, sizes=(), batches=(1,))
    with pytest.raises(ValueError, match="repeats must be an integer >= 1, got -1"):
        perf.time_pass(perf.StepwiseChoreographer(tiny_gqa), [1, 2], repeats=-1)
    for text in ("", "  "):
        with pytest.raises(ValueError, match=f"--device {text!r} is not a device name"):
            check_device(text)


# ------------------------------------------------- the debate shapes are the MATH debates' call graphs (debate.py)
class RecordingExecutor:
    """The executor verbs, running nothing: records every prefill and decode stage with parents by creation index."""

    def __init__(self):
        self.events, self._index = [], {}

    def _new(self):
        import types

        msg = types.SimpleNamespace(id=len(self._index), text="x", length=1, start=0, ttft=0.0, latency=0.0,
                                    tokens=[1])
        self._index[msg.id] = msg.id
        return msg

    async def prefill(self, text, *, role, parents=(), offsets=None, new_offset=None):
        assert offsets is None and new_offset is None  # the choreographed layout: parents where they are
        msg = self._new()
        self.events.append(("prefill", role, tuple(p.id for p in parents)))
        return msg

    async def decode(self, calls=None, /, **fields):
        single = calls is None
        calls = [choreo.Call(**fields)] if single else list(calls)
        assert all(c.offsets is None for c in calls)
        out = [self._new() for _ in calls]
        self.events.append(("decode", tuple((c.role, c.prefix, tuple(p.id for p in c.parents)) for c in calls)))
        return out[0] if single else out


def _drive(coro):
    """Run a coroutine whose awaits never suspend (the recording executor's verbs)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("a recording executor's verb suspended")


@pytest.mark.parametrize("name, size, rounds, agents", [
    ("iterative_debate", {"rounds": 1}, 1, 2), ("iterative_debate", {"rounds": 3}, 3, 2),
    ("parallel_debate", {"A": 2, "rounds": 1}, 1, 2), ("parallel_debate", {"A": 3, "rounds": 3}, 3, 3),
], ids=["iterative-1", "iterative-3", "parallel-A2-1", "parallel-A3-3"])
def test_debate_shapes_are_the_math_workflows_call_graphs(synth, name, size, rounds, agents):
    """Same prefills (role, parents) and decode stages (each call's role, forced prefix and parents), in the same
    order, as choreo.workflows.debate under the choreographed layout; parents are named by creation index."""
    from choreo.workflows import debate

    shape_ex, workflow_ex = RecordingExecutor(), RecordingExecutor()
    _drive(perf.make_shape(name, **size).workflow(synth)(shape_ex))
    config = debate.DebateConfig(rounds=rounds, agents=agents)
    run = debate.iterative_debate if name == "iterative_debate" else debate.parallel_debate
    _drive(run(workflow_ex, "What is 1 + 1?", layout="parallel", seed=0, config=config))
    prefills = [e for e in workflow_ex.events if e[0] == "prefill"]
    stages = [[len(call[2]) for call in e[1]] for e in workflow_ex.events if e[0] == "decode"]
    assert len([e for e in shape_ex.events if e[0] == "prefill"]) == len(prefills)
    assert [[len(call[2]) for call in e[1]] for e in shape_ex.events if e[0] == "decode"] == stages
    assert shape_ex.events == workflow_ex.events


def _workflow_events(name, size, tokenizer):
    """The recorded events of the library workflow the shape ``name`` stands for, at ``size``."""
    import types

    from choreo.chat import ChatFormat
    from choreo.data.trivia import Question
    from choreo.workflows import bsm, multiqa, tot

    ex = RecordingExecutor()
    if name == "tree_of_thoughts":
        config = tot.ToTConfig(proposals=size["B"], voters=size["V"])
        _drive(tot.tree_of_thoughts(ex, "What is 1 + 1?", layout="parallel", seed=0, config=config))
    elif name == "branch_solve_merge":
        config = bsm.BSMConfig(branch="halves")
        _drive(bsm.bsm(ex, ["dog", "ball", "park", "river"], layout="parallel", seed=0, config=config))
    else:
        ex.executor = types.SimpleNamespace(format=ChatFormat(tokenizer))  # for the turn's raw segments
        questions = [Question(id=f"q{i}", question=f"Question {i}?", aliases=("x",)) for i in range(size["k"])]
        _drive(multiqa.multiqa(ex, questions, layout="parallel"))
    return ex.events


@pytest.mark.parametrize("name, size", [
    ("tree_of_thoughts", {"B": 8, "V": 4}), ("tree_of_thoughts", {"B": 1, "V": 2}),
    ("branch_solve_merge", {"N": 2}), ("multiqa", {"k": 2}), ("multiqa", {"k": 5}),
], ids=["tot-8x4", "tot-1x2", "bsm-2", "multiqa-2", "multiqa-5"])
def test_tot_bsm_and_multiqa_shapes_are_the_workflows_call_graphs(synth, tokenizer, name, size):
    """As for the debates: the same prefills (role, parents) and decode stages (each call's role, forced prefix
    and parents) in the same order as the library's workflow under the parallel layout."""
    shape_ex = RecordingExecutor()
    _drive(perf.make_shape(name, **size).workflow(synth)(shape_ex))
    assert shape_ex.events == _workflow_events(name, size, tokenizer)


def test_a_stage_whose_first_chunks_take_several_passes_counts_each(tiny_gqa, tokenizer):
    """ToT 8x4 with prefills fused: a stage's prompts and headers differ enough in length to take two passes
    (``first_chunk_passes``); the stage's window lists both, so the pass-cost bound charges both. Against the
    same run in one pass per stage: the same tokens before each stage's first tokens, one pass more per split."""
    shape = perf.make_shape("tree_of_thoughts", B=8, V=4)
    arm = "choreographed[torch]+fused"
    synth = perf.Synth(tokenizer, perf.Lengths())  # the suites' prompt lengths: long enough to split a stage
    split = perf.run_once(tiny_gqa, shape, arm, synth)
    whole_ex = perf.make_executor(tiny_gqa, arm)
    whole_ex.engine.pass_rows = 1 << 20
    whole = perf.run_once(tiny_gqa, shape, arm, synth, executor=whole_ex)
    assert [len(s) for s in whole["stage_tokens"]] == [1] * whole["stages"]
    assert any(len(s) > 1 for s in split["stage_tokens"])
    assert [sum(s) for s in split["stage_tokens"]] == [sum(s) for s in whole["stage_tokens"]]
    extra = sum(len(s) - 1 for s in split["stage_tokens"])
    assert split["forward_passes"] - whole["forward_passes"] == extra
    cost = {"prefill_s": {1: 0.04, 512: 0.6}}
    charged = perf.model_seconds(split, cost)["ttft"] - perf.model_seconds(whole, cost)["ttft"]
    assert charged > 0.03 * extra  # about a fixed cost per extra pass, less the padding it saves


def test_the_ttft_note_says_one_pass_unless_a_fused_stage_took_more():
    """Tables timed before ``first_chunk_passes`` ran every fused stage in one pass: their notes must say so."""
    from choreo.perf.report import _ttft_note

    def data(stages):
        return {"figures": {"s": {"runs": {"choreographed[torch]+fused": [{"stage_tokens": stages}],
                                           "baseline": [{"stage_tokens": [[9, 9]]}]}}}}

    assert "fused, one pass over the prompt messages" in _ttft_note(data([[133], [72]]))
    split = _ttft_note(data([[85, 48], [72]]))
    assert "fused, one pass, or a few where their lengths differ much" in split and "charges each" in split
