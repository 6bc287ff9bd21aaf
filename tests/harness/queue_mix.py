"""A busy queue's worth of prompts on the demo model, shared by tests/test_queue.py and
tests/benchmarks/bench_queue.py.

Every node of the pack (every FastAttn technique, chained techniques, plans, calibration, CLEAR
and its weights and distillation, the Attention Inspector), beside plain runs, at several
resolutions, batch sizes and seeds; all small (16 - 144 image tokens, 3 steps) so that the queue
runs in a few minutes on a CPU. Consecutive prompts with the same technique share its patched
model (ComfyUI reuses the previous prompt's node outputs), which is what makes state leaking from
one run into the next visible.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .host import pack_import

workflows = pack_import("demo.workflows")

SIZES = (64, 128, 192)  # EmptySD3LatentImage sizes: 16, 64 and 144 image tokens
STEPS = 3  # window + residual (refresh 4): one full step, two window steps
CLEAR_FILE = "queue_clear"  # a CLEAR weights file for the demo model (models/clear/, see clear_file)


def mixed_prompts(count: int = 2 * len(workflows.TECHNIQUES), prefix: str = "queue") -> dict[str, dict]:
    """`count` distinct sampling prompts, two per technique in turn (every demo workflow at the
    default count), plus two inspector prompts; name -> API graph."""
    techniques = list(workflows.TECHNIQUES)
    prompts = {}
    for index in range(count):
        technique = techniques[index // 2 % len(techniques)]  # in pairs: ComfyUI keeps the last prompt's
        name = f"{prefix}{index:02d}_{technique}"  # node outputs, so each pair shares one patched model
        prompts[name] = workflows.demo_graph(technique, size=SIZES[index % len(SIZES)], steps=STEPS, prefix=name,
                                             batch_size=1 + index % 2, seed=1000 + index)
    for size in (256, 512):
        prompts[f"{prefix}_inspector{size}"] = workflows.inspector_graph(size)
    return prompts


def other_node_prompts(prefix: str = "queue") -> dict[str, dict]:
    """The nodes the demo workflows leave out: calibration (with its plan applied; and on a batch of two
    prompts), CLEAR distillation, CLEAR weights loaded from `CLEAR_FILE` (see clear_file), and DeepCache
    on the demo U-Net, and Compare Images beside an unpatched branch; name -> API graph."""
    return {
        f"{prefix}_compare": workflows.demo_graph("window_residual", size=SIZES[1], steps=STEPS,
                                                  prefix=f"{prefix}_compare", compare=True),
        f"{prefix}_deepcache": workflows.unet_graph(size=64, steps=STEPS, prefix=f"{prefix}_deepcache"),
        f"{prefix}_calibrate": workflows.calibrate_graph(size=SIZES[0], steps=STEPS, prefix=f"{prefix}_calibrate"),
        f"{prefix}_prompt_batch": prompt_batch_graph(f"{prefix}_prompt_batch"),
        f"{prefix}_distill": distill_graph(f"{prefix}_distilled", f"{prefix}_distill"),
        f"{prefix}_clear_weights": clear_weights_graph(f"{prefix}_clear_weights"),
    }


def prompt_batch_graph(prefix: str, combined: bool = False) -> dict:
    """Calibration on two captions stacked by Prompt Batch for Calibration, one latent row each; with
    `combined`, its second input a combined conditioning (two entries), which it refuses."""
    graph = workflows.calibrate_graph(size=SIZES[0], steps=STEPS, prefix=prefix,
                                      more_captions=workflows.MORE_CAPTIONS[:1])
    if combined:
        graph["combined"] = {"class_type": "ConditioningCombine",
                             "inputs": {"conditioning_1": ["positive", 0], "conditioning_2": ["positive_2", 0]}}
        graph["prompts"]["inputs"]["conditioning_2"] = ["combined", 0]
    return graph


def _sampling(model_node: str, inputs: dict, prefix: str) -> dict:
    """The demo sampling graph at the smallest size with `model_node` (a FastAttn node taking the
    loader's model and, for distillation, the prompts and latent) between the loader and the sampler."""
    graph = workflows.demo_graph("baseline", size=SIZES[0], steps=STEPS, prefix=prefix)
    graph["fastattn0"] = {"class_type": model_node, "inputs": {"model": ["loader", 0], **inputs}}
    graph["sampler"]["inputs"]["model"] = ["fastattn0", 0]
    graph["report"] = {"class_type": "FastAttnReport", "inputs": {"model": ["fastattn0", 0], "samples": ["sampler", 0]}}
    return graph


def distill_graph(filename: str, prefix: str, **inputs) -> dict:
    """CLEAR distillation of the demo model (two teacher steps, two training steps) into `filename`,
    then sampling with the distilled model."""
    return _sampling("FastAttnClearDistill", {
        "positive": ["positive", 0], "negative": ["negative", 0], "latent": ["latent", 0], "seed": 3,
        "teacher_steps": 2, "teacher_cfg": 4.0, "radius": 2, "pooling": "off", "iterations": 2,
        "learning_rate": 1e-3, "filename": filename, "resume_from": "none", **inputs}, prefix)


def clear_weights_graph(prefix: str, **inputs) -> dict:
    """The demo model with `CLEAR_FILE` loaded by the CLEAR weights loader, sampled."""
    return _sampling("FastAttnClearWeightsLoader", {
        "clear_name": f"{CLEAR_FILE}.safetensors", "radius": 0, "temporal_radius": 1, "start_percent": 0.0,
        "end_percent": 1.0, "layers_kept_full": "", **inputs}, prefix)


def clear_file(model, directory) -> None:
    """Write `CLEAR_FILE` for `model` (the loaded demo model) into `directory`, as the distillation
    node writes its files (ComfyUI's names, radius 2): its first mapped attention projection scaled
    by 0.9, so that the loaded weights change what the model samples."""
    from safetensors.torch import save_file

    patching = pack_import("patching")
    net = model.model.diffusion_model
    projection = patching.adapter_for(net).projections(net)[0]
    key = f"diffusion_model.{projection.path}.weight"
    metadata = {"clear_format": "comfyui", "clear_radius": "2", "clear_pool": "0",
                "clear_architecture": type(net).__name__}
    save_file({key: model.model_state_dict()[key] * 0.9}, str(directory / f"{CLEAR_FILE}.safetensors"), metadata)


TECHNIQUE_PHRASES = {"ast": "step sharing", "wars": "window+residual", "wars+asc": "window+residual + cfg sharing",
                     "full+asc": "full + cfg sharing"}  # a plan's technique -> how the Attention Report names it
REPORTED_AS = {"baseline": [], "window_residual": ["window+residual"], "step_sharing": ["step sharing"],
               "cfg_sharing": ["cfg sharing"], "combined": ["window+residual + cfg sharing"],
               "clear_zero_shot": ["window"], "distill": ["window"], "clear_weights": ["window"],
               "deepcache": ["1 full and 2 shallow"]}  # 1:3 over 3 steps


@functools.cache
def _demo_model_sampling():
    """The demo model's noise schedule, as the stock loader makes it."""
    return pack_import("nodes.demo").load_demo_model().get_model_object("model_sampling")


def reported_phrases(technique: str, steps: int = STEPS) -> list[str]:
    """What the Attention Report of a `technique` prompt (a demo workflow, "distill" or
    "clear_weights") run at `steps` steps names: the techniques that acted. For the shipped plan:
    its techniques at the plan steps those steps map to."""
    if technique != "plan":
        return REPORTED_AS[technique]
    plan = pack_import("plans").Plan.from_json(workflows.SHIPPED_PLAN.read_text())
    run = pack_import("patching.timeline").Timeline.ksampler(
        _demo_model_sampling(), workflows.SAMPLER["scheduler"], steps, workflows.SAMPLER["sampler_name"])
    rows = [plan.methods[step] for step in plan.step_map(run)[0]]
    return sorted({TECHNIQUE_PHRASES[name] for row in rows for name in row if name != "full"})


@dataclass(frozen=True)
class BadPrompt:
    graph: dict
    node_type: str  # the node whose execution must fail
    says: str  # a phrase the error message must contain


def _with(graph: dict, node: str, **inputs) -> dict:
    graph[node]["inputs"].update(inputs)
    return graph


def _compared_at_two_sizes(prefix: str) -> dict:
    """A demo graph whose Compare Images gets references of twice the images' size."""
    graph = workflows.demo_graph("window_residual", size=SIZES[0], steps=STEPS, prefix=prefix, compare=True)
    graph["latent_reference"] = {"class_type": "EmptySD3LatentImage",
                                 "inputs": {"width": 2 * SIZES[0], "height": 2 * SIZES[0], "batch_size": 1}}
    graph["sampler_unpatched"]["inputs"]["latent_image"] = ["latent_reference", 0]
    return graph


def bad_prompts(prefix: str = "bad") -> dict[str, BadPrompt]:
    """One prompt per node of the pack with an input that passes validation but cannot run."""
    size, steps = SIZES[0], STEPS

    def demo(technique: str, name: str) -> dict:
        return workflows.demo_graph(technique, size=size, steps=steps, prefix=f"{prefix}_{name}")

    unpatched_report = demo("baseline", "report")
    unpatched_report["report"] = {"class_type": "FastAttnReport",
                                  "inputs": {"model": ["loader", 0], "samples": ["sampler", 0]}}
    video_latent_inspected = workflows.inspector_graph(size)
    video_latent_inspected["latent"] = {"class_type": "EmptyHunyuanLatentVideo",
                                        "inputs": {"width": size, "height": size, "length": 5, "batch_size": 1}}
    video_latent_decoded = demo("baseline", "decode")  # 128 channels over frames: no demo model's latent
    video_latent_decoded["video"] = {"class_type": "EmptyLTXVLatentVideo",
                                     "inputs": {"width": 64, "height": 64, "length": 1, "batch_size": 1}}
    video_latent_decoded["decode"]["inputs"]["samples"] = ["video", 0]
    calibrate = workflows.calibrate_graph(size=size, steps=steps, prefix=f"{prefix}_calibrate", plan_name="../escape")
    return {
        "window_layers": BadPrompt(_with(demo("window_residual", "window"), "fastattn0", layers="first two"),
                                   "FastAttnWindowResidual", "layers: cannot read 'first two'"),
        "step_range": BadPrompt(_with(demo("step_sharing", "step"), "fastattn0", start_percent=0.8, end_percent=0.2),
                                "FastAttnStepSharing", "0 <= start <= end <= 1"),
        "cfg_layers": BadPrompt(_with(demo("cfg_sharing", "cfg"), "fastattn0", layers="5-2"),
                                "FastAttnCFGSharing", "runs backwards"),
        "report_unpatched": BadPrompt(unpatched_report, "FastAttnReport", "no FastAttn patch"),
        "inspector_latent": BadPrompt(video_latent_inspected, "FastAttnInspector", "[batch, 16, height, width], got [1, 16, 2,"),
        "caption": BadPrompt(_with(demo("baseline", "caption"), "positive", caption="a red zeppelin"),
                             "FastAttnDemoTextEncode", "zeppelin"),
        "deepcache_dit": BadPrompt(_sampling("FastAttnDeepCache", workflows.DEEPCACHE, f"{prefix}_deepcache"),
                                   "FastAttnDeepCache", "DeepCache works on U-Net models"),
        "unet_caption": BadPrompt(workflows.unet_graph(size=64, steps=steps, caption="a red zeppelin",
                                                       prefix=f"{prefix}_unet"), "FastAttnDemoUNetTextEncode", "zeppelin"),
        "compare_sizes": BadPrompt(_compared_at_two_sizes(f"{prefix}_compare"), "FastAttnCompare",
                                   "px and the references"),
        "decode_latent": BadPrompt(video_latent_decoded, "FastAttnDemoDecode", "16, height, width"),
        "calibrate_plan_name": BadPrompt(calibrate, "FastAttnCalibrate", "'../escape' is not a usable plan name"),
        "apply_plan_json": BadPrompt(_with(demo("plan", "apply"), "fastattn0", plan_json="{\"format\": "),
                                     "FastAttnApplyPlan", "not valid JSON"),
        "clear_layers": BadPrompt(_with(demo("clear_zero_shot", "clear"), "fastattn0", layers_kept_full="x"),
                                  "FastAttnClearAttention", "cannot read 'x'"),
        "clear_weights_radius": BadPrompt(clear_weights_graph(f"{prefix}_weights", radius=5),
                                          "FastAttnClearWeightsLoader", "was trained for radius 2, not 5"),
        "distill_filename": BadPrompt(distill_graph("a/b", f"{prefix}_distill"), "FastAttnClearDistill",
                                      "must be a plain name without folders"),
        "prompt_batch_combined": BadPrompt(prompt_batch_graph(f"{prefix}_prompt_batch", combined=True),
                                           "FastAttnPromptBatch", "conditioning_2 holds 2 entries"),
    }
