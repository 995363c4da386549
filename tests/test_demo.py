"""The demo conversation: both executors run it, and the output says why their transcripts differ."""

from __future__ import annotations

from choreo.demo import NOTE, run_demo


def test_the_demo_prints_both_transcripts_and_why_they_differ(tiny_gqa, capsys):
    run_demo(tiny_gqa, max_tokens=3)
    out = capsys.readouterr().out
    assert out.count("[alice]") == out.count("[bob]") == out.count("[carol]") == 2
    assert "=== choreographed ===" in out and "=== baseline ===" in out
    assert "tokens in the shared cache" in out and "messages kept as text, no rows between calls" in out
    assert out.rstrip().endswith(NOTE)
