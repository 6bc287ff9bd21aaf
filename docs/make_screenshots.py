"""Screenshots of the example workflows in ComfyUI's real web frontend, and their thumbnails.

    .venv/bin/python docs/make_screenshots.py

Uses the system Chromium and playwright that `make setup` installs (tests/harness/browser.py;
tests/test_browser.py checks the same loads on every `make test`). A manual tool.

It starts a headless ComfyUI with the pack, loads every example_workflows/*.json as the menu's
Open does, reports any problem the browser test would (console errors, missing nodes, dropped
links or widget values), fits the graph to the view and saves docs/workflows/<name>.png and the
template browser's thumbnail example_workflows/<name>.jpg. Then it runs the Attention Inspector
workflow from the Run button and saves docs/workflows/inspector_result.png with its report.
Exits non-zero if any workflow had a problem.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from harness import pack_import  # noqa: E402
from harness.browser import Frontend, api_differences, open_frontend  # noqa: E402  (loads the host)
from harness.server import ComfyServer  # noqa: E402

_workflows = pack_import("demo.workflows")  # the pack's own module (its imports are relative)
EXAMPLES_DIR, MODEL_FILES, example_graphs = _workflows.EXAMPLES_DIR, _workflows.MODEL_FILES, _workflows.example_graphs

OUT_DIR = ROOT / "docs" / "workflows"
THUMBNAIL_WIDTH = 512
INSPECTOR = "fastattn_attention_inspector.json"
ABSENT_WEIGHTS = frozenset(file for files in MODEL_FILES.values() for _, file in files)


def fit_view(frontend: Frontend, node_ids: list[int] | None = None, max_scale: float = 1.2) -> None:
    """Zoom and pan so the given nodes (all by default) fill the canvas left free by the menus."""
    frontend.page.evaluate("""([ids, maxScale]) => {
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
    frontend.page.wait_for_timeout(800)


def save_thumbnail(screenshot: Path, path: Path) -> None:
    """The template browser's card image: the graph, scaled down, as <workflow name>.jpg."""
    image = Image.open(screenshot).convert("RGB")
    height = round(image.height * THUMBNAIL_WIDTH / image.width)
    image.resize((THUMBNAIL_WIDTH, height), Image.LANCZOS).save(path, quality=85)


def check_workflow(frontend: Frontend, path: Path) -> list[str]:
    problems = frontend.load(json.loads(path.read_text()), path.stem, ABSENT_WEIGHTS)
    try:
        problems += api_differences(example_graphs()[path.name][0], frontend.api_graph())
    except AssertionError as error:
        problems.append(str(error))
    fit_view(frontend)
    screenshot = OUT_DIR / f"{path.stem}.png"
    frontend.page.screenshot(path=str(screenshot))
    save_thumbnail(screenshot, path.with_suffix(".jpg"))
    print(f"{path.name}: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    for problem in problems:
        print("  PROBLEM:", problem)
    return problems


def run_inspector(frontend: Frontend) -> list[str]:
    """Run the inspector workflow from the Run button; screenshot the report on its node."""
    frontend.load(json.loads((EXAMPLES_DIR / INSPECTOR).read_text()), "inspector_result")
    entry = frontend.run()
    inspector = frontend.node_id("FastAttnInspector")
    shown = frontend.shown_text(inspector)
    problems = [] if entry["status"].get("status_str") == "success" else [f"inspector run: {entry['status']}"]
    if "attention" not in shown.lower():
        problems.append(f"the Attention Inspector node does not show its report: {shown[:200]!r}")
    frontend.page.evaluate("(id) => { window.app.graph.getNodeById(id).size = [720, 480]; }", inspector)
    fit_view(frontend, [inspector])
    frontend.page.screenshot(path=str(OUT_DIR / "inspector_result.png"))
    print(f"inspector run: {entry['status'].get('status_str')}; the node shows {shown[:80]!r}")
    for problem in problems:
        print("  PROBLEM:", problem)
    return problems


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    problems: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch)) as server, \
            open_frontend(server) as frontend:
        if frontend.console:
            print("console errors at start-up:", *frontend.console, sep="\n  ")
        for path in sorted(EXAMPLES_DIR.glob("*.json")):
            problems[path.name] = check_workflow(frontend, path)
        problems["inspector run"] = run_inspector(frontend)
    failed = {name: found for name, found in problems.items() if found}
    print(f"{len(problems) - len(failed)} of {len(problems)} checks clean; PNGs in {OUT_DIR}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
