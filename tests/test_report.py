"""Report helpers: where grouped bars go, and that the figure is written."""

from __future__ import annotations

import pytest

from choreo.report import bar_layout, plot_rates


def test_bar_layout_centres_each_group_on_its_own_arms():
    same = {"ToT": {"Baseline": 0, "Before": 0, "After": 0}, "MAD": {"Baseline": 0, "Before": 0, "After": 0}}
    arms, width, x = bar_layout(same)
    assert arms == ["Baseline", "Before", "After"] and width == pytest.approx(0.8 / 3)
    assert [x["ToT", a] for a in arms] == pytest.approx([-width, 0, width])
    assert [x["MAD", a] for a in arms] == pytest.approx([1 - width, 1, 1 + width])

    mixed = {"Direct": {"direct": 0, "+ ToT ft": 0}, "ToT": {"Baseline": 0, "Before": 0, "After": 0},
             "MADpar": {"Before": 0}}
    arms, width, x = bar_layout(mixed)
    assert arms == ["direct", "+ ToT ft", "Baseline", "Before", "After"] and width == pytest.approx(0.8 / 3)
    for i, (g, cells) in enumerate(mixed.items()):
        xs = [x[g, a] for a in cells]
        assert sum(xs) / len(xs) == pytest.approx(i)  # centred on its tick
        assert all(b - a == pytest.approx(width) for a, b in zip(xs, xs[1:]))  # side by side, no overlap
    assert bar_layout({}) == ([], 0.8, {})


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")])
def test_plot_rates_writes_the_figure_in_the_format_its_name_says(tmp_path, suffix, magic):
    path = plot_rates(tmp_path / f"rates{suffix}", title="t", groups={
        "Direct": {"direct": (0.2, 0.1, 0.3)}, "ToT": {"Baseline": (0.4, 0.3, 0.5), "Before": (0.3, 0.2, 0.4)}})
    assert path.exists() and path.stat().st_size > 1000 and path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("data, prov, smoke", [
    ({"profile": "smoke"}, {}, True), ({}, {"profile": "smoke"}, True),
    ({}, {"sample_sizes": {"profile": "smoke"}}, True), ({"profile": "small"}, {}, False),
    ({}, {"sample_sizes": None}, False)])
def test_a_smoke_table_says_so_in_its_title(tmp_path, data, prov, smoke):
    """Smoke runs check the mechanics on a few instances: their tables must not read as findings."""
    import json

    from choreo.report import SMOKE_TITLE, write_table

    md = write_table(tmp_path, "t", title="Table 1", columns=["a"], rows=[[1]], data=data, provenance=prov)
    assert (SMOKE_TITLE in md.read_text().splitlines()[0]) is smoke
    assert json.loads((tmp_path / "t.json").read_text())["title"] == "Table 1" + (SMOKE_TITLE if smoke else "")
