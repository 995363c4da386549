"""The kernel benchmark report: pytest-benchmark JSON in, table, plot and provenance out."""

from __future__ import annotations

import json

import pytest

from triton_kernels import bench_report


def _record(name, group, **extra):
    base = dict(device="NVIDIA H200", torch="2.11.0", triton="3.6.0", cuda="13.0")
    return {"name": name, "group": group, "extra_info": base | extra}


def _bench():
    speed = lambda impl, s, tf: _record(f"test_segment_attention_speed[w-{impl}]", "w", impl=impl,  # noqa: E731
                                        seconds_per_call=s, tflops=tf, peak_extra_mem_mib=1.0, mask_density=0.5,
                                        attended_pairs=100)
    tile = lambda s, m, k, default=False: _record(  # noqa: E731
        "test_segment_attention_tiles[w-x]", "w tiles", seconds_per_call=s, tflops=1 / s, num_splits=k,
        is_default=default, config=dict(block_m=m, block_n=64, num_warps=4, num_stages=3, flat=True))
    train = lambda impl, s: _record(f"test_segment_attention_training_speed[w-{impl}]", "w training",  # noqa: E731
                                    impl=impl, seconds_per_call=s, tflops=1 / s, peak_extra_mem_mib=s * 1e4,
                                    attended_pairs=100)
    bwd = lambda label, s: _record("test_segment_attention_backward_tiles[w-x]", "w backward tiles",  # noqa: E731
                                   backward_tiles=label, seconds_per_call=s, tflops=1 / s)
    step = lambda attention, s: _record(f"test_finetune_step_speed[{attention}]", "finetune step",  # noqa: E731
                                        attention=attention, seconds_per_step=s, traces=8, model="m",
                                        peak_mem_mib=100.0, first_loss=7.5)
    vs = lambda mode, which, s: _record(f"test_segment_attention_vs_base[w-{mode}-{which}]",  # noqa: E731
                                        f"w vs base {mode}", mode=mode, which=which, base_commit="134a743",
                                        seconds_per_call=s, tflops=1 / s)
    return {"datetime": "2026-11-26T05:11:17", "machine_info": {"python_version": "3.12.3"},
            "benchmarks": [vs("forward", "base", 3e-3), vs("forward", "head", 2e-3),
                           speed("triton", 2e-3, 100.0), speed("sdpa_causal", 1e-3, 200.0),
                           speed("flex", 4e-3, 50.0), tile(3e-3, 128, 1, True), tile(1.5e-3, 64, 2),
                           speed("triton_prerotate", 1.25e-3, 160.0),
                           train("triton", 4e-3), train("sdpa_dense", 1e-2), train("sdpa_causal", 3e-3),
                           bwd("default", 4e-3), bwd("dkdv m128 w8 s1", 5e-3),
                           step("torch", 2.0), step("triton", 1.6),
                           vs("training", "base", 5e-3), vs("training", "head", 4e-3),
                           vs("training", "base", 1e-3) | {"group": "cut vs base training"}]}


def test_summary_picks_the_fastest_sweep_config():
    summary = bench_report.summarize(_bench())
    assert summary["w"]["best"]["seconds"] == 1.5e-3
    assert summary["w"]["best"]["config"] == "m64 n64 w4 s3 flat, 2 split(s)"
    row = bench_report.table_rows(summary)[0]
    assert row[4] == "1,250 us (160): copied first"  # the other rotation: records from before prefill copied
    in_loop = bench_report.table_rows(bench_report.summarize({"benchmarks": [
        b if "prerotate" not in b["name"] else b | {"extra_info": b["extra_info"] | {"impl": "triton_in_loop"}}
        for b in _bench()["benchmarks"]]}))[0]
    assert in_loop[4] == "1,250 us (160): in the loop" and in_loop[6] == row[6]  # the same column, either name
    # causal SDPA 1.0 ms / the defaults' 2.0 ms, then / the fastest: the sweep's best ran in half the defaults'
    # time in the sweep (1.5 / 3.0 ms), so 2.0 ms x 0.5 = 1.0 ms, faster than prerotate's 1.25 ms
    assert row[6] == "50% (100%)"
    assert row[-1] == "2.0x (4.0x)"  # Flex + gather 4.0 ms / 2.0 ms, then / 1.0 ms
    no_default = bench_report.summarize({"benchmarks": [
        b if "_tiles" not in b["name"] else b | {"extra_info": b["extra_info"] | {"is_default": False}}
        for b in _bench()["benchmarks"] if "prerotate" not in b["name"]]})
    assert bench_report.table_rows(no_default)[0][6] == "50%"  # a sweep without the defaults: no tuned ratio
    retimed = bench_report.summarize({"benchmarks": [
        b if "_tiles" not in b["name"] else b | {"extra_info": b["extra_info"] | {"is_default": True}}
        for b in _bench()["benchmarks"] if "prerotate" not in b["name"]]})
    assert bench_report.table_rows(retimed)[0][6] == "50%"  # the best is the defaults, timed again: no bracket
    alone = bench_report.summarize({"benchmarks": [b for b in _bench()["benchmarks"] if "_tiles" not in b["name"]
                                                   and "prerotate" not in b["name"]]})
    assert bench_report.table_rows(alone)[0][6] == "50%"  # the defaults are the only configuration timed
    training = bench_report.training_rows(summary)
    assert training == [["w", "4,000 us (250)", "10,000 us (100)", "3,000 us (333)", "75%", "2.5x", "40 / 100 MiB",
                         "4,000 us (250): default"]]


def test_report_writes_table_plot_raw_json_and_provenance(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_bench()))
    md = bench_report.write_report(src, tmp_path / "out", commit="abc", command="pytest ...", extra_notes=["hello"],
                                   training_notes=["backward note"])
    text = md.read_text()
    assert "NVIDIA H200" in text and "hello" in text and "`pytest ...`" in text
    data = json.loads((tmp_path / "out" / "segment_attention.json").read_text())
    assert data["provenance"]["git_commit"] == "abc" and data["provenance"]["versions"]["triton"] == "3.6.0"
    assert (tmp_path / "out" / "segment_attention.png").stat().st_size > 0
    assert (tmp_path / "out" / "segment_attention_raw.json").read_text() == src.read_text()
    training = (tmp_path / "out" / "segment_attention_training.md").read_text()
    assert "forward + backward" in training and "NVIDIA H200" in training
    assert "backward note" in training and "hello" not in training and "backward note" not in text
    assert "torch backend 2.000 s, kernel 1.600 s (1.25x)" in training
    assert data["provenance"]["timing"].endswith("every call on one input set")
    versus = (tmp_path / "out" / "segment_attention_vs_base.md").read_text()
    assert "commit abc vs 134a743" in versus and "`pytest ...`" in versus
    assert "commit_info" not in text  # the JSON names no commit of its own
    src.write_text(json.dumps(_bench() | {"commit_info": {"id": "456a5bfb62d9", "dirty": True}}))
    text = bench_report.write_report(src, tmp_path / "out", commit="abc", command="pytest ...").read_text()
    assert "commit_info names 456a5bf (dirty)" in text and "commit abc" in text
    src.write_text(json.dumps(_bench() | {"commit_info": {"id": "unversioned", "dirty": False}}))  # no .git there
    text = bench_report.write_report(src, tmp_path / "out", commit="abc", command="x").read_text()
    assert "copy of the files of commit abc without git metadata" in text and "names unversi" not in text
    src.write_text(json.dumps(_bench() | {"commit_info": {"id": "abc0123", "dirty": False}}))
    assert "commit_info" not in bench_report.write_report(src, tmp_path / "out", commit="abc", command="x").read_text()


def test_base_rows_pair_the_two_commits_and_skip_a_half_timed_workload():
    summary = bench_report.summarize(_bench())
    assert bench_report.base_rows(summary) == [
        ["w", "forward", "3,000 us (333)", "2,000 us (500)", "1.50x"],
        ["w", "forward + backward", "5,000 us (200)", "4,000 us (250)", "1.25x"]]  # "cut": base only, no row
    assert "vs_base" not in bench_report.summarize({"benchmarks": _bench()["benchmarks"][2:-3]})["w"]


def test_cli_names_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_report.main([str(tmp_path / "nope.json")])
    assert "nope.json" in capsys.readouterr().err


def test_timing_provenance_names_the_input_sets():
    bench = _bench()
    for b, n in zip(bench["benchmarks"], (2, 16)):
        b["extra_info"]["input_sets"] = n
    assert "cycle through 2-16 independent input sets" in bench_report._input_sets_note(bench)


def test_rerendering_from_the_committed_raw_copy_keeps_it(tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_bench()))
    bench_report.write_report(src, out, commit="abc", command="c")
    raw = out / "segment_attention_raw.json"
    before = raw.read_text()
    bench_report.write_report(raw, out, commit="abc", command="c")  # the raw file is its own source
    assert raw.read_text() == before


@pytest.mark.parametrize("content, word", [
    ("{not json", "cannot read it as JSON"), ("{}", "no 'benchmarks' records"),
    ('{"benchmarks": []}', "no 'benchmarks' records"), ('{"benchmarks": [{"name": "x"}]}', "extra_info"),
    ('{"benchmarks": [{"name": "x", "extra_info": {}}]}', "no 'device'"),
    (json.dumps({"benchmarks": [{"name": "test_segment_attention_speed[w]", "group": "w",
                                 "extra_info": {"device": "d", "impl": "triton"}}]}), "lacks the field"),
])
def test_cli_names_what_is_wrong_with_a_malformed_file(tmp_path, capsys, content, word):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(SystemExit):
        bench_report.main([str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "bad.json" in err and word in err
    assert not (tmp_path / "out" / "segment_attention_raw.json").exists()


def test_the_raw_copy_is_replaced_atomically(tmp_path, monkeypatch):
    """A reader of the old copy reads it whole, and a copy cut off before its rename leaves the old one as it was
    (a copy in place could leave the committed raw JSON truncated)."""
    import os
    from pathlib import Path

    out, src, newer = tmp_path / "out", tmp_path / "bench.json", tmp_path / "newer.json"
    src.write_text(json.dumps(_bench()))
    newer.write_text(json.dumps(_bench() | {"datetime": "2026-12-01T00:00:00"}))
    bench_report.write_report(src, out, commit="abc", command="c")
    raw = out / "segment_attention_raw.json"
    with open(raw) as reader:
        bench_report.write_report(newer, out, commit="abc", command="c")
        assert reader.read() == src.read_text()  # the old file, untouched: the new one was renamed over it
    assert raw.read_bytes() == newer.read_bytes()
    replace = os.replace

    def cut_at_the_raw_copy(tmp, dst):
        if Path(dst).name == raw.name:
            raise KeyboardInterrupt
        replace(tmp, dst)

    monkeypatch.setattr(os, "replace", cut_at_the_raw_copy)
    with pytest.raises(KeyboardInterrupt):
        bench_report.write_report(src, out, commit="abc", command="c")
    assert raw.read_bytes() == newer.read_bytes()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_render_without_training_or_base_records_removes_their_old_tables(tmp_path):
    """Companion tables of the same name from an earlier render would sit beside the new raw copy unmarked."""
    out, full, forward = tmp_path / "out", tmp_path / "full.json", tmp_path / "forward.json"
    full.write_text(json.dumps(_bench()))
    forward.write_text(json.dumps(_bench() | {"benchmarks": [
        b for b in _bench()["benchmarks"] if b["name"].startswith(("test_segment_attention_speed",
                                                                   "test_segment_attention_tiles"))]}))
    bench_report.write_report(full, out, commit="abc", command="c")
    companions = [out / f"segment_attention{s}{e}" for s in ("_training", "_vs_base") for e in (".md", ".json")]
    assert all(p.exists() for p in companions)
    (out / "other_training.md").write_text("another report's table")
    bench_report.write_report(forward, out, commit="def", command="c")
    assert not [p.name for p in companions if p.exists()]
    assert (out / "segment_attention.md").exists() and (out / "other_training.md").exists()
    bench_report.write_report(full, out, commit="abc", command="c")
    assert all(p.exists() for p in companions)


def test_notes_describe_only_what_the_json_timed(tmp_path):
    """No prerotate records, no one-delta workload: the notes say so instead of describing them."""
    src = tmp_path / "bench.json"
    src.write_text(json.dumps({**_bench(), "benchmarks": [b for b in _bench()["benchmarks"]
                                                           if "prerotate" not in b["name"]]}))
    bench_report.write_report(src, tmp_path / "out", commit="abc", command="c")
    text = (tmp_path / "out" / "segment_attention.md").read_text()
    assert "'other rotation of moved keys': not timed in this run" in text and "one-delta" not in text
    assert "test_segment_attention_tiles: 2 configurations per workload" in text


def test_without_commit_the_tables_name_the_recorded_commit(tmp_path):
    """Without --commit the vs-base table was titled "commit None vs 134a743" and the provenance read `None`."""
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_bench() | {"commit_info": {"id": "456a5bfb62d9", "dirty": True}}))
    text = bench_report.write_report(src, tmp_path / "out", commit=None, command=None).read_text()
    versus = (tmp_path / "out" / "segment_attention_vs_base.md").read_text()
    assert "commit 456a5bf+dirty vs 134a743" in versus and "None" not in versus.splitlines()[0]
    for table in (text, versus):
        assert "commit 456a5bf+dirty" in table and "`None`" not in table and "without --command" in table


def test_cli_refuses_a_file_as_out_before_reading_the_json(tmp_path, capsys):
    src, out = tmp_path / "bench.json", tmp_path / "taken"
    src.write_text(json.dumps(_bench()))
    out.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        bench_report.main([str(src), "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"--out {str(out)!r} is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "a file"


def test_a_run_without_forward_timings_writes_its_tables_and_no_plot(tmp_path):
    """A run of the tile sweeps and training benchmarks alone (``CHOREO_BENCH_FILTER="tiles and prefill"``) has no
    bars to draw: the tables are written, the plot is not (nor left from an earlier run)."""
    src = tmp_path / "bench.json"
    timed = [b for b in _bench()["benchmarks"] if not b["name"].startswith("test_segment_attention_speed")]
    src.write_text(json.dumps({**_bench(), "benchmarks": timed}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "segment_attention.png").write_bytes(b"an earlier run's plot")
    bench_report.write_report(src, out, commit="abc", command="c")
    assert (out / "segment_attention.md").exists() and (out / "segment_attention_training.md").exists()
    assert not (out / "segment_attention.png").exists()
