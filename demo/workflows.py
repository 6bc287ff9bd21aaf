"""The demo's workflows, defined once in API format and written out in UI format.

`make demo` and the server test queue the API graphs; `example_workflows/*.json` (shown in
ComfyUI's template browser) are the same graphs laid out for the editor. A test checks the
committed files are what this module writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from . import DIT_FILE

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "example_workflows"
CAPTION = "a red circle and a blue square on a striped green background"
SAMPLER = {"seed": 7, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
WINDOW_BAND = {"window_shape": "band (1D over the token sequence, as the paper)", "window_fraction": 0.125,
               "window_tokens": 0, "refresh_every": 4, "start_percent": 0.0, "end_percent": 1.0, "layers": "",
               "residual": True}
STEP_SHARING = {"compute_every": 2, "start_percent": 0.2, "end_percent": 1.0, "layers": ""}
CFG_SHARING = {"start_percent": 0.5, "end_percent": 1.0, "layers": ""}  # early steps need real guidance
CLEAR_R16 = {"radius": 16, "radius_fraction": 0.25, "pooling": "off", "temporal_radius": 1, "start_percent": 0.0,
             "end_percent": 1.0, "layers_kept_full": ""}

# name -> (description, the FastAttn nodes between the loader and the sampler, in order)
TECHNIQUES: dict[str, tuple[str, list[tuple[str, dict]]]] = {
    "baseline": ("Unpatched model: the reference every technique is compared with.", []),
    "window_residual": ("DiTFastAttn window attention (band of N/8 per side) with residual sharing, "
                        "full attention every 4 steps.", [("FastAttnWindowResidual", WINDOW_BAND)]),
    "step_sharing": ("DiTFastAttn attention sharing across steps: every 2nd step after the first 20%.",
                     [("FastAttnStepSharing", STEP_SHARING)]),
    "cfg_sharing": ("DiTFastAttn attention sharing across CFG in the second half of the steps: the "
                    "unconditional half copies the conditional.",
                    [("FastAttnCFGSharing", CFG_SHARING)]),
    "combined": ("Window + residual with CFG sharing (second half of the steps), the paper's combined mode.",
                 [("FastAttnWindowResidual", WINDOW_BAND), ("FastAttnCFGSharing", CFG_SHARING)]),
    "clear_zero_shot": ("CLEAR local attention, zero-shot: each image token sees a circle of radius 16 tokens "
                        "(a quarter of the 64 x 64 grid) and every text token, at every step.",
                        [("FastAttnClearAttention", CLEAR_R16)]),
}


def demo_graph(technique: str, size: int = 1024, steps: int = SAMPLER["steps"], caption: str = CAPTION,
               prefix: str | None = None) -> dict:
    """API-format graph: demo model -> technique nodes -> KSampler -> decode -> save (+ report)."""
    graph: dict[str, dict] = {
        "loader": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILE, "weight_dtype": "default"}},
        "positive": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": caption}},
        "negative": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": ""}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }
    model = ["loader", 0]
    for index, (class_type, inputs) in enumerate(TECHNIQUES[technique][1]):
        node_id = f"fastattn{index}"
        graph[node_id] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [node_id, 0]
    graph["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, **SAMPLER, "steps": steps, "positive": ["positive", 0], "negative": ["negative", 0],
        "latent_image": ["latent", 0]}}
    graph["decode"] = {"class_type": "FastAttnDemoDecode", "inputs": {"samples": ["sampler", 0]}}
    graph["save"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["decode", 0], "filename_prefix": prefix or f"fastattn_demo_{technique}"}}
    if TECHNIQUES[technique][1]:
        graph["report"] = {"class_type": "FastAttnReport", "inputs": {"model": model, "samples": ["sampler", 0]}}
    return graph


def inspector_graph(size: int = 1024, caption: str = CAPTION) -> dict:
    """API-format graph: what attention costs in the demo model at this size."""
    return {
        "loader": {"class_type": "UNETLoader", "inputs": {"unet_name": DIT_FILE, "weight_dtype": "default"}},
        "positive": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": caption}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "inspector": {"class_type": "FastAttnInspector",
                      "inputs": {"model": ["loader", 0], "positive": ["positive", 0], "latent": ["latent", 0]}},
    }


InputTypes = Callable[[str], tuple[list[tuple[str, str]], list[str]]]
TITLES = {"positive": "Positive caption", "negative": "Negative caption (empty)"}
SIZES = {"FastAttnInspector": [640, 420], "FastAttnReport": [520, 160], "FastAttnWindowResidual": [360, 290],
         "KSampler": [320, 270], "FastAttnDemoTextEncode": [360, 130]}


def to_ui(graph: dict, node_io: InputTypes, title: str) -> dict:
    """The same graph in ComfyUI's UI format: nodes in columns by depth, links, widget values.

    `node_io(class_type)` gives the node's inputs as (name, type) in order (type "COMBO" for
    lists) and its output types, as the host defines them."""
    ids = {key: index + 1 for index, key in enumerate(graph)}
    depth: dict[str, int] = {}

    def depth_of(key: str) -> int:
        if key not in depth:
            parents = [value[0] for value in graph[key]["inputs"].values() if isinstance(value, list)]
            depth[key] = 1 + max((depth_of(parent) for parent in parents), default=-1)
        return depth[key]

    links, nodes, rows = [], [], {}
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for key, node in graph.items():
        inputs_spec, output_types = node_io(node["class_type"])
        column = depth_of(key)
        row = rows.setdefault(column, 0)
        rows[column] += 1
        ui_inputs, widgets = [], []
        for name, kind in inputs_spec:
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, ids[value[0]], value[1], ids[key], len(ui_inputs), kind])
                outputs_links.setdefault((value[0], value[1]), []).append(link_id)
                ui_inputs.append({"name": name, "type": kind, "link": link_id})
            elif value is not None:
                widgets.append(value)
                if name in ("seed", "noise_seed"):
                    widgets.append("fixed")  # the editor's control_after_generate
        ui_node = {
            "id": ids[key], "type": node["class_type"], "pos": [40 + 440 * column, 40 + 320 * row],
            "size": SIZES.get(node["class_type"], [320, 200]), "flags": {}, "order": 0, "mode": 0,
            "inputs": ui_inputs,
            "outputs": [{"name": kind, "type": kind, "slot_index": slot} for slot, kind in enumerate(output_types)],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        if key in TITLES:
            ui_node["title"] = TITLES[key]
        nodes.append(ui_node)
    for node, key in zip(nodes, graph, strict=True):
        for output in node["outputs"]:
            output["links"] = outputs_links.get((key, output["slot_index"]), [])
    order = sorted(graph, key=depth_of)
    for node, key in zip(nodes, graph, strict=True):
        node["order"] = order.index(key)
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"info": title}, "version": 0.4}


def example_workflows(node_io: InputTypes) -> dict[str, dict]:
    """File name -> UI-format workflow, for example_workflows/."""
    files = {f"fastattn_demo_{name}.json": to_ui(demo_graph(name), node_io, description)
             for name, (description, _) in TECHNIQUES.items()}
    files["fastattn_attention_inspector.json"] = to_ui(
        inspector_graph(), node_io, "Attention Inspector on the demo model at 1024 x 1024 (4096 image tokens).")
    return files


def write_example_workflows(node_io: InputTypes, directory: Path = EXAMPLES_DIR) -> list[Path]:
    directory.mkdir(exist_ok=True)
    written = []
    for name, workflow in example_workflows(node_io).items():
        path = directory / name
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        written.append(path)
    return written
