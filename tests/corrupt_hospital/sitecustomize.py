"""A deliberately corrupt hospital, for real-process tests only (never shipped in the FAB).

Put this directory first on ONE hospital's ``PYTHONPATH`` (``HospitalSpec.env``): Python
imports ``sitecustomize`` at start-up in every process of that hospital (SuperNode,
SuperExec, its site worker, each ``flwr-clientapp``), and this one wraps
``ClientObjective.respond`` of ``strategies.base`` when that module is imported, so the
hospital trains honestly and then uploads a corrupted update. The site worker imports
``strategies.base`` from the installation; a ClientApp answering in process imports it from
the FAB it installed under ``$FLWR_HOME/apps/`` (put first on ``sys.path`` by Flower,
shadowing the checkout): the wrapper is applied by an import hook, whichever copy is
loaded, so the shipped code carries no test switch.

``FEDCLINIC_CORRUPTION`` says what to do in which training round, e.g. ``1=nan,2=scale``:

- ``nan``: the first element of the first floating-point array becomes NaN;
- ``scale``: every floating-point array x 1000 (an outsized update norm);
- ``shape``: the first floating-point array loses its last element (a wrong shape).

The wrapping (with the file it wrapped) and each corruption are written to stderr, that is
the hospital's log, as ``corrupt hospital: ...`` lines.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

TARGET = "strategies.base"
VARIABLE = "FEDCLINIC_CORRUPTION"
KINDS = ("nan", "scale", "shape")


def plan() -> dict[int, str]:
    """``FEDCLINIC_CORRUPTION`` as round -> kind."""
    rounds: dict[int, str] = {}
    for item in os.environ.get(VARIABLE, "").split(","):
        if item.strip():
            number, _, kind = item.partition("=")
            if kind.strip() not in KINDS:
                raise ValueError(f"{VARIABLE}: {item!r}: expected ROUND=" + "|".join(KINDS))
            rounds[int(number)] = kind.strip()
    return rounds


def corrupt(arrays: dict[str, Any], kind: str) -> dict[str, Any]:
    """A corrupted copy of an update (name -> numpy array)."""
    import numpy as np

    floats = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating)]
    changed = dict(arrays)
    if kind == "nan":
        changed[floats[0]] = arrays[floats[0]].copy()
        changed[floats[0]].flat[0] = np.nan
    elif kind == "scale":
        changed.update({k: arrays[k] * 1000 for k in floats})
    else:  # shape
        changed[floats[0]] = arrays[floats[0]].ravel()[:-1].copy()
    return changed


def patch(module: ModuleType) -> None:
    """Wrap ``module.ClientObjective.respond``: corrupt the uploaded arrays per the plan."""
    from fedclinic.serialization import numpy_to_record, record_to_numpy

    objective = module.ClientObjective
    respond = objective.respond

    def corrupted_respond(self: Any, content: Any, train: bool) -> Any:
        reply = respond(self, content, train)
        kind = plan().get(self.context.server_round) if train else None
        if kind and "arrays" in reply.array_records:
            arrays = corrupt(record_to_numpy(reply.array_records["arrays"]), kind)
            reply["arrays"] = numpy_to_record(arrays)
            print(
                f"corrupt hospital: {self.context.hospital.hospital} round "
                f"{self.context.server_round}: {kind} update uploaded",
                file=sys.stderr,
                flush=True,
            )
        return reply

    objective.respond = corrupted_respond
    print(f"corrupt hospital: wrapped {TARGET} from {module.__file__}", file=sys.stderr, flush=True)


class PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then :func:`patch`; everything else is the real loader's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        patch(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... for tracebacks
        return getattr(self.inner, name)


class PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds ``strategies.base`` wherever the other finders would (FAB or checkout)."""

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = PatchingLoader(spec.loader)
                return spec
        return None


if plan():
    sys.meta_path.insert(0, PatchingFinder())
