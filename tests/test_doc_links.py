"""Every relative link in the README and docs/ resolves to a file inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_MD_PATH = re.compile(r"`([^`\s]*\.md)`")  # a doc named in backticks, e.g. `docs/x.md`


def _targets(text: str) -> list[str]:
    links = [t for t in MD_LINK.findall(text) if not re.match(r"[a-z]+:", t) and
             not t.startswith("#")]
    return links + [t for t in CODE_MD_PATH.findall(text) if "/" in t]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_resolve_inside_repo(doc):
    bad = []
    for target in _targets(doc.read_text()):
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists() or REPO not in path.parents and path != REPO:
            bad.append(target)
    assert not bad, f"{doc.name}: links that do not resolve inside the repository: {bad}"


def test_the_check_sees_a_broken_link():
    assert _targets("see `../shared/REFERENCE.md` and [x](missing.md) and [y](https://a.b)") == [
        "missing.md", "../shared/REFERENCE.md"]
