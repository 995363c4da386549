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


def test_markdown_table_escapes_pipes_and_line_breaks():
    from choreo.report import markdown_table

    lines = markdown_table(["arm", "answer"], [["a|b", "one\ntwo"], ["c", 3]]).splitlines()
    assert len(lines) == 4  # header, rule, two rows: no row split by its line break
    assert lines[2] == "| a\\|b | one<br>two |" and lines[3].startswith("| c    | 3")
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)  # every row has the two columns


@pytest.mark.parametrize("rows, message", [
    ([["a", 1, "extra"]], r"table row 0 \(a\) has 3 cell\(s\) for the 2 columns \['arm', 'rate'\]"),
    ([["a", 1], ["b"]], r"table row 1 \(b\) has 1 cell\(s\) for the 2 columns"),
    ([[]], r"table row 0 \(empty\) has 0 cell\(s\)"),
])
def test_markdown_table_refuses_a_row_that_does_not_fit_the_columns(rows, message):
    from choreo.report import markdown_table

    with pytest.raises(ValueError, match=message):
        markdown_table(["arm", "rate"], rows)


@pytest.mark.parametrize("cell, message", [
    ((float("nan"), 0.1, 0.2), r"groups\['g'\]\['x'\] = \(nan, 0.1, 0.2\): needs finite numbers"),
    ((0.5, 0.55, 0.6), r"low <= rate <= high"),
    ((None, None, None), r"must be \(rate, low, high\) numbers, got \(None, None, None\)"),
    ((0.5, 0.4), r"must be \(rate, low, high\) numbers"),
])
def test_plot_rates_names_a_cell_that_is_not_a_rate_in_its_interval(tmp_path, cell, message):
    with pytest.raises(ValueError, match=message):
        plot_rates(tmp_path / "r.png", title="t", groups={"g": {"x": cell, "y": (0.5, 0.4, 0.6)}})
    assert not (tmp_path / "r.png").exists()


def test_plot_rates_draws_a_rate_at_the_edge_of_its_interval(tmp_path):
    """A rate of 0 with low 0 (and rounding one ulp past it) is a rate, not an error."""
    path = plot_rates(tmp_path / "r.png", title="t", groups={"g": {"x": (0.0, 0.0, 0.2), "y": (0.3, 0.3 + 1e-17, 0.5)}})
    assert path.stat().st_size > 0


def test_a_figure_that_cannot_be_written_leaves_no_file_and_is_closed(tmp_path, monkeypatch):
    """A savefig that fails part-way (a full disk) leaves the old file as it was, no temporary file, no open figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from choreo.report import save_figure

    def failing(self, fname, **kwargs):
        (fname.write if hasattr(fname, "write") else open(fname, "wb").write)(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    (tmp_path / "scaling_B.png").write_bytes(b"old")
    monkeypatch.setattr(Figure, "savefig", failing)
    plt.close("all")
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, tmp_path / "scaling_B.png")
    assert [p.name for p in tmp_path.iterdir()] == ["scaling_B.png"]
    assert (tmp_path / "scaling_B.png").read_bytes() == b"old"
    assert plt.get_fignums() == []
