"""The demo conversation: both executors run it, and the output says why their transcripts differ."""

from __future__ import annotations

from choreo.demo import NOTE, run_demo


def test_the_demo_prints_both_transcripts_and_why_they_differ(tiny_gqa, capsys):
    run_demo(tiny_gqa, max_tokens=3)
    out = capsys.readouterr().out
    assert out.count("[alice]") == out.count("[bob]") == out.count("[carol]") == 2
    assert "=== choreographed ===" in out and "=== baseline ===" in out
    assert "tokens in the shared cache" in out and "messages kept as token ids, no rows between calls" in out
    assert out.rstrip().endswith(NOTE)


def test_the_demo_runs_both_executors_on_the_attention_asked_for(tiny_gqa, capsys, monkeypatch):
    """--attention applies to the baseline too: the time-to-first-token comparison is of executors, not of kernels."""
    import choreo.demo

    seen = []
    for name in ("Choreographer", "Baseline"):
        cls = getattr(choreo.demo, name)
        monkeypatch.setattr(choreo.demo, name, lambda *a, cls=cls, **k: seen.append(cls(*a, **k)) or seen[-1])
    run_demo(tiny_gqa, max_tokens=2, attention="reference")
    assert [type(ex).__name__ for ex in seen] == ["Choreographer", "Baseline"]
    assert [ex.engine.attention for ex in seen] == ["reference", "reference"]


def test_the_demo_command_runs_on_the_device_it_names_with_its_default_backend(tiny_gqa, capsys, monkeypatch):
    """``choreo demo --device cpu`` loads the model on the CPU, where the default backend is torch."""
    import torch

    import choreo.demo
    import choreo.model
    from choreo.cli import main

    seen = []
    monkeypatch.setattr(choreo.model, "load_model", lambda source, *, device: seen.append(device) or tiny_gqa)
    cls = choreo.demo.Choreographer
    monkeypatch.setattr(choreo.demo, "Choreographer", lambda *a, **k: seen.append(cls(*a, **k)) or seen[-1])
    assert main(["demo", "--device", "cpu", "--max-tokens", "2"]) == 0
    assert seen[0] == torch.device("cpu") and seen[1].engine.attention == "torch"
    assert "=== baseline ===" in capsys.readouterr().out
