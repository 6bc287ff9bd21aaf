"""Screenshots of the example workflows in ComfyUI's real web frontend, checked as a person would.

    .venv/bin/python docs/make_screenshots.py

Needs a Chromium at /usr/bin/chromium (Debian: `apt-get install chromium`; override with
CHROMIUM=/path) and the `playwright` Python package in the project venv (`.venv/bin/pip install
playwright`; no `playwright install`, the system Chromium is used). A manual tool, not part of
`make test`.

It starts a headless ComfyUI with the pack (tests/harness), opens the frontend, and for every
example_workflows/*.json: loads it with `app.loadGraphData`, collects console errors and any
dialog (e.g. missing nodes), checks every node is a registered type, every link is connected,
and that the frontend turns the loaded graph into exactly the API graph demo/workflows.py
defines (`app.graphToPrompt()`: widget values landed in the right widgets), fits the graph to
the view and saves docs/workflows/<name>.png. Then it queues the Attention Inspector workflow
from the UI's Run button and saves docs/workflows/inspector_result.png with its report.
Exits non-zero if any workflow failed a check.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from harness.server import ComfyServer  # noqa: E402  (loads the ComfyUI host in-process)
from playwright.async_api import Error as PlaywrightError  # noqa: E402
from playwright.async_api import Page, async_playwright  # noqa: E402

from demo.workflows import EXAMPLES_DIR, demo_graph, inspector_graph  # noqa: E402

OUT_DIR = ROOT / "docs" / "workflows"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}
INSPECTOR = "fastattn_attention_inspector.json"
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Minimap.Visible": False,
    # Fitting a 6-column graph into 1600 px zooms to ~0.6, where litegraph would draw blank boxes.
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2,
}

# Every node as the frontend sees it after loading.
NODES_JS = """() => window.app.graph.nodes.map((n) => ({
    id: n.id, type: n.type, title: n.title,
    registered: !!(n.constructor && n.constructor.nodeData), has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map((w) => ({name: w.name, value: w.value,
        in_choices: Array.isArray(w.options?.values) ? w.options.values.includes(w.value) : null})),
    inputs: (n.inputs || []).map((i) => ({name: i.name, type: i.type, link: i.link, widget: !!i.widget})),
    outputs: (n.outputs || []).map((o) => ({name: o.name, type: o.type, links: o.links || []})),
}))"""

# Texts of open dialogs and toasts (the missing-nodes warning is a dialog).
DIALOGS_JS = """() => [...document.querySelectorAll('.p-dialog, .p-toast-message, [role="dialog"]')]
    .map((d) => d.innerText.trim()).filter((t) => t)"""

LOAD_JS = "([wf, name]) => window.app.loadGraphData(wf, true, true, name)"

CLOSE_DIALOGS_JS = """() => document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')
    .forEach((b) => b.click())"""


def expected_api(name: str) -> dict:
    """The API graph this example is written from, keyed by the UI node ids `to_ui` gives."""
    if name == INSPECTOR:
        graph = inspector_graph()
    else:
        graph = demo_graph(name.removeprefix("fastattn_demo_").removesuffix(".json"))
    ids = {key: str(index + 1) for index, key in enumerate(graph)}
    return {ids[key]: {"class_type": node["class_type"],
                       "inputs": {k: [ids[v[0]], v[1]] if isinstance(v, list) else v
                                  for k, v in node["inputs"].items()}}
            for key, node in graph.items()}


def compare(expected: dict, got: dict) -> list[str]:
    problems = []
    for node_id in sorted(set(expected) | set(got), key=int):
        want, have = expected.get(node_id), got.get(node_id)
        if want is None or have is None:
            problems.append(f"node {node_id}: expected {want and want['class_type']}, "
                            f"frontend gave {have and have['class_type']}")
            continue
        for key in sorted(set(want["inputs"]) | set(have["inputs"])):
            a, b = want["inputs"].get(key, "<absent>"), have["inputs"].get(key, "<absent>")
            if a != b and not (isinstance(a, float | int) and isinstance(b, float | int) and abs(a - b) < 1e-9):
                problems.append(f"node {node_id} {want['class_type']}.{key}: expected {a!r}, frontend gave {b!r}")
    return problems


async def fit_view(page: Page, node_ids: list[int] | None = None, max_scale: float = 1.2) -> None:
    """Zoom and pan so the given nodes (all by default) fill the canvas left free by the menus."""
    await page.evaluate("""([ids, maxScale]) => {
        const canvas = window.app.canvas, graph = window.app.graph;
        const nodes = ids ? ids.map((id) => graph.getNodeById(id)) : graph.nodes;
        const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
        const left = Math.min(...nodes.map((n) => n.pos[0])) - 10;
        const top = Math.min(...nodes.map((n) => n.pos[1])) - title - 24;
        const right = Math.max(...nodes.map((n) => n.pos[0] + n.size[0])) + 10;
        const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1])) + 10;
        const ratio = window.devicePixelRatio || 1;
        // The side bar (~60 px) and the top menu and Run bar (~110 px) cover the canvas.
        const x0 = 60, y0 = 110, width = canvas.canvas.width / ratio - x0 - 20;
        const height = canvas.canvas.height / ratio - y0 - 20;
        const scale = Math.min(maxScale, width / (right - left), height / (bottom - top));
        canvas.ds.scale = scale;
        canvas.ds.offset = [x0 / scale + (width / scale - (right - left)) / 2 - left,
                            y0 / scale + (height / scale - (bottom - top)) / 2 - top];
        canvas.setDirty(true, true);
    }""", [node_ids, max_scale])
    await page.wait_for_timeout(800)


async def check_workflow(page: Page, path: Path, console: list[str]) -> list[str]:
    workflow = json.loads(path.read_text())
    console.clear()
    await page.evaluate(CLOSE_DIALOGS_JS)
    await page.evaluate(LOAD_JS, [workflow, path.stem])
    await page.wait_for_timeout(1500)
    problems = [f"console: {line}" for line in console]
    problems += [f"dialog: {text[:300]!r}" for text in await page.evaluate(DIALOGS_JS)]
    nodes = await page.evaluate(NODES_JS)
    if len(nodes) != len(workflow["nodes"]):
        problems.append(f"{len(nodes)} nodes on the canvas, {len(workflow['nodes'])} in the file")
    for node in nodes:
        label = f"node {node['id']} {node['type']}"
        if not node["registered"] or node["has_errors"]:
            problems.append(f"{label}: not a registered node type (missing node)")
        for item in node["inputs"]:
            if item["link"] is None and not item["widget"]:
                problems.append(f"{label}: input {item['name']} not connected")
        for widget in node["widgets"]:
            if widget["in_choices"] is False:
                problems.append(f"{label}: {widget['name']}={widget['value']!r} is not one of its choices")
    try:
        prompt = await page.evaluate("async () => (await window.app.graphToPrompt()).output")
        problems += compare(expected_api(path.name), prompt)
    except PlaywrightError as error:  # e.g. InvalidLinkError for a link the frontend dropped
        problems.append(f"app.graphToPrompt() failed: {error.message.splitlines()[0]}")
    await fit_view(page)
    await page.screenshot(path=str(OUT_DIR / f"{path.stem}.png"))
    print(f"{path.name}: {len(nodes)} nodes, " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    for node in nodes:
        print("   ", node["id"], node["type"], [(w["name"], w["value"]) for w in node["widgets"]])
    for problem in problems:
        print("  PROBLEM:", problem)
    return problems


async def run_from_ui(page: Page, server: ComfyServer) -> dict:
    """Click the Run button (or make the call it makes) and wait for the prompt's history entry."""
    before = len(server.get("/history"))
    run = page.locator('[data-testid="queue-button"]')
    if await run.count() == 0:
        run = page.get_by_role("button", name="Run", exact=True)
    if await run.count():
        await run.first.click()
    else:
        await page.evaluate("() => window.app.queuePrompt(0, 1)")
    for _ in range(240):
        await page.wait_for_timeout(500)
        history = server.get("/history")
        if len(history) > before:
            entry = list(history.values())[-1]
            if entry.get("status", {}).get("completed") is not None:
                await page.wait_for_timeout(1500)
                return entry
    raise TimeoutError("no result 120 s after Run")


WIDGET_TEXT_JS = """(id) => (window.app.graph.getNodeById(id).widgets || [])
    .map((w) => String(w.value ?? '')).join('\\n')"""


async def queue_inspector(page: Page, server: ComfyServer) -> list[str]:
    """Run the inspector workflow from the UI's Run button; screenshot the report it shows.

    The 1.32 frontend draws a node's `ui.text` output only for nodes that a frontend extension
    gives a widget for it (core "Preview as Text" has one). If the Attention Inspector node shows
    no report itself, that is reported, and a "Preview as Text" node is wired to its STRING output
    in the browser, as a user would, and run again for the screenshot."""
    await page.evaluate(LOAD_JS, [json.loads((EXAMPLES_DIR / INSPECTOR).read_text()), "inspector_result"])
    await page.wait_for_timeout(1000)
    inspector = await page.evaluate("() => window.app.graph.nodes.find((n) => n.type === 'FastAttnInspector').id")
    entry = await run_from_ui(page, server)
    problems = []
    if entry["status"].get("status_str") != "success":
        problems.append(f"inspector run: {entry['status']}")
    on_inspector = await page.evaluate(WIDGET_TEXT_JS, inspector)
    print(f"inspector run: {entry['status'].get('status_str')}; the node shows {on_inspector[:80]!r}")
    shown = [inspector]
    if "attention" in on_inspector.lower():
        await page.evaluate("(id) => { window.app.graph.getNodeById(id).size = [720, 480]; }", inspector)
    else:
        problems.append("the Attention Inspector node does not show its report (the report reaches the frontend "
                        "as ui.text, but nothing draws it on this node)")
        preview = await page.evaluate("""(id) => {
            const graph = window.app.graph, inspector = graph.getNodeById(id);
            const preview = window.LiteGraph.createNode('PreviewAny');
            preview.pos = [inspector.pos[0] + inspector.size[0] + 60, inspector.pos[1]];
            preview.size = [620, 360];
            graph.add(preview);
            inspector.connect(0, preview, 0);
            return preview.id;
        }""", inspector)
        await run_from_ui(page, server)
        on_preview = await page.evaluate(WIDGET_TEXT_JS, preview)
        print(f"  with Preview as Text attached, it shows {on_preview[:80]!r}...")
        if "attention" not in on_preview.lower():
            problems.append(f"Preview as Text shows no report either: {on_preview[:200]!r}")
        shown.append(preview)
    await fit_view(page, None if len(shown) > 1 else shown)
    await page.screenshot(path=str(OUT_DIR / "inspector_result.png"))
    for problem in problems:
        print("  PROBLEM:", problem)
    return problems


async def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    problems: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch)) as server:
        # First run of the frontend: no tutorial dialog, banner or minimap over the canvas.
        request = urllib.request.Request(server.url + "/settings", method="POST", data=json.dumps(SETTINGS).encode())
        urllib.request.urlopen(request, timeout=30).close()
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport=VIEWPORT)
            await page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            console: list[str] = []
            local = server.url.rsplit(":", 1)[0]

            def on_console(message) -> None:
                if message.type != "error":
                    return
                url = message.location.get("url", "")
                if url and not url.startswith(local):
                    print(f"  (ignored: no internet here) {message.text} {url}")
                    return
                console.append(f"{message.text} {url}".strip())

            page.on("console", on_console)
            page.on("pageerror", lambda e: console.append(f"page error: {e}"))
            await page.goto(server.url)
            await page.wait_for_function("() => window.app && window.app.graph && window.app.canvas",
                                         timeout=120_000)
            await page.wait_for_timeout(3000)
            startup = list(console)
            if startup:
                print("console errors at start-up:", *startup, sep="\n  ")
            await page.evaluate(CLOSE_DIALOGS_JS)
            for path in sorted(EXAMPLES_DIR.glob("*.json")):
                problems[path.name] = await check_workflow(page, path, console)
            problems["inspector run"] = await queue_inspector(page, server)
            await browser.close()
        server_log = server.log()
    if any(line.startswith("Failed to load resource: the server responded with a status of 5") for line in startup):
        print("server log, errors:", *[line for line in server_log.splitlines() if "rror" in line], sep="\n  ")
    failed = {name: found for name, found in problems.items() if found}
    print(f"{len(problems) - len(failed)} of {len(problems)} checks clean; PNGs in {OUT_DIR}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
