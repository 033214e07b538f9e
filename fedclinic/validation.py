"""Checks a hospital's model update must pass before the coordinator aggregates it.

A single bad update (a diverged site, a bug, a tampered node) would poison the global model of
every hospital, so the coordinator refuses — with the reason in the results and audit log —
an update that has non-finite values, keys/shapes/dtypes other than the model's, or a norm far
beyond the other hospitals' updates of the same round.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: ``name -> (shape, dtype)`` of every array an update must carry
UpdateSpec = dict[str, tuple[tuple[int, ...], str]]


def spec_of(arrays: Mapping[str, np.ndarray]) -> UpdateSpec:
    """The keys, shapes and dtypes of a model, as the update spec."""
    return {name: (tuple(a.shape), str(a.dtype)) for name, a in arrays.items()}


def structure_problem(arrays: Mapping[str, np.ndarray], spec: UpdateSpec | None) -> str | None:
    """Why the update cannot be aggregated (wrong keys, shapes, dtypes, NaN/Inf), or None.

    ``spec=None`` (an algorithm whose uploads vary in layout) checks finiteness only.
    """
    if spec is not None:
        missing = sorted(set(spec) - set(arrays))
        extra = sorted(set(arrays) - set(spec))
        if missing or extra:
            parts = [
                f"missing keys {_few(missing)}" if missing else "",
                f"unexpected keys {_few(extra)}" if extra else "",
            ]
            return "update " + " and ".join(p for p in parts if p)
        for name, (shape, dtype) in spec.items():
            got = arrays[name]
            if tuple(got.shape) != shape:
                return f"update '{name}' has shape {tuple(got.shape)}, expected {shape}"
            if str(got.dtype) != dtype:
                return f"update '{name}' has dtype {got.dtype}, expected {dtype}"
    for name, values in arrays.items():
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            return f"update '{name}' has {bad} NaN/Inf value(s)"
    return None


def update_norm(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of (update - the model the hospital received) over the floating-point arrays
    both share; the size of the step the hospital took."""
    total = 0.0
    for name, values in arrays.items():
        sent = reference.get(name)
        if sent is None or sent.shape != values.shape:
            continue
        if np.issubdtype(values.dtype, np.floating):
            delta = values.astype(np.float64) - sent.astype(np.float64)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return float(np.sqrt(total))


def norm_outliers(norms: Mapping[str, float], max_ratio: float) -> dict[str, str]:
    """Hospitals whose update norm exceeds ``max_ratio`` x the median norm of the round.

    The median, not the mean, so that the outlier itself cannot raise the bar; it needs at
    least three updates to tell an outlier from a disagreement (with two, nothing is refused).
    ``max_ratio <= 0`` turns the check off.
    """
    if max_ratio <= 0 or len(norms) < 3:
        return {}
    median = float(np.median(list(norms.values())))
    bound = max_ratio * median
    return {
        name: (
            f"update norm {norm:.4g} is more than max-update-norm-ratio = {max_ratio:g} x the "
            f"round's median update norm {median:.4g}"
        )
        for name, norm in norms.items()
        if norm > bound and norm > 0
    }


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
