"""The example workflows, defined once in API format and written out in UI format.

The demo model's workflows (one per technique, and the inspector) are what `make demo` and the
server tests queue. The workflows for real models (FLUX.1-dev, SD3.5 Large, Wan 2.1) use the
stock loaders of ComfyUI's own examples and the techniques at the settings the demo benchmarks
(`MODEL_FILES` names the weights they expect). `example_workflows/*.json` (shown in ComfyUI's
template browser) are all these graphs laid out for the editor; a test checks the committed
files are what this module writes, and the browser test loads them in the real frontend.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..plans.storage import NO_PLAN
from . import DEMO_DIT, DEMO_UNET

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "example_workflows"
SHIPPED_PLAN = Path(__file__).resolve().parent / "plans" / "fastattn_demo_sd3_fast.json"
CAPTION = "a red circle and a blue square on a striped green background"
MORE_CAPTIONS = ("a big black cross on a dotted orange background",  # the calibration example's other prompts
                 "a small white triangle and a purple circle on a checkered yellow background")
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
    "plan": ("A plan calibrated for the demo model (fast search), pasted into Apply Plan: the workflow file "
             "carries it, no other file needed.",
             [("FastAttnApplyPlan", {"plan_name": NO_PLAN, "plan_json": SHIPPED_PLAN.read_text()})]),
    "clear_zero_shot": ("CLEAR local attention, zero-shot: each image token sees a circle of radius 16 tokens "
                        "(a quarter of the 64 x 64 grid) and every text token, at every step.",
                        [("FastAttnClearAttention", CLEAR_R16)]),
}
COMPARE = {"view": "side by side", "difference_gain": 4.0}
CALIBRATE = {"delta": 0.1, "search_mode": "fast", "step_sharing": True, "window_residual": True, "cfg_sharing": True,
             "window_shape": WINDOW_BAND["window_shape"], "window_fraction": 0.125, "plan_name": "", "overwrite": False,
             "per_head": False, "cost": "time", "step_reuse": False, "denoise": 1.0,
             "block_cache": False}


def demo_graph(technique: str, size: int = 1024, steps: int = SAMPLER["steps"], caption: str = CAPTION,
               prefix: str | None = None, batch_size: int = 1, seed: int = SAMPLER["seed"],
               compare: bool = False) -> dict:
    """API-format graph: demo model -> technique nodes -> KSampler -> decode -> save (+ report);
    `compare` adds the unpatched model's branch (sampler, decode) and Compare Images beside it."""
    graph: dict[str, dict] = {
        "loader": {"class_type": "FastAttnDemoLoader", "inputs": {"model": DEMO_DIT}},
        "positive": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": caption}},
        "negative": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": ""}},
        "latent": {"class_type": "EmptySD3LatentImage",
                   "inputs": {"width": size, "height": size, "batch_size": batch_size}},
    }
    model = ["loader", 0]
    for index, (class_type, inputs) in enumerate(TECHNIQUES[technique][1]):
        node_id = f"fastattn{index}"
        graph[node_id] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [node_id, 0]
    graph["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, **SAMPLER, "seed": seed, "steps": steps, "positive": ["positive", 0], "negative": ["negative", 0],
        "latent_image": ["latent", 0]}}
    graph["decode"] = {"class_type": "FastAttnDemoDecode", "inputs": {"samples": ["sampler", 0]}}
    graph["save"] = {"class_type": "SaveImage",
                     "inputs": {"images": ["decode", 0], "filename_prefix": prefix or f"fastattn_demo_{technique}"}}
    if TECHNIQUES[technique][1]:
        graph["report"] = {"class_type": "FastAttnReport", "inputs": {"model": model, "samples": ["sampler", 0]}}
    if compare and TECHNIQUES[technique][1]:
        graph["sampler_unpatched"] = {"class_type": "KSampler",
                                      "inputs": {**graph["sampler"]["inputs"], "model": ["loader", 0]}}
        graph["decode_unpatched"] = {"class_type": "FastAttnDemoDecode", "inputs": {"samples": ["sampler_unpatched", 0]}}
        graph["compare"] = {"class_type": "FastAttnCompare", "inputs": {
            "reference": ["decode_unpatched", 0], "image": ["decode", 0], **COMPARE}}
    return graph


DEEPCACHE = {"cache_interval": 3, "cache_depth": 0, "start_percent": 0.0, "end_percent": 1.0, "schedule": "uniform"}
UNET_SIZE = 128  # EmptyLatentImage pixels: a 16 x 16 latent, the demo U-Net's 64 x 64 image


def unet_graph(deepcache: dict | None = DEEPCACHE, size: int = UNET_SIZE, steps: int = SAMPLER["steps"],
               caption: str = CAPTION, prefix: str = "fastattn_demo_unet", batch_size: int = 1,
               seed: int = SAMPLER["seed"]) -> dict:
    """API-format graph: demo U-Net -> DeepCache (None: unpatched) -> KSampler -> decode -> save (+ report)."""
    graph: dict[str, dict] = {
        "loader": {"class_type": "FastAttnDemoLoader", "inputs": {"model": DEMO_UNET}},
        "positive": {"class_type": "FastAttnDemoUNetTextEncode", "inputs": {"caption": caption}},
        "negative": {"class_type": "FastAttnDemoUNetTextEncode", "inputs": {"caption": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch_size}},
    }
    model = ["loader", 0]
    if deepcache is not None:
        graph["fastattn0"] = {"class_type": "FastAttnDeepCache", "inputs": {"model": model, **deepcache}}
        model = ["fastattn0", 0]
    graph["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, **SAMPLER, "seed": seed, "steps": steps, "positive": ["positive", 0], "negative": ["negative", 0],
        "latent_image": ["latent", 0]}}
    graph["decode"] = {"class_type": "FastAttnDemoDecode", "inputs": {"samples": ["sampler", 0]}}
    graph["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    if deepcache is not None:
        graph["report"] = {"class_type": "FastAttnReport", "inputs": {"model": model, "samples": ["sampler", 0]}}
    return graph


def calibrate_graph(size: int = 1024, steps: int = SAMPLER["steps"], caption: str = CAPTION,
                    prefix: str = "fastattn_demo_calibrate", plan_name: str = "",
                    more_captions: tuple[str, ...] = ()) -> dict:
    """API-format graph: calibrate a plan on the demo model (saving it if `plan_name`), show its
    heatmap, then apply it to the model and sample again: the same image as the calibration run's.
    With `more_captions`, calibrated on those too: Prompt Batch for Calibration stacks the captions,
    one latent row each."""
    graph = demo_graph("baseline", size, steps, caption, prefix)
    sampler = {key: value for key, value in graph["sampler"]["inputs"].items() if key != "denoise"}
    graph["calibrate"] = {"class_type": "FastAttnCalibrate", "inputs": {
        **{key: value for key, value in sampler.items() if key != "latent_image"}, "steps": steps,
        "latent_image": ["latent", 0], **CALIBRATE, "plan_name": plan_name}}
    if more_captions:
        prompts = {"conditioning_1": ["positive", 0]}
        for number, more in enumerate(more_captions, start=2):
            graph[f"positive_{number}"] = {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": more}}
            prompts[f"conditioning_{number}"] = [f"positive_{number}", 0]
        graph["prompts"] = {"class_type": "FastAttnPromptBatch", "inputs": prompts}
        graph["calibrate"]["inputs"]["positive"] = ["prompts", 0]
        graph["latent"]["inputs"]["batch_size"] = len(prompts)
    graph["heatmap"] = {"class_type": "SaveImage", "inputs": {"images": ["calibrate", 4],
                                                              "filename_prefix": f"{prefix}_heatmap"}}
    graph["apply"] = {"class_type": "FastAttnApplyPlan", "inputs": {
        "model": ["loader", 0], "plan_name": NO_PLAN, "plan_json": "", "plan": ["calibrate", 1]}}
    graph["sampler"]["inputs"]["model"] = ["apply", 0]
    graph["report"] = {"class_type": "FastAttnReport", "inputs": {"model": ["apply", 0], "samples": ["sampler", 0]}}
    graph["decode_calibration"] = {"class_type": "FastAttnDemoDecode", "inputs": {"samples": ["calibrate", 3]}}
    graph["save_calibration"] = {"class_type": "SaveImage", "inputs": {"images": ["decode_calibration", 0],
                                                                       "filename_prefix": f"{prefix}_calibration"}}
    return graph


def inspector_graph(size: int = 1024, caption: str = CAPTION) -> dict:
    """API-format graph: what attention costs in the demo model at this size."""
    return {
        "loader": {"class_type": "FastAttnDemoLoader", "inputs": {"model": DEMO_DIT}},
        "positive": {"class_type": "FastAttnDemoTextEncode", "inputs": {"caption": caption}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "inspector": {"class_type": "FastAttnInspector",
                      "inputs": {"model": ["loader", 0], "positive": ["positive", 0], "latent": ["latent", 0]}},
    }


# Real models: name -> the weight files each loader expects (ComfyUI's models/ subfolder, file).
MODEL_FILES: dict[str, list[tuple[str, str]]] = {
    "flux1_dev": [("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                  ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")],
    "sd3.5_large": [("checkpoints", "sd3.5_large.safetensors"), ("text_encoders", "clip_l.safetensors"),
                    ("text_encoders", "clip_g.safetensors"), ("text_encoders", "t5xxl_fp16.safetensors")],
    "wan2.1_t2v_1.3B": [("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors"),
                        ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors"),
                        ("vae", "wan_2.1_vae.safetensors")],
}
MODEL_TITLES = {
    "flux1_dev": "FLUX.1-dev at 1024 x 1024 with window attention + residual (CFG sharing does nothing at "
                 "FLUX's CFG 1).",
    "sd3.5_large": "SD3.5 Large at 1024 x 1024 with window attention + residual and CFG sharing (the "
                   "paper's combined mode).",
    "wan2.1_t2v_1.3B": "Wan 2.1 text to video 1.3B, 832 x 480 x 33 frames, with window attention + residual "
                       "and CFG sharing.",
}
PROMPT = "a red fox in a snowy birch forest at dawn, soft light, highly detailed"
NEGATIVE = "blurry, low quality, distorted"


def _stock_tail(graph: dict, model: list, techniques: list[tuple[str, dict]], sampler: dict,
                save: dict) -> dict:
    """Our nodes after the model, then the sampler, VAE decode, the save node and the report."""
    for index, (class_type, inputs) in enumerate(techniques):
        graph[f"fastattn{index}"] = {"class_type": class_type, "inputs": {"model": model, **inputs}}
        model = [f"fastattn{index}", 0]
    graph["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": SAMPLER["seed"], **sampler, "positive": ["positive", 0],
        "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    graph["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
    graph["save"] = {**save, "inputs": {"images": ["decode", 0], **save["inputs"]}}
    graph["report"] = {"class_type": "FastAttnReport", "inputs": {"model": model, "samples": ["sampler", 0]}}
    return graph


def model_graph(name: str) -> dict:
    """API-format graph for one of the real models in MODEL_FILES."""
    files = [file for _, file in MODEL_FILES[name]]
    save_image = {"class_type": "SaveImage", "inputs": {"filename_prefix": f"fastattn_{name}"}}
    if name == "flux1_dev":
        graph = {
            "loader": {"class_type": "UNETLoader", "inputs": {"unet_name": files[0], "weight_dtype": "default"}},
            "clip": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files[1], "clip_name2": files[2],
                                                                "type": "flux", "device": "default"}},
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": files[3]}},
            "prompt": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["clip", 0]}},
            "positive": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["prompt", 0], "guidance": 3.5}},
            "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["prompt", 0]}},
            "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        }
        sampler = {"steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}
        return _stock_tail(graph, ["loader", 0], [("FastAttnWindowResidual", WINDOW_BAND)], sampler, save_image)
    if name == "sd3.5_large":
        graph = {
            "checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": files[0]}},
            "clip": {"class_type": "TripleCLIPLoader",
                     "inputs": {"clip_name1": files[1], "clip_name2": files[2], "clip_name3": files[3]}},
            "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["clip", 0]}},
            "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["clip", 0]}},
            "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        }
        sampler = {"steps": 28, "cfg": 4.5, "sampler_name": "dpmpp_2m", "scheduler": "sgm_uniform"}
        graph = _stock_tail(graph, ["checkpoint", 0], [("FastAttnWindowResidual", WINDOW_BAND),
                                                       ("FastAttnCFGSharing", CFG_SHARING)], sampler, save_image)
        graph["decode"]["inputs"]["vae"] = ["checkpoint", 2]  # SD3.5's checkpoint brings its VAE
        return graph
    graph = {
        "loader": {"class_type": "UNETLoader", "inputs": {"unet_name": files[0], "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": files[1], "type": "wan", "device": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": files[2]}},
        "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["loader", 0], "shift": 8.0}},
        "positive": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["clip", 0]}},
        "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["clip", 0]}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": 832, "height": 480, "length": 33, "batch_size": 1}},
    }
    sampler = {"steps": 30, "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple"}
    save_video = {"class_type": "SaveAnimatedWEBP", "inputs": {"filename_prefix": f"fastattn_{name}", "fps": 16.0,
                                                               "lossless": False, "quality": 90, "method": "default"}}
    return _stock_tail(graph, ["shift", 0], [("FastAttnWindowResidual", WINDOW_BAND),
                                             ("FastAttnCFGSharing", CFG_SHARING)], sampler, save_video)


WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
InputTypes = Callable[[str], tuple[list[tuple[str, str]], list[str]]]
TITLES = {"positive": "Positive caption", "negative": "Negative caption (empty)"}
SIZES = {"FastAttnDeepCache": [340, 250], "FastAttnDemoUNetTextEncode": [360, 130], "FastAttnCalibrate": [380, 780], "FastAttnApplyPlan": [420, 220], "FastAttnInspector": [640, 420], "FastAttnReport": [520, 160], "FastAttnWindowResidual": [360, 290],
         "KSampler": [320, 270], "FastAttnDemoTextEncode": [360, 130], "FastAttnCompare": [540, 420],
         "FastAttnDemoLoader": [320, 80]}
GAP = 80  # px between columns and between the nodes of a column (the title bar is not in a node's size)


def to_ui(graph: dict, node_io: InputTypes, title: str) -> dict:
    """The same graph in ComfyUI's UI format: nodes in columns by depth (each as wide as its
    widest node, nodes stacked by their heights, so none overlaps), links, widget values.

    `node_io(class_type)` gives the node's inputs as (name, type) in order (type "COMBO" for
    lists) and its output types, as the host defines them."""
    ids = {key: index + 1 for index, key in enumerate(graph)}
    depth: dict[str, int] = {}

    def depth_of(key: str) -> int:
        if key not in depth:
            parents = [value[0] for value in graph[key]["inputs"].values() if isinstance(value, list)]
            depth[key] = 1 + max((depth_of(parent) for parent in parents), default=-1)
        return depth[key]

    sizes = {key: SIZES.get(node["class_type"], [320, 200]) for key, node in graph.items()}
    widths: dict[int, int] = {}
    for key in graph:
        widths[depth_of(key)] = max(widths.get(depth_of(key), 0), sizes[key][0])
    lefts = {column: 40 + sum(widths.get(before, 0) + GAP for before in range(column)) for column in widths}
    tops: dict[int, int] = {}  # the next free height of each column
    links, nodes = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for key, node in graph.items():
        inputs_spec, output_types = node_io(node["class_type"])
        column = depth_of(key)
        top = tops.setdefault(column, 40)
        tops[column] += sizes[key][1] + GAP
        ui_inputs, widgets = [], []
        for name, kind in inputs_spec:
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, ids[value[0]], value[1], ids[key], len(ui_inputs), kind])
                outputs_links.setdefault((value[0], value[1]), []).append(link_id)
                ui_inputs.append({"name": name, "type": kind, "link": link_id})
            elif kind not in WIDGET_KINDS:  # an optional socket left unconnected
                ui_inputs.append({"name": name, "type": kind, "link": None})
            elif value is not None:
                widgets.append(value)
                if name in ("seed", "noise_seed"):
                    widgets.append("fixed")  # the editor's control_after_generate
        ui_node = {
            "id": ids[key], "type": node["class_type"], "pos": [lefts[column], top],
            "size": sizes[key], "flags": {}, "order": 0, "mode": 0,
            "inputs": ui_inputs,
            "outputs": [{"name": kind, "type": kind, "slot_index": slot} for slot, kind in enumerate(output_types)],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        if key in TITLES and node["class_type"] in ("FastAttnDemoTextEncode", "FastAttnDemoUNetTextEncode"):
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


def example_graphs() -> dict[str, tuple[dict, str]]:
    """File name -> (API graph, description) of every example workflow."""
    graphs = {f"fastattn_demo_{name}.json": (demo_graph(name, compare=True), description)
              for name, (description, _) in TECHNIQUES.items()}
    graphs["fastattn_demo_calibrate.json"] = (
        calibrate_graph(), "Calibrate a plan on the demo model (fast search, delta 0.1), see it as a heatmap, apply it "
        "and sample: set plan_name to save it for Apply Plan.")
    graphs["fastattn_demo_calibrate_prompts.json"] = (
        calibrate_graph(prefix="fastattn_demo_calibrate_prompts", more_captions=MORE_CAPTIONS),
        "Calibrate a plan on three captions at once (Prompt Batch for Calibration, one latent row each), so that "
        "it holds for more than one picture; apply it and sample.")
    graphs["fastattn_demo_unet_deepcache.json"] = (
        unet_graph(), "DeepCache on the demo U-Net (SD 1.5 layout): the full U-Net every 3rd step, its shallowest "
        "blocks on the cached deep feature between.")
    graphs["fastattn_attention_inspector.json"] = (
        inspector_graph(), "Attention Inspector on the demo model at 1024 x 1024 (4096 image tokens).")
    graphs.update({f"fastattn_{name}.json": (model_graph(name), title) for name, title in MODEL_TITLES.items()})
    return graphs


def example_workflows(node_io: InputTypes) -> dict[str, dict]:
    """File name -> UI-format workflow, for example_workflows/."""
    return {name: to_ui(graph, node_io, title) for name, (graph, title) in example_graphs().items()}


def write_example_workflows(node_io: InputTypes, directory: Path = EXAMPLES_DIR) -> list[Path]:
    directory.mkdir(exist_ok=True)
    written = []
    for name, workflow in example_workflows(node_io).items():
        path = directory / name
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        written.append(path)
    return written
