"""A busy queue's worth of prompts on the demo model, shared by tests/test_queue.py and
tests/benchmarks/bench_queue.py.

Every FastAttn technique, chained techniques and the Attention Inspector, beside plain runs, at
several resolutions, batch sizes and seeds; all small (16 - 144 image tokens, 3 steps) so that
the queue runs in seconds on a CPU. Consecutive prompts with the same technique share its patched
model (ComfyUI reuses the previous prompt's node outputs), which is what makes state leaking from
one run into the next visible.
"""

from __future__ import annotations

from dataclasses import dataclass

from .host import pack_import

workflows = pack_import("demo.workflows")

SIZES = (64, 128, 192)  # EmptySD3LatentImage sizes: 16, 64 and 144 image tokens
STEPS = 3  # window + residual (refresh 4): one full step, two window steps


def mixed_prompts(count: int = 12, prefix: str = "queue") -> dict[str, dict]:
    """`count` distinct sampling prompts plus two inspector prompts, name -> API graph. With the
    bad prompts and the interrupted run, tests/test_queue.py queues 24 at once."""
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


@dataclass(frozen=True)
class BadPrompt:
    graph: dict
    node_type: str  # the node whose execution must fail
    says: str  # a phrase the error message must contain


def _with(graph: dict, node: str, **inputs) -> dict:
    graph[node]["inputs"].update(inputs)
    return graph


def bad_prompts(prefix: str = "bad") -> dict[str, BadPrompt]:
    """One prompt per FastAttn node with an input that passes validation but cannot run."""
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
        "decode_latent": BadPrompt(video_latent_decoded, "FastAttnDemoDecode", "16, height, width"),
    }
