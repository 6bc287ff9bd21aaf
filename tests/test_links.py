"""Every link between the project's documents leads somewhere: README.md, BENCHMARKS.md and docs/
send readers to each other's sections, and a moved section must not leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md"),
                    *(REPO / "web" / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def local_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", target)]


def test_anchor_follows_github():
    assert anchor("Whole sampling runs on a GPU (issue 31; not yet run)") == \
        "whole-sampling-runs-on-a-gpu-issue-31-not-yet-run"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_local_link_resolves(document: Path):
    dead = []
    for target in local_links(document):
        file, _, section = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        if not linked.exists():
            dead.append(f"{target}: no file {linked}")
        elif section and linked.suffix == ".md" and section not in anchors(linked):
            dead.append(f"{target}: no heading with anchor #{section} in {linked.name}")
    assert dead == []
