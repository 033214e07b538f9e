"""The coordinator's half: pooled values from the hospitals' released numbers, the histogram
request of a statistics run, federated normalisation, and the flags of the report.

Pooled values are exact functions of per-site sums, never averages of site means: a pooled
count is the sum of the released counts; a pooled mean is ``sum(sum_i) / sum(count_i)`` and
the pooled (unbiased) standard deviation comes from ``sum(sum_sq_i)`` the same way. A
hospital that did not release a cell or a variable's sums adds nothing to it and is named
(``incomplete`` / ``excluded``): pooled values are computed from released values only, so
they disclose nothing the per-site answers do not.

Secure aggregation (issue 23) would replace the per-site sums below by their secure sum:
:func:`pooled_moments` and :func:`pooled_cells` need only the totals. The rule would stay
that a hospital contributes only values it would release on its own; otherwise pooled minus
the other hospitals' released values gives back a suppressed cell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedclinic.stats.protocol import (
    SPLITS,
    Cell,
    HistogramSpec,
    SiteAnswer,
    StatsRequest,
    VariableAnswer,
    released,
)

#: how far (in standard deviations) histogram ranges reach around the pooled mean
HISTOGRAM_REACH = 3.0
#: flags: a site mean this many standard deviations of the other sites away ...
SHIFT_LIMIT = 2.0
#: ... or a standard deviation this many times larger or smaller than theirs ...
SPREAD_LIMIT = 2.0
#: ... or a histogram this far (total variation distance) from theirs
DISTANCE_LIMIT = 0.5


def moments_from(count: float, total: float, squares: float) -> tuple[float | None, float | None]:
    """Mean and unbiased standard deviation from count, sum and sum of squares."""
    if count <= 0:
        return None, None
    mean = total / count
    if count < 2:
        return mean, None
    variance = max(squares - total * total / count, 0.0) / (count - 1)
    return mean, math.sqrt(variance)


def site_moments(answer: VariableAnswer) -> dict[str, Any]:
    """One hospital's released numbers of one variable, with its mean and std."""
    count = released(answer.count)
    view: dict[str, Any] = {"count": answer.count, "mean": None, "std": None,
                            "min": answer.min, "max": answer.max}  # fmt: skip
    if answer.withheld:
        view["withheld"] = answer.withheld
    if count is not None and answer.sum is not None and answer.sum_sq is not None:
        view["mean"], view["std"] = moments_from(count, answer.sum, answer.sum_sq)
    return view


def pooled_moments(answers: Mapping[str, VariableAnswer]) -> dict[str, Any]:
    """Pooled count, mean, std (and min/max) from the hospitals that released the sums."""
    count = total = squares = 0.0
    contributors: list[str] = []
    excluded: dict[str, str] = {}
    lows, highs, no_extremes = [], [], []
    for hospital, answer in sorted(answers.items()):
        n = released(answer.count)
        if n is None or answer.sum is None or answer.sum_sq is None:
            if n != 0:
                excluded[hospital] = answer.withheld or "not released"
            continue
        count, total, squares = count + n, total + answer.sum, squares + answer.sum_sq
        contributors.append(hospital)
        if answer.min is None or answer.max is None:
            no_extremes.append(hospital)
        else:
            lows.append(answer.min)
            highs.append(answer.max)
    mean, std = moments_from(count, total, squares)
    return {
        "count": int(count),
        "mean": mean,
        "std": std,
        # extremes only when every contributing hospital allows them
        "min": min(lows) if lows and not no_extremes else None,
        "max": max(highs) if highs and not no_extremes else None,
        "hospitals": contributors,
        "excluded": excluded,
    }


def pooled_cells(cells: Mapping[str, Sequence[Cell]]) -> list[dict[str, Any]]:
    """Cell by cell: the sum of the released counts and the hospitals that released none."""
    width = max((len(c) for c in cells.values()), default=0)
    pooled = []
    for i in range(width):
        value, incomplete = 0, []
        for hospital, row in sorted(cells.items()):
            count = released(row[i]) if i < len(row) else 0
            if count is None:
                incomplete.append(hospital)
            else:
                value += count
        pooled.append({"value": value, "incomplete": incomplete})
    return pooled


def _names(answers: Mapping[str, SiteAnswer], split: str, part: str) -> list[str]:
    """Variable names in the order the hospitals gave them (first hospital first)."""
    names: list[str] = []
    for answer in answers.values():
        if split in answer.splits:
            for name in getattr(answer.splits[split], part):
                if name not in names:
                    names.append(name)
    return names


def pool(answers: Mapping[str, SiteAnswer]) -> dict[str, Any]:
    """Per split: pooled cases, classes, variables, histograms and foreground share."""
    pooled: dict[str, Any] = {}
    for split in SPLITS:
        sites = {h: a.splits[split] for h, a in answers.items() if split in a.splits}
        if not sites:
            continue
        entry: dict[str, Any] = {
            "cases": pooled_cells({h: [s.cases] for h, s in sites.items()})[0],
            "classes": pooled_cells({h: s.classes for h, s in sites.items()}),
            "variables": {
                name: pooled_moments(
                    {h: s.variables[name] for h, s in sites.items() if name in s.variables}
                )
                for name in _names(answers, split, "variables")
            },
            "histograms": {},
        }
        for name in _names(answers, split, "histograms"):
            parts = {h: s.histograms[name] for h, s in sites.items() if name in s.histograms}
            first = next(iter(parts.values()))
            entry["histograms"][name] = {
                "low": first.low,
                "high": first.high,
                "bins": first.bins,
                "counts": pooled_cells({h: p.counts for h, p in parts.items()}),
            }
        masks = {h: s.foreground for h, s in sites.items() if s.foreground is not None}
        if masks:
            shown = [h for h, m in masks.items() if m.pixels is not None]
            pixels = sum(float(masks[h].pixels or 0) for h in shown)
            fg = sum(float(masks[h].foreground_pixels or 0) for h in shown)
            entry["foreground"] = {
                "images": pooled_cells({h: m.images for h, m in masks.items()}),
                "share": fg / pixels if pixels else None,
                "hospitals": shown,
                "excluded": sorted(set(masks) - set(shown)),
            }
        pooled[split] = entry
    return pooled


def per_site(answers: Mapping[str, SiteAnswer]) -> dict[str, Any]:
    """Each hospital's answer with its means/stds and foreground share worked out."""
    sites: dict[str, Any] = {}
    for hospital, answer in sorted(answers.items()):
        splits = {}
        for split, part in answer.splits.items():
            view: dict[str, Any] = {
                "cases": part.cases,
                "classes": part.classes,
                "variables": {n: site_moments(v) for n, v in part.variables.items()},
                "histograms": {n: h.model_dump() for n, h in part.histograms.items()},
            }
            if part.foreground is not None:
                fg = part.foreground
                view["foreground"] = {
                    "images": fg.images,
                    "share": fg.foreground_pixels / fg.pixels
                    if fg.pixels and fg.foreground_pixels is not None
                    else None,
                }
            splits[split] = view
        sites[hospital] = {
            "kind": answer.kind,
            "task": answer.task,
            "min_count": answer.min_count,
            "extremes": answer.extremes,
            "inputs": answer.inputs,
            "shape": answer.shape,
            "splits": splits,
        }
    return sites


# ------------------------------------------------------------------------------ requests


def histogram_request(
    pooled: Mapping[str, Any], request: StatsRequest, bins: int
) -> tuple[StatsRequest | None, dict[str, str]]:
    """The second exchange of a statistics run: histograms on the same bins at every site.

    Image channels span [0, 1] (every image source scales intensities so); other variables
    the pooled train mean +- :data:`HISTOGRAM_REACH` pooled standard deviations (+- 0.5
    around a constant). A variable without pooled train moments gets none (returned with
    the reason).
    """
    train: Mapping[str, Any] = pooled.get("train") or next(iter(pooled.values()), {})
    specs: dict[str, HistogramSpec] = {}
    skipped: dict[str, str] = {}
    for name, moments in train.get("variables", {}).items():
        mean, std = moments["mean"], moments["std"]
        if name.startswith("channel-"):
            specs[name] = HistogramSpec(low=0.0, high=1.0, bins=bins)
        elif mean is None:
            skipped[name] = "no hospital released its sums"
        else:
            reach = HISTOGRAM_REACH * std if std else 0.5
            specs[name] = HistogramSpec(low=mean - reach, high=mean + reach, bins=bins)
    if not specs:
        return None, skipped
    return (
        StatsRequest(splits=request.splits, variables=tuple(specs), moments=False,
                     histograms=specs),
        skipped,
    )  # fmt: skip


def normalisation(answers: Mapping[str, SiteAnswer]) -> dict[str, Any]:
    """Pooled train mean and std of every model input, for ``normalisation = federated``.

    A constant input (pooled std 0) is centred only (std 1). Raises ``ValueError`` with one
    line when the hospitals' inputs differ or an input has no released train sums.
    """
    inputs = {tuple(a.inputs) for a in answers.values()}
    if len(inputs) != 1:
        listing = "; ".join(f"{h}: {', '.join(a.inputs)}" for h, a in sorted(answers.items()))
        raise ValueError(f"the hospitals' model inputs differ ({listing})")
    names = list(next(iter(inputs)))
    train = pool(answers).get("train", {}).get("variables", {})
    means, stds, details = [], [], {}
    for name in names:
        moments = train.get(name)
        if not moments or moments["mean"] is None:
            excluded = (moments or {}).get("excluded", {})
            why = "; ".join(f"{h}: {r}" for h, r in excluded.items()) or "no answer"
            raise ValueError(
                f"no hospital released the train statistics of '{name}' ({why}); lower "
                "stats-min-count at the hospitals or use normalisation = site"
            )
        means.append(float(moments["mean"]))
        std = moments["std"]
        stds.append(float(std) if std and std > 0 else 1.0)
        details[name] = {"hospitals": moments["hospitals"], "excluded": moments["excluded"],
                         "count": moments["count"]}  # fmt: skip
    return {"kind": "federated", "variables": names, "mean": means, "std": stds,
            "contributions": details}  # fmt: skip


# ------------------------------------------------------------------------------ flags


def flags(sites: Mapping[str, Any], pooled: Mapping[str, Any]) -> list[dict[str, str]]:
    """What looks wrong at a hospital, for the operator to check before training.

    - ``one class``: a split with cases of one class only (classification);
    - ``small class``: a class below the hospital's minimum cell size;
    - ``constant``: a variable with one value at the hospital (train) but not elsewhere;
    - ``shifted`` / ``spread``: its train mean is more than :data:`SHIFT_LIMIT` standard
      deviations from the other hospitals' (medians of their means and stds), or its std
      more than :data:`SPREAD_LIMIT` times larger or smaller (a scanner with another
      intensity range);
    - ``distribution``: its train histogram is more than :data:`DISTANCE_LIMIT` (total
      variation) from the other hospitals' pooled histogram.
    """
    found: list[dict[str, str]] = []

    def flag(hospital: str, split: str, what: str, detail: str) -> None:
        found.append({"hospital": hospital, "split": split, "flag": what, "detail": detail})

    for hospital, site in sorted(sites.items()):
        for split, part in site["splits"].items():
            classes = part["classes"]
            if site["task"] == "classification" and isinstance(part["cases"], int):
                present = [i for i, c in enumerate(classes) if c != 0]
                if part["cases"] > 0 and len(present) == 1:
                    flag(hospital, split, "one class",
                         f"all {part['cases']} {split} cases are class {present[0]}")  # fmt: skip
                else:
                    rare = [str(i) for i, c in enumerate(classes) if str(c).startswith("<")]
                    if rare:
                        flag(
                            hospital,
                            split,
                            "small class",
                            f"class {', '.join(rare)}: fewer than {site['min_count']} cases",
                        )
        train = site["splits"].get("train")
        if train is None:
            continue
        for name, view in train["variables"].items():
            others = _others(sites, hospital, name)
            if view["mean"] is None or others is None:
                continue
            mean, std = others
            if view["std"] is not None and view["std"] <= 1e-12 * (1 + abs(view["mean"])):
                if std > 0:  # one value here, several elsewhere
                    flag(hospital, "train", "constant",
                         f"{name} is {view['mean']:.4g} for every case")  # fmt: skip
                continue
            if std and abs(view["mean"] - mean) > SHIFT_LIMIT * std:
                flag(hospital, "train", "shifted",
                     f"{name}: mean {view['mean']:.4g} vs {mean:.4g} +- {std:.3g} at the "
                     "other hospitals (median)")  # fmt: skip
            elif (
                std and view["std"] and not (1 / SPREAD_LIMIT <= view["std"] / std <= SPREAD_LIMIT)
            ):
                flag(hospital, "train", "spread",
                     f"{name}: std {view['std']:.3g} vs {std:.3g} at the other hospitals "
                     "(median)")  # fmt: skip
        for name in train["histograms"]:
            distance = _distance(sites, hospital, name)
            if distance is not None and distance > DISTANCE_LIMIT:
                flag(hospital, "train", "distribution",
                     f"{name}: histogram {distance:.2f} (total variation) from the other "
                     "hospitals'")  # fmt: skip
    return found


def _others(sites: Mapping[str, Any], hospital: str, name: str) -> tuple[float, float] | None:
    """The median train mean and median std of ``name`` at the other hospitals: robust to
    one deviating hospital among them (a pooled std would grow with it and hide it)."""
    means, stds = [], []
    for other, site in sites.items():
        view = site["splits"].get("train", {}).get("variables", {}).get(name)
        if other != hospital and view and view["mean"] is not None and view["std"] is not None:
            means.append(float(view["mean"]))
            stds.append(float(view["std"]))
    if not means:
        return None
    return float(np.median(means)), float(np.median(stds))


def _distance(sites: Mapping[str, Any], hospital: str, name: str) -> float | None:
    """Total variation distance between a hospital's train histogram and the others' pooled
    one, over the cells every one of them released."""

    def cells(site: Mapping[str, Any]) -> list[Cell] | None:
        hist = site["splits"].get("train", {}).get("histograms", {}).get(name)
        return None if hist is None else hist["counts"]

    mine = cells(sites[hospital])
    rest = [c for h, s in sites.items() if h != hospital and (c := cells(s)) is not None]
    if mine is None or not rest:
        return None
    usable = [
        i
        for i in range(len(mine))
        if isinstance(mine[i], int) and all(isinstance(r[i], int) for r in rest)
    ]
    a = [float(mine[i]) for i in usable]
    b = [float(sum(r[i] for r in rest)) for i in usable]  # type: ignore[misc]
    if sum(a) <= 0 or sum(b) <= 0:
        return None
    return 0.5 * sum(abs(x / sum(a) - y / sum(b)) for x, y in zip(a, b, strict=True))
