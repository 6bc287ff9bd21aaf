"""The example workflows in example_workflows/ are exactly what demo/workflows.py writes."""

from __future__ import annotations

import json

from harness import node_io, pack_import

workflows = pack_import("demo.workflows")


def test_committed_example_workflows_are_up_to_date():
    expected = workflows.example_workflows(node_io)
    committed = {path.name: json.loads(path.read_text()) for path in workflows.EXAMPLES_DIR.glob("*.json")}
    assert committed == expected, "regenerate: .venv/bin/python demo/run_demo.py --write-workflows"


def test_ui_workflows_link_every_socket_and_fill_every_widget():
    for name, workflow in workflows.example_workflows(node_io).items():
        by_id = {node["id"]: node for node in workflow["nodes"]}
        for link_id, source, slot, target, target_slot, kind in workflow["links"]:
            assert link_id in by_id[source]["outputs"][slot]["links"], name
            assert by_id[target]["inputs"][target_slot]["link"] == link_id, name
            assert by_id[source]["outputs"][slot]["type"] == kind, name
        for node in workflow["nodes"]:
            inputs, _ = node_io(node["type"])
            sockets = [n for n, kind in inputs if kind.isupper() and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")]
            widgets = len(inputs) - len(sockets) + (1 if any(n == "seed" for n, _ in inputs) else 0)
            assert len(node["widgets_values"]) == widgets, (name, node["type"])
            assert [i["name"] for i in node["inputs"]] == sockets, (name, node["type"])


def test_every_example_workflow_has_its_template_thumbnail():
    """The template browser shows a custom node's example `<name>.json` with `<name>.jpg`
    (docs/make_screenshots.py makes them)."""
    for path in workflows.EXAMPLES_DIR.glob("*.json"):
        assert path.with_suffix(".jpg").is_file(), f"no thumbnail for {path.name}"
