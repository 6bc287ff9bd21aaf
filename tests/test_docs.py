"""The node help pages (web/docs/) against the node definitions: what they recommend is what a
new node starts with."""

from __future__ import annotations

import re
from pathlib import Path

import nodes
import pytest
from harness import PACK

DOCS = Path(PACK.__file__).resolve().parent / "web" / "docs"


def _defaults(node_id: str) -> dict[str, object]:
    spec = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    return {name: entry[1].get("default") for section in ("required", "optional")
            for name, entry in spec.get(section, {}).items() if len(entry) > 1}


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md") if "## Recommended" in p.read_text()))
def test_recommended_settings_are_the_defaults(page):
    recommended = (DOCS / page).read_text().split("## Recommended", 1)[1]
    defaults = _defaults(page.removesuffix(".md"))
    pairs = [(name, float(value)) for name, value in re.findall(r"`(\w+)` ([\d.]+)", recommended) if name in defaults]
    assert pairs, f"{page}: no recommended input value found"
    for name, value in pairs:
        assert defaults[name] == value, f"{page} recommends {name} {value}, the node's default is {defaults[name]}"
