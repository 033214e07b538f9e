"""The import graph of the first-party code: no cycles, and layers that only point down.

core (``fedclinic`` without its apps) <- algorithms (``strategies``) <- apps (``server``,
``client``, ``fedclinic.cli``, ``fedclinic.local``, ``fedclinic.bench``, ``fedclinic.operate``,
``fedclinic.hospital``, and the other commands' modules: ``APPS`` below). The graph comes
from grimp (import-linter's import parser), which reads every import in a module, those
inside functions included, so an import moved into a function to dodge a cycle is still seen.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("fedclinic", "strategies", "server", "client")
APPS = (
    "server",
    "client",
    "fedclinic.cli",
    "fedclinic.local",
    "fedclinic.bench",
    "fedclinic.operate",
    "fedclinic.hospital",
    "fedclinic.certs",
    "fedclinic.coordinator",
    "fedclinic.dashboard",
    "fedclinic.datasets",
    "fedclinic.stats.command",
    "fedclinic.worker",
    "fedclinic.superlink",  # the launchers of Flower's daemons
    "fedclinic.supernode",
)
ALGORITHMS = ("strategies",)


def within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> int:
    """0 = core, 1 = algorithms, 2 = apps."""
    if within(module, APPS):
        return 2
    if within(module, ALGORITHMS):
        return 1
    return 0


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    built = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert "fedclinic.training" in built.modules and "strategies.fedhelp" in built.modules
    return built


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check itself: a graph with a -> b -> c -> a and d -> a has one cycle."""
    fake = grimp.ImportGraph()
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")):
        fake.add_import(importer=importer, imported=imported)
    assert cycles(fake) == [["a", "b", "c"]]


def test_first_party_modules_import_no_cycle(graph: grimp.ImportGraph) -> None:
    found = cycles(graph)
    chains = []
    for component in found:
        there = graph.find_shortest_chain(component[0], component[1]) or (component[0],)
        back = graph.find_shortest_chain(component[1], component[0]) or (component[1],)
        chains.append(" -> ".join([*there, *back[1:]]))
    assert not found, "import cycles: " + "; ".join(
        f"{', '.join(c)} (e.g. {chain})" for c, chain in zip(found, chains, strict=True)
    )


def test_layers_only_point_down(graph: grimp.ImportGraph) -> None:
    """Core imports neither algorithms nor apps; algorithms import no app."""
    names = {0: "core", 1: "algorithm", 2: "app"}
    upward = sorted(
        f"{module} ({names[layer(module)]}) imports {imported} ({names[layer(imported)]})"
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if layer(imported) > layer(module)
    )
    assert not upward, "\n".join(upward)
