"""Tables and plots for ``results/``: one JSON (numbers + provenance), one markdown table, one plot."""

from __future__ import annotations

import math
import os
import shlex
from pathlib import Path
from typing import Sequence

from .results import write_bytes, write_json, write_text


def command_line(env: Sequence[str] = (), argv: Sequence[str] | None = None) -> str:
    """The command that produced a table, prefixed with those of the ``env`` variables that are set, because the
    same command without them runs something else (pass it as ``provenance(..., command=...)``).

    Example: with CHOREO_LEAKAGE_FINETUNE=1 set, ``command_line(["CHOREO_LEAKAGE_FINETUNE"], ["choreo", "repro"])``
    is "CHOREO_LEAKAGE_FINETUNE=1 choreo repro".
    """
    from .provenance import command_argv

    argv = command_argv() if argv is None else argv
    prefix = [f"{name}={shlex.quote(os.environ[name])}" for name in env if os.environ.get(name)]
    return " ".join(prefix + [shlex.quote(a) for a in argv])


def loss_text(loss: float | None) -> str:
    """A loss with three decimals; "n/a" for one that is not a finite number (a saved summary holds null there:
    ``write_json`` writes NaN and infinities as null).

    Example: ``loss_text(0.12345)`` -> '0.123'; ``loss_text(None)`` -> 'n/a'.
    """
    return "n/a" if loss is None or not math.isfinite(loss) else f"{loss:.3f}"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are str()-ed, a ``|`` in one escaped and a line break written as ``<br>``.

    A row with more or fewer cells than ``columns`` is a ValueError naming it (a cell would be lost or shifted).
    """
    rows = [list(row) for row in rows]
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"table row {i} ({row[0] if row else 'empty'!s}) has {len(row)} cell(s) for the "
                             f"{len(columns)} columns {list(columns)}")
    cells = [[_cell(c) for c in columns]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells[1:]])


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def write_table(folder: str | Path, name: str, *, title: str, columns: Sequence[str], rows: Sequence[Sequence],
                data: dict, provenance: dict, notes: Sequence[str] = ()) -> Path:
    """Write ``<folder>/<name>.json`` (data + provenance) and ``<name>.md`` (title, table, notes, provenance). A
    table of the smoke profile says so in its title (``SMOKE_TITLE``): its few instances check the mechanics, and
    a reader must not take its numbers for a finding."""
    folder = Path(folder)
    if profile_of(data, provenance) == "smoke" and SMOKE_TITLE not in title:
        title += SMOKE_TITLE
    write_json(folder / f"{name}.json", {"title": title, "columns": list(columns), "rows": [list(r) for r in rows],
                                         "data": data, "provenance": provenance})
    text = [f"### {title}", "", markdown_table(columns, rows), ""]
    text += [f"- {n}" for n in notes] + ([""] if notes else [])
    text += [f"_Provenance: {provenance_line(provenance)}._", ""]
    return write_text(folder / f"{name}.md", "\n".join(text))


SMOKE_TITLE = " [smoke profile: mechanics only, not a result]"


def profile_of(data, provenance: dict) -> str | None:
    """The suite profile a table was made at, where its data or provenance records one (top level, or in the
    provenance's sizes), else None."""
    for record in (provenance, provenance.get("sample_sizes"), data):
        if isinstance(record, dict) and isinstance(record.get("profile"), str):
            return record["profile"]
    return None


def provenance_line(prov: dict) -> str:
    """The markdown footer of a table: model and hash, device, seeds, sizes, commit, date, command, environment,
    the code that computed logged records (``logs``: ``choreo.results.logs_written``), versions."""
    model = prov.get("model")
    parts = ["no model" if not model else f"model {model.get('name')} (sha256 {str(model.get('sha256'))[:12]})",
             f"device {prov.get('device')}", f"seeds {prov.get('seeds')}", f"sizes {prov.get('sample_sizes')}",
             f"commit {prov.get('git_commit')}" + (f" (the checkout held {prov['git_commit_at_write']} when this was "
                                                   "written)" if prov.get("git_commit_at_write") else ""),
             str(prov.get("date")), f"`{prov.get('command')}`"]
    if prov.get("environment"):
        parts.append(f"environment {prov['environment']}")
    logs = prov.get("logs")
    for log in [logs] if isinstance(logs, dict) else logs or []:
        computed = f"records computed at {', '.join(log['git_commits'])}" if log.get("git_commits") else ""
        if log.get("unstamped"):
            computed += ("; " if computed else "") + f"{log['unstamped']} of {log['records']} from before records " \
                        f"carried their commit (file last committed at {log.get('file_last_committed')})"
        parts.append(f"log {log['log']}: {computed or 'no records'}")
    return ", ".join(parts) + f"; versions {prov.get('versions')}"


def bar_layout(groups: dict[str, dict]) -> tuple[list[str], float, dict[tuple[str, str], float]]:
    """Where ``plot_rates`` puts its bars: (every arm in legend order, bar width, x of each (group, arm)). Group i
    is centred on x = i with its own arms side by side, so groups may hold different arms."""
    arms = list(dict.fromkeys(a for g in groups.values() for a in g))
    present = {g: [a for a in arms if a in groups[g]] for g in groups}
    width = 0.8 / max([len(v) for v in present.values()] + [1])
    return arms, width, {(g, a): i + (k - (len(present[g]) - 1) / 2) * width
                         for i, g in enumerate(groups) for k, a in enumerate(present[g])}


def plot_rates(path: str | Path, *, title: str, groups: dict[str, dict[str, tuple[float, float, float]]],
               ylabel: str = "rate") -> Path:
    """Grouped bar chart of rates in [0, 1] with intervals: groups[group][arm] = (rate, low, high), drawn in
    percent, each bar labelled with its value (a rate of 0 is otherwise only an interval). Groups may hold
    different arms (``bar_layout``); an arm keeps one colour and one legend entry, beside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    for g, cells in groups.items():
        for a, cell in cells.items():
            _check_rate(cell, f"groups[{g!r}][{a!r}]")
    arms, width, x = bar_layout(groups)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * 0.4 / width) + 1.8, 3.6))
    top = max([high for g in groups.values() for _, _, high in g.values()] + [0.01])
    for arm in arms:
        cells = [(x[g, arm], *groups[g][arm]) for g in groups if arm in groups[g]]
        xs, ys = [c[0] for c in cells], [c[1] for c in cells]
        err = [[max(r - low, 0.0) for _, r, low, _ in cells], [max(high - r, 0.0) for _, r, _, high in cells]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=arm)
        for xi, r, _, high in cells:
            ax.annotate(f"{100 * r:.3g}%", (xi, high), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize="x-small")
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylim(0, 1.12 * top)  # room for the labels above the intervals
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(f"{ylabel} (95% interval)")
    ax.set_title(title)
    ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, dpi=120)


def _check_rate(cell, where: str) -> None:
    """(rate, low, high): finite numbers with low <= rate <= high (to rounding), or a ValueError naming the cell."""
    try:
        rate, low, high = (float(v) for v in cell)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be (rate, low, high) numbers, got {cell!r}") from None
    if not all(map(math.isfinite, (rate, low, high))) or not low - 1e-9 <= rate <= high + 1e-9:
        raise ValueError(f"{where} = {cell!r}: needs finite numbers with low <= rate <= high")


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out, write atomically (``write_bytes``: a half-written file never replaces a good one, and none is left
    behind) and close a matplotlib figure, whether or not it could be written; the format follows ``path``'s suffix
    (.png, .pdf, .svg)."""
    import io

    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format=path.suffix[1:] or None, dpi=dpi)  # None: matplotlib's default (png)
    finally:
        plt.close(fig)
    return write_bytes(path, buffer.getvalue())
