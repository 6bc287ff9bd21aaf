"""What users read against the code: help pages (web/docs/), node descriptions and docs/ name the
defaults, models and architectures the code has (links between the documents: test_links.py)."""

from __future__ import annotations

import re
from pathlib import Path

import nodes
import pytest
from harness import PACK, pack_import
from harness.models import build_model

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


# --- The facts the descriptions, help pages and README state, against the code (issue 32) ---

REPO = DOCS.parents[1]
README = (REPO / "README.md").read_text()
NODES_PAGE = (REPO / "docs" / "nodes.md").read_text()  # the table of every node and its options
SOURCES = [path for pattern in ("*.py", "*.md", "*.js") for path in REPO.rglob(pattern)
           if not any(part.startswith(".") for part in path.relative_to(REPO).parts)]


def _node_texts(node_id: str) -> dict[str, str]:
    """What a user reads about a node: its description, its help page, its row in docs/nodes.md."""
    schema = nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
    row = next(line for line in NODES_PAGE.splitlines() if line.startswith(f"| **{schema.display_name}**"))
    return {"description": schema.description, "help page": (DOCS / f"{node_id}.md").read_text(), "docs/nodes.md": row}


def test_clear_distillation_names_the_models_it_trains():
    """It trains the SD3 and FLUX test models and refuses Wan; each text names what it trains."""
    distill = pack_import("patching.clear_distill")
    assert distill.trainable_for(build_model("sd3")).deltas and distill.trainable_for(build_model("flux")).deltas
    with pytest.raises(ValueError, match=re.escape(distill.DISTILLED_MODELS)):
        distill.trainable_for(build_model("wan"))
    for where, text in _node_texts("FastAttnClearDistill").items():
        assert distill.DISTILLED_MODELS in " ".join(text.split()), f"{where} does not name {distill.DISTILLED_MODELS}"


def test_the_architectures_said_to_share_only_attention_calls_are_the_adapters_without_a_branch_map():
    """"Every served architecture but X" skips whole branches: X must be the adapters with no
    projection map (by their name or a longer name starting with it, e.g. "Cosmos 1.0")."""
    adapters = pack_import("patching.adapters").ADAPTERS
    call_level = {adapter.name for adapter in adapters if adapter.projections is None}
    texts = {"README": README, **{f"docs/{p.name}": p.read_text() for p in (REPO / "docs").glob("*.md")},
             **{f"web/docs/{p.name}": p.read_text() for p in DOCS.glob("*.md")},
             **{f"{n} description": nodes.NODE_CLASS_MAPPINGS[n].define_schema().description or ""
                for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("FastAttn")}}
    claims = [(where, m.group(1)) for where, text in texts.items()
              for m in re.finditer(r"every served (?:architecture|model) but ([\w .-]+?)(?=[;:,)]| \(|\. |\.?$)",
                                   " ".join(text.split()))]
    assert claims, "no text says which architectures skip whole attention branches"
    for where, named in claims:
        names = {name.strip() for name in re.split(r",| and ", named)}
        matched = {adapter for name in names for adapter in call_level if name.startswith(adapter)}
        assert matched == call_level and len(matched) == len(names), \
            f"{where} says every architecture but {named!r} skips whole branches; the code: all but {sorted(call_level)}"


def test_no_file_cites_a_markdown_file_the_repository_does_not_have():
    """The project's method reference and design notes live outside the repository: a docstring
    must not send a reader to them."""
    present = {path.name for path in REPO.rglob("*.md")} | {"e2e_gpu.md"}  # the last: bench_e2e_gpu.py's output
    cited = {(path.relative_to(REPO).as_posix(), name) for path in SOURCES
             for name in re.findall(r"\b([A-Za-z][\w-]*\.md)\b", path.read_text(errors="replace"))}
    assert sorted((where, name) for where, name in cited if name not in present) == []
