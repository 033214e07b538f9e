"""Every citation in the repository resolves inside it (or to a public paper / repository).

Why: code and docs once cited a specification file and paths that only existed on one
machine. Decision IDs (FH-n, PF-n, MAS-n) are short handles; each must be defined in the
"Decisions" table of its algorithm's docs page, and every module that uses one must point
to that page.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: built from parts so that this file does not match its own patterns
FORBIDDEN = ("ALGORITHMS" + ".md", "/" + "work/", "REFERENCE-RESULTS" + ".md")
DECISION_ID = re.compile(r"\b(FH|PF|MAS)-\d+\b")
PAGES = {"FH": "docs/fedhelp.md", "PF": "docs/pfednet.md", "MAS": "docs/fedmas.md"}
PAPERS = {"FH": "2412.19654", "PF": "2306.14483", "MAS": "2307.14959"}
#: a row of the Decisions table: ``| <a id="fh-3"></a>FH-3 | ... | ... |``
ROW = re.compile(r'^\|\s*<a id="(?P<anchor>[a-z]+-\d+)"></a>(?P<id>(?:FH|PF|MAS)-\d+)\s*\|')


def tracked(*suffixes: str) -> list[Path]:
    """The repository's tracked files with these suffixes (what a reader of the repository sees)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    names = [n for n in listed.split("\0") if n.endswith(suffixes)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


def sources() -> list[Path]:
    """Code, docs and build files: where a reader follows a citation."""
    return tracked(".py", ".md", ".toml", ".yml", ".yaml", "Makefile", "Dockerfile")


def decisions_section(page: Path) -> list[str]:
    """The lines of the page's ``## Decisions`` section (up to the next ``## `` heading)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    assert "## Decisions" in lines, f"{page.name}: no '## Decisions' section"
    start = lines.index("## Decisions") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def defined_ids(prefix: str) -> set[str]:
    rows = [ROW.match(line) for line in decisions_section(ROOT / PAGES[prefix])]
    found = {m["id"] for m in rows if m}
    for m in filter(None, rows):
        assert m["anchor"] == m["id"].lower(), f"{PAGES[prefix]}: anchor {m['anchor']!r}"
    return found


def test_no_citation_of_files_outside_the_repository() -> None:
    offending = [
        f"{path.relative_to(ROOT)}:{number}: {needle}"
        for path in sources()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        for needle in FORBIDDEN
        if needle in line
    ]
    assert not offending, "cite the paper or a docs/ page instead:\n" + "\n".join(offending)


@pytest.mark.parametrize("prefix", sorted(PAGES))
def test_decisions_table_cites_the_paper(prefix: str) -> None:
    section = "\n".join(decisions_section(ROOT / PAGES[prefix]))
    assert f"arXiv {PAPERS[prefix]}" in section
    assert defined_ids(prefix), f"{PAGES[prefix]}: the Decisions table has no rows"


def test_every_decision_id_used_is_defined() -> None:
    defined = {prefix: defined_ids(prefix) for prefix in PAGES}
    undefined = sorted(
        f"{path.relative_to(ROOT)}: {m.group(0)} (not in {PAGES[m.group(1)]}#decisions)"
        for path in sources()
        for m in DECISION_ID.finditer(path.read_text(encoding="utf-8"))
        if m.group(0) not in defined[m.group(1)]
    )
    assert not undefined, "\n".join(undefined)


def test_modules_using_decision_ids_point_to_their_page() -> None:
    missing = sorted(
        f"{path.relative_to(ROOT)}: uses {prefix}-n but never names {PAGES[prefix]}"
        for path in tracked(".py")
        if path.name != Path(__file__).name
        for prefix in {m.group(1) for m in DECISION_ID.finditer(path.read_text("utf-8"))}
        if PAGES[prefix] not in path.read_text(encoding="utf-8")
    )
    assert not missing, "\n".join(missing)
