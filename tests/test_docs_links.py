"""Every relative link in the repository's Markdown points at a file or folder that exists.

Why: docs/fedhelp.md and docs/pfednet.md sent readers to a results page (``bench/skew``) that
was never committed; the evidence for a default must be where the page says it is.
"""

from __future__ import annotations

import re

from test_docs_citations import ROOT, tracked

#: ``[text](target)``; images too. Targets with a scheme (``https:``, ``mailto:``) and pure
#: anchors (``#section``) are not files.
LINK = re.compile(r"\]\(\s*([^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def relative_links(text: str) -> list[str]:
    """The file part of every relative link in a Markdown text, code blocks left out."""
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    targets = [m.group(1) for m in LINK.finditer(prose)]
    return [t.split("#", 1)[0] for t in targets if not EXTERNAL.match(t) and not t.startswith("#")]


def test_relative_links_are_found() -> None:
    assert relative_links("see [a](docs/a.md#x), [b](https://x.org/b.md), [c](#c)") == ["docs/a.md"]
    assert relative_links('```\n[a](nowhere.md)\n```\n[b](../b.md "title")') == ["../b.md"]


def test_every_relative_markdown_link_resolves() -> None:
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in tracked(".md")
        for target in relative_links(page.read_text(encoding="utf-8"))
        if target and not (page.parent / target).exists()
    ]
    assert broken == [], "links to files that do not exist:\n" + "\n".join(broken)
