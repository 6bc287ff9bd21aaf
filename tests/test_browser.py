"""The pack in ComfyUI's real web frontend (headless Chromium against a real server): every
example workflow loads with all its nodes and widget values and no console error, every node of
the pack is found by its display name in the node search and shows, on hover, the description
and tooltips its definition gives, a demo workflow queued from the Run button shows its image,
and the reports (Calibrate's cost table too) appear on their nodes."""

from __future__ import annotations

import json

import pytest
from harness import pack_import, pack_nodes
from harness.browser import FRONTENDS, api_differences, frontend_args, frontend_version, open_frontend
from harness.server import ComfyServer

workflows = pack_import("demo.workflows")
ABSENT_WEIGHTS = frozenset(file for files in workflows.MODEL_FILES.values() for _, file in files)
NODES = pack_nodes()  # every node of the pack, as the pack defines it
TOOLTIP_INPUT = {
    "FastAttnInspector": "latent", "FastAttnReport": "samples", "FastAttnWindowResidual": "window_fraction",
    "FastAttnStepSharing": "compute_every", "FastAttnCFGSharing": "start_percent", "FastAttnCalibrate": "delta",
    "FastAttnApplyPlan": "plan", "FastAttnClearAttention": "radius", "FastAttnClearWeightsLoader": "radius",
    "FastAttnClearDistill": "positive", "FastAttnDemoTextEncode": "caption", "FastAttnDemoDecode": "samples",
    "FastAttnDeepCache": "cache_interval", "FastAttnDemoUNetTextEncode": "caption", "FastAttnCompare": "view",
    "FastAttnDemoLoader": "model", "FastAttnPromptBatch": "conditioning_1",
}  # node -> the input whose tooltip is checked: a widget litegraph draws, a socket, or a text box


def _defined_tooltip(node_type: str, name: str) -> str:
    """The tooltip the node's own definition gives input `name` (not what the server sent)."""
    types = NODES[node_type].INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}[name][1]["tooltip"]


@pytest.fixture(scope="module", params=FRONTENDS)
def frontend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(tmp_path_factory, frontend):
    with ComfyServer(tmp_path_factory.mktemp("browser"), extra_args=frontend_args(frontend)) as running:
        yield running


@pytest.fixture(scope="module")
def page(server):
    with open_frontend(server) as frontend:
        yield frontend


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


def test_the_page_starts_without_errors_from_the_pack(page, frontend):
    """The host itself logs a few start-up errors on a fresh user folder (404s for user.css and
    userdata, a settings lookup); none may come from the pack."""
    assert page.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == frontend_version(frontend)
    ours = [line for line in page.console if "fastattn" in line.lower()]
    assert ours == []
    assert page.page.evaluate("() => window.app.extensionManager !== undefined")
    assert page.page.evaluate("() => window.app.extensions.some((e) => e.name === 'FastAttn.ShowReport')")


@pytest.mark.parametrize("name", sorted(workflows.example_graphs()))
def test_every_example_workflow_loads_cleanly(page, name):
    workflow = json.loads((workflows.EXAMPLES_DIR / name).read_text())
    assert page.load(workflow, name, absent_files=ABSENT_WEIGHTS) == []
    graph, _ = workflows.example_graphs()[name]
    assert api_differences(graph, page.api_graph()) == []


def test_every_node_of_the_pack_has_its_tooltip_checked():
    assert set(TOOLTIP_INPUT) == set(NODES)


@pytest.mark.parametrize("node_type", list(TOOLTIP_INPUT))
def test_our_nodes_are_found_by_display_name_with_tooltips(page, node_type):
    """Found in the node search by the display name the node defines; hovering over its title and
    over an input shows the description and tooltip the node defines."""
    schema = NODES[node_type].define_schema()
    found = page.search(schema.display_name)
    assert any(option.startswith(schema.display_name) for option in found), found
    page.page.evaluate("(t) => { const n = window.LiteGraph.createNode(t); n.pos = [200, 200]; "
                       "window.app.graph.add(n); }", node_type)
    page.page.wait_for_timeout(300)
    node_id = page.node_id(node_type)
    name = TOOLTIP_INPUT[node_type]
    in_the_page = page.page.evaluate("([id, n]) => !!window.app.graph.getNodeById(id).widgets?.some("
                                     "(w) => w.name === n && w.element)", [node_id, name])
    if in_the_page:  # a text box the page draws (no hover tooltip): the node data the frontend built
        shown = page.page.evaluate("([id, n]) => window.app.graph.getNodeById(id).constructor.nodeData"
                                   ".inputs[n].tooltip", [node_id, name])
    else:
        shown = page.tooltip(node_id, name)
    assert shown == _defined_tooltip(node_type, name)
    assert page.tooltip(node_id, None) == schema.description


def test_a_demo_workflow_queued_from_the_page_shows_its_image_and_report(page):
    page.load(json.loads((workflows.EXAMPLES_DIR / "fastattn_demo_combined.json").read_text()), "combined")
    page.set_widgets("EmptySD3LatentImage", width=128, height=128)  # small and quick, as a user might
    page.set_widgets("KSampler", steps=3)
    entry = page.run()
    assert entry["status"]["status_str"] == "success", entry["status"]
    save = page.node_id("SaveImage")
    shown = page.page.evaluate("(id) => (window.app.graph.getNodeById(id).imgs || [])"
                               ".map((img) => [img.src, img.complete, img.naturalWidth])", save)
    assert len(shown) == 1 and shown[0][1] and shown[0][2] == 32, shown  # 128 px empty latent -> 32 px image
    assert "/view?filename=fastattn_demo_combined" in shown[0][0]
    assert "attention FLOPs computed" in page.shown_text(page.node_id("FastAttnReport"))
    assert "image 1: PSNR " in page.shown_text(page.node_id("FastAttnCompare"))


def test_the_calibrate_cost_table_appears_on_its_node(page):
    page.load(json.loads((workflows.EXAMPLES_DIR / "fastattn_demo_calibrate.json").read_text()), "calibrate")
    page.set_widgets("EmptySD3LatentImage", width=128, height=128)
    page.set_widgets("FastAttnCalibrate", steps=2)
    page.set_widgets("KSampler", steps=2)
    entry = page.run()
    assert entry["status"]["status_str"] == "success", entry["status"]
    shown = page.shown_text(page.node_id("FastAttnCalibrate"))
    assert "Price per attention call of each candidate" in shown and "| layers " in shown, shown


def test_the_inspector_report_appears_on_its_node(page, frontend):
    """Read from the text box on the screen, in each node renderer the frontend has (the newest
    also draws nodes with Vue, the renderer that treats widgets differently)."""
    page.load(json.loads((workflows.EXAMPLES_DIR / "fastattn_attention_inspector.json").read_text()), "inspector")
    entry = page.run()
    assert entry["status"]["status_str"] == "success", entry["status"]
    inspector = page.node_id("FastAttnInspector")
    shown = {"canvas": page.shown_text(inspector)}
    if frontend == "newest":  # the pinned frontend has no Vue renderer
        page.use_vue_nodes(True)
        shown["vue"] = page.shown_text(inspector)
        page.use_vue_nodes(False)
    for text in shown.values():
        assert "Image tokens: 4096 (grid 64 x 64)" in text and "Attention layers per forward: 4" in text, shown


def test_a_new_calibrate_node_starts_with_a_fixed_seed(page):
    """So that queueing a calibration workflow again does not recalibrate; other nodes keep the
    frontend's own default."""
    page.page.evaluate("() => window.app.graph.clear()")
    controls = {}
    for node_type in ("FastAttnCalibrate", "KSampler"):
        controls[node_type] = page.page.evaluate("""(t) => { const n = window.LiteGraph.createNode(t);
            window.app.graph.add(n);
            return n.widgets.filter((w) => w.name === 'control_after_generate').map((w) => w.value); }""", node_type)
    assert controls == {"FastAttnCalibrate": ["fixed"], "KSampler": ["randomize"]}


def test_node_help_pages_are_served_for_every_node(server, object_info):
    """The frontend's node library opens /extensions/<pack>/docs/<node>.md for a custom node."""
    ours = [name for name, spec in object_info.items() if spec["python_module"].endswith("comfyui_fastattn")]
    assert set(ours) == set(NODES)
    for name in ours:
        with server.open(f"/extensions/comfyui_fastattn/docs/{name}.md") as response:
            text = response.read().decode()
        assert text.startswith("# " + object_info[name]["display_name"]), name
        for input_name in object_info[name]["input_order"]["required"]:
            assert f"`{input_name}`" in text, f"docs/{name}.md does not describe {input_name}"
