"""The hospital's half of a statistics exchange: counts, sums and histograms of its raw data,
with its privacy rules applied before anything leaves the site.

Rules (the hospital config's ``stats-min-count`` = k, default 5, and
``stats-allow-extremes``; docs/statistics.md explains each with an example):

1. **Minimum cell size.** A count between 1 and k - 1 is sent as ``"<k"``. A count of 0 is
   sent: it identifies nobody (and shows a site with one class only).
2. **No derivation from a released total.** Where the cells of a table add up to a total
   that is released (a split's class counts add up to its cases; a histogram's cells to its
   values), a single ``"<k"`` cell would be the total minus the others. Further cells are
   then ``"hidden"``, smallest first, until at least one is hidden and the suppressed cells
   together hold enough that no ``"<k"`` cell is narrowed below the range 1..k-1 (see
   :func:`protect`); if that cannot be done, the whole table is ``"withheld"``.
3. **Sums only of enough cases.** Count, sum and sum of squares of a variable are sent only
   when the split has at least k cases; for a variable with at most three distinct values
   (a 0/1 indicator, say) those three numbers give the count at each value, so they are sent
   only when every value is held by at least k cases.
4. **Extremes** (min/max are single patients' values) only with ``stats-allow-extremes``.
5. Image histograms count pixels; a bin is ``"<k"`` when fewer than k *images* have pixels
   in it. Segmentation foreground sums are sent only when the images with foreground are
   a released count.

The pooled values are computed by the coordinator from these released numbers only
(:mod:`fedclinic.stats.pool`), so pooled minus the other hospitals gives back exactly what
this hospital released, never a suppressed cell.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from fedclinic.config import HospitalConfig, RunConfig
from fedclinic.data.base import HospitalData, Split
from fedclinic.data.segmentation_folder import scan_layout
from fedclinic.errors import ConfigError
from fedclinic.stats.protocol import (
    HIDDEN,
    SPLITS,
    WITHHELD,
    Cell,
    ForegroundAnswer,
    HistogramAnswer,
    HistogramSpec,
    SiteAnswer,
    SplitAnswer,
    StatsRequest,
    VariableAnswer,
    below,
)

#: a variable with at most this many distinct values has its value counts determined by
#: (count, sum, sum of squares): n0 + n1 + n2 = n, sum and sum of squares are two more
#: linear equations in the counts
FEW_LEVELS = 3


@dataclass(frozen=True)
class Variable:
    """What can be described: ``values(split_name, split)`` is ``(cases, values per case)``."""

    name: str
    values: Callable[[str, Split], np.ndarray]
    #: one value per case (tabular features, image sizes); otherwise many (pixels)
    per_case: bool
    #: a model input (feature or channel), what federated normalisation standardises
    is_input: bool


def variables_of(data: HospitalData, run: RunConfig) -> list[Variable]:
    """The hospital's variables: its features (tabular), or its channels and stored image
    sizes (images). Inputs first, in the model's input order."""
    inputs = data.train.inputs
    if inputs.ndim == 2:
        width = int(inputs.shape[1])
        # the source's feature names (``extra`` is the sources' untyped bag)
        names = [str(n) for n in cast(Iterable[object], data.extra.get("features", []))]
        if len(names) != width:
            names = [f"feature-{j}" for j in range(width)]
        return [
            Variable(name, _column(j), per_case=True, is_input=True) for j, name in enumerate(names)
        ]
    channels = [
        Variable(f"channel-{c}", _channel(c), per_case=False, is_input=True)
        for c in range(int(inputs.shape[1]))
    ]
    sizes = _StoredSizes(data)
    return [
        *channels,
        Variable("stored-height", sizes.axis(0), per_case=True, is_input=False),
        Variable("stored-width", sizes.axis(1), per_case=True, is_input=False),
    ]


def _column(j: int) -> Callable[[str, Split], np.ndarray]:
    return lambda name, split: split.inputs[:, j : j + 1].numpy().astype(np.float64)


def _channel(c: int) -> Callable[[str, Split], np.ndarray]:
    def values(name: str, split: Split) -> np.ndarray:
        return split.inputs[:, c].flatten(1).numpy().astype(np.float64)

    return values


class _StoredSizes:
    """Each image's size as stored, before the source resized it: read from the file headers
    the source recorded (image-folder, segmentation-folder); otherwise the loaded size
    (MedMNIST and synthetic images are never resized)."""

    def __init__(self, data: HospitalData) -> None:
        self.data = data
        self.cache: dict[str, np.ndarray] = {}

    def axis(self, index: int) -> Callable[[str, Split], np.ndarray]:
        return lambda name, split: self.sizes(name, split)[:, index : index + 1]

    def sizes(self, name: str, split: Split) -> np.ndarray:
        if name not in self.cache:
            files = _recorded_files(self.data, name)
            if files is None or len(files) != len(split):
                height, width = split.inputs.shape[-2:]
                found = np.tile([float(height), float(width)], (len(split), 1))
            else:
                found = np.array([_header_size(f) for f in files], dtype=np.float64)
                found = found.reshape(len(split), 2)
            self.cache[name] = found
        return self.cache[name]


def _recorded_files(data: HospitalData, split: str) -> list[Path] | None:
    """The image files of ``split`` in the split's order, where the source recorded them."""
    extra = data.extra
    source = extra.get("source")
    if source == "image-folder":
        root = Path(str(extra["folder"]))
        return [root / f for f in extra["files"][split]]  # type: ignore[index]
    if source == "segmentation-folder":
        root = Path(str(extra["folder"]))
        images = {
            (f"{folder}/{p.case}" if folder else p.case): p.image
            for folder, pairs in scan_layout(root).items()
            for p in pairs
        }
        cases = extra["cases"][split]  # type: ignore[index]
        return [images[c] for c in cases] if all(c in images for c in cases) else None
    return None


def _header_size(path: Path) -> tuple[float, float]:
    """(height, width) from the file header, without decoding the pixels."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel

        shape = nibabel.load(str(path)).shape  # type: ignore[attr-defined]
        return float(shape[0]), float(shape[1])
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return float(height), float(width)


# ------------------------------------------------------------------------------ the rules


def protect(counts: Sequence[int], small: Sequence[bool], k: int, total_known: bool) -> list[Cell]:
    """Cells of one table with rules 1 and 2 applied.

    ``small`` marks the cells below the minimum size (primary suppression). When the cells'
    total is released, more cells are hidden (smallest first) until at least one is hidden
    and the suppressed cells hold at least ``(h + 1) k + p - 2`` (p cells below k, h hidden):
    then the coordinator, who knows their sum S, that each "<k" cell holds 1..k-1 and each
    hidden one at least k, can place a "<k" cell anywhere in 1..k-1 (its largest value is
    S minus the others' least: S - (p - 1) - h k >= k - 1). No cell left to hide: the whole
    table is withheld.
    """
    primary = [i for i, flag in enumerate(small) if flag]
    cells: list[Cell] = [below(k) if small[i] else int(c) for i, c in enumerate(counts)]
    if not primary or not total_known:
        return cells
    hidden: list[int] = []

    def safe() -> bool:
        held = sum(counts[i] for i in (*primary, *hidden))
        return bool(hidden) and held >= (len(hidden) + 1) * k + len(primary) - 2

    while not safe():
        left = [i for i, c in enumerate(counts) if c > 0 and i not in primary and i not in hidden]
        if not left:
            return [WITHHELD] * len(counts)
        hidden.append(min(left, key=lambda i: (counts[i], i)))
    for i in hidden:
        cells[i] = HIDDEN
    return cells


def count_cell(n: int, k: int) -> Cell:
    return below(k) if 0 < n < k else int(n)


def moments(values: np.ndarray, per_case: bool, k: int, extremes: bool) -> VariableAnswer:
    """Rule 3 (and 4): count, sums and extremes of one variable over one split."""
    cases = int(values.shape[0])
    count = int(values.size)
    if cases == 0:
        return VariableAnswer(count=0)
    if cases < k:
        return VariableAnswer(count=below(k), withheld=f"fewer than {k} cases")
    if per_case:
        levels, held = np.unique(values, return_counts=True)
        if len(levels) <= FEW_LEVELS and int(held.min()) < k:
            return VariableAnswer(
                count=count,
                withheld=f"{len(levels)} distinct value(s), one held by fewer than {k} cases "
                "(the sums would give its count)",
            )
    return VariableAnswer(
        count=count,
        sum=float(values.sum()),
        sum_sq=float(np.square(values).sum()),
        min=float(values.min()) if extremes else None,
        max=float(values.max()) if extremes else None,
    )


def cell_index(values: np.ndarray, spec: HistogramSpec) -> np.ndarray:
    """0: below ``low``; 1..bins: the bins (the last one includes ``high``); bins + 1: above."""
    edges = np.asarray(spec.edges(), dtype=np.float64)
    index = np.searchsorted(edges, values, side="right")
    index[values == edges[-1]] = spec.bins
    return index


def histogram(values: np.ndarray, per_case: bool, spec: HistogramSpec, k: int) -> HistogramAnswer:
    """Rule 1, 2 (and 5) on one variable's histogram over one split."""
    cases = int(values.shape[0])
    cells = spec.bins + 2
    index = cell_index(values, spec)
    counts = np.bincount(index.reshape(-1), minlength=cells)
    if per_case:
        support = counts
    else:  # images with at least one pixel in each cell
        seen = np.zeros((cases, cells), dtype=bool)
        seen[np.repeat(np.arange(cases), index.shape[1]), index.reshape(-1)] = True
        support = seen.sum(axis=0)
    small = [0 < s < k for s in support.tolist()]
    protected = protect(counts.tolist(), small, k, total_known=cases >= k)
    return HistogramAnswer(low=spec.low, high=spec.high, bins=spec.bins, counts=protected)


def class_cells(split: Split, num_classes: int, task: str, k: int) -> list[Cell]:
    """Cases per class (a partition of the split), or for segmentation the images showing
    each class (they overlap: no released total to derive a cell from)."""
    n = len(split)
    if task == "segmentation":
        flat = split.labels.reshape(n, -1)
        shown = [int((flat == c).any(dim=1).sum()) for c in range(num_classes)]
        return protect(shown, [0 < s < k for s in shown], k, total_known=False)
    counts = torch.bincount(split.labels, minlength=num_classes).tolist()
    return protect(counts, [0 < c < k for c in counts], k, total_known=n >= k)


def foreground(split: Split, k: int) -> ForegroundAnswer:
    """Images with and without foreground (label > 0), and the foreground pixels."""
    n = len(split)
    flat = split.labels.reshape(n, -1) > 0
    with_fg = int(flat.any(dim=1).sum())
    parts = [with_fg, n - with_fg]
    images = protect(parts, [0 < p < k for p in parts], k, total_known=n >= k)
    if n < k or not isinstance(images[0], int):
        return ForegroundAnswer(images=images)
    return ForegroundAnswer(
        images=images, pixels=float(flat.numel()), foreground_pixels=float(flat.sum())
    )


# ------------------------------------------------------------------------------ the answer


def chosen(variables: list[Variable], request: StatsRequest) -> list[Variable]:
    """The requested variables; an unknown name is refused with the names this site has."""
    known = {v.name: v for v in variables}
    asked = list(request.variables) + [h for h in request.histograms if h not in request.variables]
    unknown = [name for name in asked if name not in known]
    if unknown:
        raise ConfigError(
            f"statistics request: unknown feature {unknown[0]!r}; this hospital has "
            f"{', '.join(known)}"
        )
    selected = [known[n] for n in request.variables] if request.variables else list(variables)
    return [v for v in selected if v.is_input] if request.inputs_only else selected


def describe(
    data: HospitalData, run: RunConfig, hospital: HospitalConfig, request: StatsRequest
) -> SiteAnswer:
    """The hospital's answer to ``request`` on its raw (not normalised) data."""
    k, extremes = hospital.stats_min_count, hospital.stats_allow_extremes
    variables = variables_of(data, run)
    selected = chosen(variables, request)
    by_name = {v.name: v for v in variables}
    splits: dict[str, SplitAnswer] = {}
    for name in request.splits:
        split: Split = getattr(data, name)
        values = {v.name: v.values(name, split) for v in selected}
        for extra in request.histograms:
            values.setdefault(extra, by_name[extra].values(name, split))
        splits[name] = SplitAnswer(
            cases=count_cell(len(split), k),
            classes=class_cells(split, run.num_classes, run.task, k),
            variables={v.name: moments(values[v.name], v.per_case, k, extremes) for v in selected}
            if request.moments
            else {},
            histograms={
                var: histogram(values[var], by_name[var].per_case, spec, k)
                for var, spec in request.histograms.items()
            },
            foreground=foreground(split, k) if run.task == "segmentation" else None,
        )
    tabular = data.train.inputs.ndim == 2
    return SiteAnswer(
        hospital=hospital.hospital,
        kind="tabular" if tabular else "image",
        task=run.task,
        min_count=k,
        extremes=extremes,
        inputs=[v.name for v in variables if v.is_input],
        shape=[int(s) for s in data.train.inputs.shape[1:]],
        splits=splits,  # type: ignore[arg-type]
    )


__all__ = ["SPLITS", "Variable", "describe", "protect", "variables_of"]
