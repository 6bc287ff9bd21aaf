"""ComfyUI's real web frontend in headless Chromium, for the browser test and the screenshots.

    with ComfyServer(scratch) as server, open_frontend(server) as page:
        problems = page.load(workflow, "name")     # [] when it loaded cleanly

The system Chromium (Debian `chromium`, or CHROMIUM=/path) is driven by playwright; no browser
is downloaded. Console errors from the server's own origin are collected (requests to the
internet, which the frontend makes for news and templates, are not errors of ours).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

from .host import REPO, comfy_path
from .server import ComfyServer

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# The frontends the browser test runs: the one the host pins (its requirements.txt), and the newest
# comfyui-frontend-package that `make setup` installs into .frontend-newest (never into the venv).
NEWEST_FRONTEND = REPO / ".frontend-newest"
FRONTENDS = ("pinned", "newest")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}
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
CLOSE_DIALOGS_JS = """() => document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')
    .forEach((b) => b.click())"""
# The text a user sees in a node's read-only text boxes (reports; an editable box is an input):
# under the node's own element where the Vue renderer draws nodes, else in the DOM widgets the
# canvas renderer lays over the node's box on the screen.
SHOWN_TEXT_JS = """(id) => {
    const boxes = (root) => [...root.querySelectorAll('textarea')].filter((t) => t.readOnly).map((t) => t.value);
    const vue = document.querySelector(`[data-node-id='${id}']`);
    if (vue) return boxes(vue).join('\\n');
    const canvas = window.app.canvas, node = window.app.graph.getNodeById(id), screen = canvas.canvas.getBoundingClientRect();
    const [x, y] = [0, 1].map((i) => screen[['left', 'top'][i]] + (node.pos[i] + canvas.ds.offset[i]) * canvas.ds.scale);
    const [w, h] = node.size.map((v) => v * canvas.ds.scale);
    const onNode = (r) => r.width > 0 && r.left >= x - 1 && r.right <= x + w + 1 && r.top >= y - 1 && r.bottom <= y + h + 1;
    return [...document.querySelectorAll('.dom-widget')]
        .filter((e) => getComputedStyle(e).display !== 'none' && onNode(e.getBoundingClientRect()))
        .flatMap(boxes).join('\\n'); }"""


def frontend_args(frontend: str) -> tuple[str, ...]:
    """The server options that serve `frontend` ("pinned": the host's own, none needed)."""
    if frontend == "pinned":
        return ()
    static = NEWEST_FRONTEND / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        raise RuntimeError(f"No frontend at {static}: run `make setup` (it installs the newest "
                           "comfyui-frontend-package there).")
    return ("--front-end-root", str(static))


def frontend_version(frontend: str) -> str:
    """The version `frontend` should report: the host's pin, or the installed newest package's."""
    if frontend == "pinned":
        pins = (comfy_path() / "requirements.txt").read_text()
        return re.search(r"^comfyui-frontend-package==(\S+)", pins, re.MULTILINE).group(1)
    (info,) = NEWEST_FRONTEND.glob("comfyui_frontend_package-*.dist-info")
    return info.name.removeprefix("comfyui_frontend_package-").removesuffix(".dist-info")


def api_differences(expected: dict, got: dict) -> list[str]:
    """Where the frontend's API graph (`Frontend.api_graph`) differs from the API graph a UI
    workflow was written from (demo/workflows.py's `to_ui` numbers its nodes 1, 2, ... in order)."""
    ids = {key: str(index + 1) for index, key in enumerate(expected)}
    want_by_id = {ids[key]: {"class_type": node["class_type"],
                             "inputs": {k: [ids[v[0]], v[1]] if isinstance(v, list) else v
                                        for k, v in node["inputs"].items()}}
                  for key, node in expected.items()}
    problems = []
    for node_id in sorted(set(want_by_id) | set(got), key=int):
        want, have = want_by_id.get(node_id), got.get(node_id)
        if want is None or have is None:
            problems.append(f"node {node_id}: expected {want and want['class_type']}, "
                            f"frontend gave {have and have['class_type']}")
            continue
        for key in sorted(set(want["inputs"]) | set(have["inputs"])):
            a, b = want["inputs"].get(key, "<absent>"), have["inputs"].get(key, "<absent>")
            if a != b and not (isinstance(a, float | int) and isinstance(b, float | int) and abs(a - b) < 1e-9):
                problems.append(f"node {node_id} {want['class_type']}.{key}: expected {a!r}, frontend gave {b!r}")
    return problems


class Frontend:
    """One page on the server's frontend."""

    def __init__(self, page: Page, server: ComfyServer) -> None:
        self.page, self.server = page, server
        self.console: list[str] = []  # errors since the last load()

    def load(self, workflow: dict, name: str, absent_files: frozenset[str] = frozenset()) -> list[str]:
        """Load a UI-format workflow as the menu's Open does; what a user would see go wrong:
        console errors, dialogs (e.g. missing nodes), unregistered node types, unconnected inputs,
        widget values that are not among their choices (except the model files in `absent_files`)."""
        self.console.clear()
        self.page.evaluate(CLOSE_DIALOGS_JS)
        self.page.evaluate("([wf, name]) => window.app.loadGraphData(wf, true, true, name)", [workflow, name])
        self.page.wait_for_timeout(1500)
        problems = [f"console: {line}" for line in self.console]
        problems += [f"dialog: {text[:300]!r}" for text in self.page.evaluate(DIALOGS_JS)]
        nodes = self.nodes()
        if len(nodes) != len(workflow["nodes"]):
            problems.append(f"{len(nodes)} nodes on the canvas, {len(workflow['nodes'])} in the file")
        left_open = {(str(node["id"]), item["name"]) for node in workflow["nodes"] for item in node["inputs"]
                     if item.get("link") is None}  # optional sockets the file leaves unconnected (newer frontends' ids are strings)
        for node in nodes:
            label = f"node {node['id']} {node['type']}"
            if not node["registered"]:
                problems.append(f"{label}: not a registered node type (missing node)")
            elif node["has_errors"] and not any(widget["value"] in absent_files for widget in node["widgets"]):
                problems.append(f"{label}: marked as having errors")  # newer frontends also mark absent models
            for item in node["inputs"]:
                if item["link"] is None and not item["widget"] and (str(node["id"]), item["name"]) not in left_open:
                    problems.append(f"{label}: input {item['name']} not connected")
            for widget in node["widgets"]:
                if widget["in_choices"] is False and widget["value"] not in absent_files:
                    problems.append(f"{label}: {widget['name']}={widget['value']!r} is not one of its choices")
        return problems

    def nodes(self) -> list[dict]:
        return self.page.evaluate(NODES_JS)

    def api_graph(self) -> dict:
        """What the frontend would send to /prompt for the loaded graph (`app.graphToPrompt()`)."""
        try:
            return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")
        except PlaywrightError as error:  # e.g. InvalidLinkError for a link the frontend dropped
            raise AssertionError(f"app.graphToPrompt() failed: {error.message.splitlines()[0]}") from error

    def search(self, text: str) -> list[str]:
        """Type into the node search box (double click on the empty canvas) and read the results."""
        self.page.evaluate(CLOSE_DIALOGS_JS)
        self.page.evaluate("() => window.app.graph.clear()")
        canvas = self.page.locator("#graph-canvas").bounding_box()
        x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
        box = self.page.get_by_placeholder("Search Nodes...").or_(self.page.get_by_placeholder("Add a node..."))
        for attempt in range(3):  # a double click landing while the canvas redraws is sometimes not taken
            self.page.mouse.click(x, y)
            self.page.wait_for_timeout(500)  # not taken as part of the double click below
            self.page.mouse.dblclick(x, y)
            try:
                box.wait_for(state="visible", timeout=5_000)
                break
            except PlaywrightError:
                if attempt == 2:
                    raise
        box.fill(text)
        options = self.page.locator(".p-autocomplete-option, [role=option]")  # the older and newer search boxes
        try:  # results update as the query is typed: wait for a match, or give up and report what shows
            options.filter(has_text=text).first.wait_for(timeout=10_000)
        except PlaywrightError:
            pass
        found = options.all_inner_texts()
        self.page.keyboard.press("Escape")
        box.wait_for(state="hidden")
        return found

    def tooltip(self, node_id: int, name: str | None) -> str:
        """Hover, as a user would, over a node's widget `name` (one litegraph draws), else its input
        socket `name`, or its title (`name` None), and read the tooltip the frontend shows."""
        x, y = self.page.evaluate("""([id, name]) => {
            const canvas = window.app.canvas, node = window.app.graph.getNodeById(id);
            const box = canvas.canvas.getBoundingClientRect();
            const widget = name === null ? null : node.widgets?.find((w) => w.name === name && !w.element);
            let at;
            if (name === null) at = [node.pos[0] + 20, node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT / 2];
            else if (widget) at = [node.pos[0] + 40, node.pos[1] + widget.y + 10];
            else at = node.getConnectionPos(true, node.inputs.findIndex((input) => input.name === name));
            return [box.left + (at[0] + canvas.ds.offset[0]) * canvas.ds.scale,
                    box.top + (at[1] + canvas.ds.offset[1]) * canvas.ds.scale]; }""", [node_id, name])
        self.page.mouse.move(x, y)
        self.page.mouse.move(x + 2, y)
        tooltip = self.page.locator(".node-tooltip")
        tooltip.wait_for(state="visible", timeout=5000)
        text = tooltip.inner_text()
        self.page.mouse.move(5, 5)
        return text

    def node_id(self, node_type: str) -> int:
        return self.page.evaluate("(t) => window.app.graph.nodes.find((n) => n.type === t).id", node_type)

    def set_widgets(self, node_type: str, **values) -> None:
        """Edit widget values on every node of a type, as a user typing into them."""
        self.page.evaluate("""([t, values]) => window.app.graph.nodes.filter((n) => n.type === t).forEach((n) =>
            n.widgets.forEach((w) => { if (w.name in values) w.value = values[w.name]; }))""", [node_type, values])

    def shown_text(self, node_id: int) -> str:
        """The text shown in the node's read-only text boxes on the screen (our report nodes' reports)."""
        return self.page.evaluate(SHOWN_TEXT_JS, node_id)

    def use_vue_nodes(self, enabled: bool) -> None:
        """Switch the newer frontends' Vue node renderer on or off (the setting a user flips)."""
        self.page.evaluate("(on) => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on)", enabled)
        self.page.wait_for_timeout(1500)

    def run(self, timeout: float = 240.0) -> dict:
        """Click the Run button and wait for the prompt's history entry (and the page to show it)."""
        before = set(self.server.get("/history"))
        self.page.locator('[data-testid="queue-button"]').or_(
            self.page.get_by_role("button", name="Run", exact=True)).first.click()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(500)
            new = {key: entry for key, entry in self.server.get("/history").items() if key not in before}
            entry = next(iter(new.values()), None)
            if entry and entry.get("status", {}).get("completed") is not None:
                self.page.wait_for_timeout(1500)
                return entry
        raise TimeoutError(f"no result {timeout} s after Run")


@contextmanager
def open_frontend(server: ComfyServer) -> Iterator[Frontend]:
    """Chromium on the server's page, the app started, first-run dialogs out of the way."""
    # First run of the frontend: no tutorial dialog, banner or minimap over the canvas.
    request = urllib.request.Request(server.url + "/settings", method="POST", data=json.dumps(SETTINGS).encode())
    urllib.request.urlopen(request, timeout=30).close()
    local = server.url.rsplit(":", 1)[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            frontend = Frontend(page, server)

            def on_console(message) -> None:
                url = message.location.get("url", "")
                if message.type == "error" and (not url or url.startswith(local)):
                    frontend.console.append(f"{message.text} {url}".strip())

            page.on("console", on_console)
            page.on("pageerror", lambda error: frontend.console.append(f"page error: {error}"))
            page.goto(server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
            page.wait_for_timeout(3000)
            page.evaluate(CLOSE_DIALOGS_JS)
            yield frontend
        finally:
            browser.close()
