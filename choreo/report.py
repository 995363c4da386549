"""Tables and plots for ``results/``: one JSON (numbers + provenance), one markdown table, one plot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .results import write_json, write_text


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub markdown table; cells are str()-ed."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def write_table(folder: str | Path, name: str, *, title: str, columns: Sequence[str], rows: Sequence[Sequence],
                data: dict, provenance: dict, notes: Sequence[str] = ()) -> Path:
    """Write ``<folder>/<name>.json`` (data + provenance) and ``<name>.md`` (title, table, notes, provenance)."""
    folder = Path(folder)
    write_json(folder / f"{name}.json", {"title": title, "columns": list(columns), "rows": [list(r) for r in rows],
                                         "data": data, "provenance": provenance})
    prov = provenance
    model = prov.get("model") or {}
    footer = (f"model {model.get('name')} (sha256 {str(model.get('sha256'))[:12]}), device {prov.get('device')}, "
              f"seeds {prov.get('seeds')}, sizes {prov.get('sample_sizes')}, {prov.get('date')}, "
              f"`{prov.get('command')}`")
    text = [f"### {title}", "", markdown_table(columns, rows), ""]
    text += [f"- {n}" for n in notes] + ([""] if notes else [])
    text += [f"_Provenance: {footer}; versions {prov.get('versions')}._", ""]
    return write_text(folder / f"{name}.md", "\n".join(text))


def plot_rates(path: str | Path, *, title: str, groups: dict[str, dict[str, tuple[float, float, float]]],
               ylabel: str = "rate") -> Path:
    """Grouped bar chart of rates with intervals: groups[group][arm] = (rate, low, high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(a for g in groups.values() for a in g))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(groups) * max(1, len(arms)) / 2), 3.6))
    for k, arm in enumerate(arms):
        xs, ys, lo, hi = [], [], [], []
        for i, g in enumerate(groups):
            if arm in groups[g]:
                r, l, h = groups[g][arm]
                xs.append(i + (k - (len(arms) - 1) / 2) * width)
                ys.append(r)
                lo.append(r - l)
                hi.append(h - r)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=arm)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", frameon=False)
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay out, write atomically (a half-written PNG never replaces a good one) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path
