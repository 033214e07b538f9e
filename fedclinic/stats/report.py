"""``stats.json``, ``summary.json`` and an HTML report with PNG plots of a statistics run.

The plots put the hospitals side by side so that a site whose data looks wrong stands out:
cases per split, class mix, each variable's mean and spread, and each variable's histogram
per hospital (the pooled one last). Flagged hospitals (:func:`fedclinic.stats.pool.flags`)
are listed first and drawn in red. A cell a hospital did not disclose is drawn hatched and
labelled with its marker (``<5``, ``hidden``, ``withheld``), never as a number.

Matplotlib with the Agg backend: no display needed (the coordinator is a server).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedclinic.errors import ConfigError
from fedclinic.results import write_json

STATS_FILE = "stats.json"
REPORT_FILE = "report.html"
PLOTS = "plots"
FLAG_COLOUR = "#c0392b"


def write_statistics(directory: Path, result: Mapping[str, Any]) -> list[Path]:
    """``stats.json`` (everything), ``summary.json`` (status, cases, flags) and the report."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / STATS_FILE, result)
    hospitals = result["hospitals"]
    write_json(
        directory / "summary.json",
        {
            "status": "completed",
            "run_kind": "stats",
            "hospitals": {
                name: {split: part["cases"] for split, part in site["splits"].items()}
                for name, site in hospitals.items()
            },
            "flags": result["flags"],
            "statistics": STATS_FILE,
            "report": REPORT_FILE,
        },
    )
    return [directory / STATS_FILE, directory / "summary.json", render(directory, result)]


def load_statistics(path: Path) -> dict[str, Any]:
    """A ``stats.json`` written by :func:`write_statistics` (one-line error otherwise)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"'{path}' is not a readable stats.json: {err}") from None
    if not isinstance(data, dict) or data.get("kind") != "fedclinic-statistics":
        raise ConfigError(f"'{path}' is not a stats.json written by fedclinic stats")
    return data


# ------------------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "variable"


def _value(cell: Any) -> float:
    return float(cell) if isinstance(cell, int | float) else 0.0


def _flagged(result: Mapping[str, Any], variable: str | None = None) -> set[str]:
    return {
        f["hospital"]
        for f in result["flags"]
        if variable is None
        or f["detail"].startswith(f"{variable}:")
        or f["detail"].startswith(f"{variable} ")
    }


def plot_cases(result: Mapping[str, Any], path: Path) -> Path:
    """Cases per split and the train split's class mix, one bar group per hospital."""
    plt = _plt()
    hospitals = sorted(result["hospitals"])
    flagged = _flagged(result)
    splits = [s for s in ("train", "val", "test") if s in result["pooled"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(hospitals)), 3.8))
    width = 0.8 / max(len(splits), 1)
    for j, split in enumerate(splits):
        cells = [result["hospitals"][h]["splits"].get(split, {}).get("cases", 0) for h in hospitals]
        xs = [i + (j - (len(splits) - 1) / 2) * width for i in range(len(hospitals))]
        bars = left.bar(xs, [_value(c) for c in cells], width, label=split)
        for x, cell, bar in zip(xs, cells, bars, strict=True):
            if isinstance(cell, str):
                left.text(x, 0, cell, ha="center", va="bottom", fontsize=7, rotation=90)
                bar.set_hatch("//")
    _hospital_axis(left, hospitals, flagged)
    left.set_ylabel("cases")
    left.set_title("cases per split")
    left.legend(fontsize=8)
    bottoms = [0.0] * len(hospitals)
    classes = max(len(s["splits"].get("train", {}).get("classes", [])) for s in
                  result["hospitals"].values()) if hospitals else 0  # fmt: skip
    for c in range(classes):
        shares, notes = [], []
        for h in hospitals:
            row = result["hospitals"][h]["splits"].get("train", {}).get("classes", [])
            cell = row[c] if c < len(row) else 0
            total = sum(_value(x) for x in row) or 1.0
            shares.append(_value(cell) / total)
            notes.append(cell if isinstance(cell, str) else "")
        right.bar(range(len(hospitals)), shares, 0.6, bottom=bottoms, label=f"class {c}")
        for i, note in enumerate(notes):
            if note:
                right.text(i, bottoms[i] + 0.02, f"class {c}: {note}", ha="center", fontsize=7)
        bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    _hospital_axis(right, hospitals, flagged)
    right.set_ylim(0, 1.05)
    right.set_ylabel("share of released train cases")
    right.set_title("class mix (train)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _hospital_axis(axis: Any, hospitals: Sequence[str], flagged: set[str]) -> None:
    axis.set_xlim(-0.6, len(hospitals) - 0.4)
    axis.set_xticks(range(len(hospitals)))
    axis.set_xticklabels(hospitals, rotation=20, ha="right", fontsize=8)
    for label, name in zip(axis.get_xticklabels(), hospitals, strict=True):
        if name in flagged:
            label.set_color(FLAG_COLOUR)
            label.set_fontweight("bold")


def plot_means(result: Mapping[str, Any], path: Path) -> Path | None:
    """Each variable's train mean +- std per hospital, the pooled mean as a line."""
    pooled = result["pooled"].get("train", {}).get("variables", {})
    if not pooled:
        return None
    plt = _plt()
    hospitals = sorted(result["hospitals"])
    names = list(pooled)
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.6 * rows), squeeze=False)
    for index, name in enumerate(names):
        axis = axes[index // columns][index % columns]
        flagged = _flagged(result, name)
        for i, h in enumerate(hospitals):
            view = result["hospitals"][h]["splits"].get("train", {}).get("variables", {}).get(name)
            if not view or view["mean"] is None:
                axis.text(i, 0.5, "withheld", transform=axis.get_xaxis_transform(),
                          ha="center", fontsize=7, rotation=90, color="grey")  # fmt: skip
                continue
            colour = FLAG_COLOUR if h in flagged else "C0"
            axis.errorbar(i, view["mean"], yerr=view["std"] or 0, fmt="o", color=colour,
                          capsize=3)  # fmt: skip
        if pooled[name]["mean"] is not None:
            axis.axhline(pooled[name]["mean"], color="black", lw=0.8, ls="--")
        axis.set_title(name, fontsize=9)
        _hospital_axis(axis, hospitals, flagged)
    for index in range(len(names), rows * columns):
        axes[index // columns][index % columns].axis("off")
    fig.suptitle("train mean +- std per hospital (dashed: pooled mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_histogram(result: Mapping[str, Any], name: str, path: Path) -> Path:
    """One variable's train histogram per hospital, side by side, the pooled one last.

    Bars are shares of the hospital's released values; the first and last narrow bars are
    the values below and above the range; undisclosed cells are hatched at the top."""
    plt = _plt()
    hospitals = sorted(result["hospitals"])
    flagged = _flagged(result, name)
    pooled = result["pooled"]["train"]["histograms"][name]
    panels: list[tuple[str, list[Any]]] = []
    for h in hospitals:
        hist = result["hospitals"][h]["splits"].get("train", {}).get("histograms", {}).get(name)
        if hist is not None:
            panels.append((h, hist["counts"]))
    panels.append(("pooled", [c["value"] if not c["incomplete"] else f"{c['value']}+"
                              for c in pooled["counts"]]))  # fmt: skip
    low, high, bins = pooled["low"], pooled["high"], pooled["bins"]
    step = (high - low) / bins
    centres = [low - step / 2] + [low + (i + 0.5) * step for i in range(bins)] + [high + step / 2]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.6), sharey=True,
                             squeeze=False)  # fmt: skip
    for axis, (label, cells) in zip(axes[0], panels, strict=True):
        numbers = [float(str(c).rstrip("+")) if _numeric(c) else 0.0 for c in cells]
        total = sum(numbers) or 1.0
        colour = FLAG_COLOUR if label in flagged else ("grey" if label == "pooled" else "C0")
        widths = [step * 0.5] + [step] * bins + [step * 0.5]
        axis.bar(centres, [n / total for n in numbers], widths, color=colour, alpha=0.8)
        for x, cell, w in zip(centres, cells, widths, strict=True):
            if not _numeric(cell):
                axis.bar(x, 1.0, w, bottom=0, fill=False, hatch="//", edgecolor="#bbbbbb", lw=0)
        axis.set_title(label, fontsize=9, color=colour if label in flagged else "black")
        axis.axvline(low, color="black", lw=0.5)
        axis.axvline(high, color="black", lw=0.5)
        axis.tick_params(labelsize=7)
    axes[0][0].set_ylabel("share of values")
    axes[0][0].set_ylim(0, 1)
    fig.suptitle(f"{name} (train); hatched: not disclosed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _numeric(cell: Any) -> bool:
    return isinstance(cell, int | float) or (isinstance(cell, str) and cell.rstrip("+").isdigit())


# ------------------------------------------------------------------------------ HTML


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def render(directory: Path, result: Mapping[str, Any]) -> Path:
    """``report.html`` and its PNGs under ``plots/``."""
    plots = directory / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    images = [plot_cases(result, plots / "cases.png")]
    means = plot_means(result, plots / "means.png")
    if means:
        images.append(means)
    for name in result["pooled"].get("train", {}).get("histograms", {}):
        images.append(plot_histogram(result, name, plots / f"hist-{_slug(name)}.png"))
    hospitals = sorted(result["hospitals"])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fedclinic statistics</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right}th{background:#eee}.flag{color:"
        f"{FLAG_COLOUR};font-weight:bold}}img{{max-width:100%;margin:1em 0}}</style></head><body>",
        "<h1>Federated statistics</h1>",
        f"<p>{len(hospitals)} hospitals: {html.escape(', '.join(hospitals))}. Computed at each "
        "hospital on its raw data; pooled values from the released per-site sums. "
        "<code>&lt;k</code>: a count below the hospital's minimum cell size; "
        "<code>hidden</code>: withheld so that such a count cannot be derived from a total; "
        "<code>withheld</code>: not disclosed.</p>",
        "<h2>Flags</h2>",
    ]
    if result["flags"]:
        parts.append(_table(
            ["hospital", "split", "flag", "detail"],
            [[f"<span class='flag'>{html.escape(f['hospital'])}</span>", f["split"],
              f"<span class='flag'>{html.escape(f['flag'])}</span>", html.escape(f["detail"])]
             for f in result["flags"]],
        ))  # fmt: skip
    else:
        parts.append("<p>nothing flagged</p>")
    parts.append("<h2>Cases</h2>")
    splits = [s for s in ("train", "val", "test") if s in result["pooled"]]
    rows = []
    for h in hospitals:
        site = result["hospitals"][h]
        rows.append([html.escape(h), str(site["min_count"]), "yes" if site["extremes"] else "no",
                     *(_cell(site["splits"].get(s, {}).get("cases")) + " ("
                       + " / ".join(_cell(c) for c in site["splits"].get(s, {}).get("classes", []))
                       + ")" for s in splits)])  # fmt: skip
    rows.append(["<b>pooled</b>", "", "", *(_pooled(result["pooled"][s]) for s in splits)])
    parts.append(_table(["hospital", "min cell", "min/max", *(f"{s} (per class)" for s in splits)],
                        rows))  # fmt: skip
    parts.append(_variables_table(result, hospitals))
    foreground = result["pooled"].get("train", {}).get("foreground")
    if foreground is not None:
        fg_rows = []
        for h in hospitals:
            fg = result["hospitals"][h]["splits"].get("train", {}).get("foreground") or {}
            fg_rows.append([html.escape(h), _cell(fg.get("share")),
                            " / ".join(_cell(c) for c in fg.get("images", []))])  # fmt: skip
        fg_rows.append(["<b>pooled</b>", _cell(foreground["share"]), ""])
        parts.append("<h2>Mask foreground (train)</h2>")
        parts.append(_table(["hospital", "foreground share of pixels",
                             "images with / without foreground"], fg_rows))  # fmt: skip
    if result.get("no_histogram"):
        parts.append(
            "<p>No histogram for: "
            + html.escape("; ".join(f"{k} ({v})" for k, v in result["no_histogram"].items()))
            + "</p>"
        )
    parts.append("<h2>Plots</h2>")
    parts.extend(
        f"<img src='{PLOTS}/{html.escape(image.name)}' alt='{html.escape(image.stem)}'>"
        for image in images
    )
    parts.append("</body></html>")
    path = directory / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _pooled(split: Mapping[str, Any]) -> str:
    def show(cell: Mapping[str, Any]) -> str:
        mark = "+" if cell["incomplete"] else ""
        return f"{cell['value']}{mark}"

    return show(split["cases"]) + " (" + " / ".join(show(c) for c in split["classes"]) + ")"


def _variables_table(result: Mapping[str, Any], hospitals: Sequence[str]) -> str:
    pooled = result["pooled"].get("train", {}).get("variables", {})
    if not pooled:
        return ""
    rows = []
    for name, moments in pooled.items():
        flagged = _flagged(result, name)
        cells = [html.escape(name)]
        for h in hospitals:
            view = result["hospitals"][h]["splits"].get("train", {}).get("variables", {}).get(name)
            if not view or view["mean"] is None:
                why = (view or {}).get("withheld", "not released")
                cells.append(f"<span title='{html.escape(why)}'>withheld</span>")
                continue
            text = f"{_cell(view['mean'])} &plusmn; {_cell(view['std'])}"
            if view.get("min") is not None:
                text += f" [{_cell(view['min'])}, {_cell(view['max'])}]"
            cells.append(f"<span class='flag'>{text}</span>" if h in flagged else text)
        note = f" (without {', '.join(moments['excluded'])})" if moments["excluded"] else ""
        cells.append(f"{_cell(moments['mean'])} &plusmn; {_cell(moments['std'])}"
                     f"{html.escape(note)}")  # fmt: skip
        rows.append(cells)
    return "<h2>Variables (train: mean &plusmn; std)</h2>" + _table(
        ["variable", *hospitals, "pooled"], rows
    )
