"""DiTFastAttn end to end on the demo model: speed and faithfulness of each technique.

The demo model loads through ComfyUI's own loader and samples through ComfyUI's sampler at
1024 x 1024 (64 x 64 = 4096 image tokens), 20 steps, CFG 4, float32, CPU. Each technique is
applied by its node with the settings of the example workflows; runs are interleaved with
the unpatched baseline, timed as medians, and compared with the baseline image (PSNR, SSIM).
ComfyUI's core step cache is measured the same way for comparison (LazyCache: core EasyCache
does nothing on SD3-class models in this host, see below).
Run: `python tests/benchmarks/run_all.py ditfastattn`.
"""

from __future__ import annotations

import statistics
import time

import comfy.sd
import nodes as host_nodes
import torch
from comfy_extras.nodes_easycache import LazyCacheNode
from harness import pack_import
from harness.models import sample

demo = pack_import("demo")
evaluate = pack_import("demo.evaluate")
workflows = pack_import("demo.workflows")
metrics = pack_import("metrics")
demo_nodes = pack_import("nodes.demo")
patching = pack_import("patching")

REPEATS = 3
SIZE = 128  # latent side: 1024 px images, 4096 image tokens
STEPS = workflows.SAMPLER["steps"]
CFG = workflows.SAMPLER["cfg"]


def _apply(model, chain: list[tuple[str, dict]]):
    for class_type, inputs in chain:
        model = host_nodes.NODE_CLASS_MAPPINGS[class_type].execute(model, **inputs).result[0]
    return model


def _configs(model) -> dict:
    plain = {**workflows.WINDOW_BAND, "residual": False}
    configs = {name: _apply(model, chain) for name, (_, chain) in workflows.TECHNIQUES.items()}
    configs["window (no residual)"] = _apply(model, [("FastAttnWindowResidual", plain)])
    # Core EasyCache hooks DIFFUSION_MODEL, which SD3's model never calls in this host: it skips
    # nothing here. Its sibling LazyCache (same core module, PREDICT_NOISE hook) works on SD3.
    configs["LazyCache 0.2 (core)"] = LazyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]
    return configs


def main() -> None:
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    encode = demo_nodes.FastAttnDemoTextEncode.execute
    positive, negative = encode(workflows.CAPTION).result[0], encode("").result[0]
    latent = evaluate.empty_latent(model, SIZE // 2)
    configs = _configs(model)

    def run(patched) -> tuple[float, torch.Tensor, object]:
        start = time.perf_counter()
        out = sample(patched, positive, negative, latent, steps=STEPS, cfg=CFG, seed=workflows.SAMPLER["seed"])
        seconds = time.perf_counter() - start
        image = demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0]
        patch = patching.patch_of(patched)
        return seconds, image, patch.last_report if patch else None

    run(configs["baseline"])  # warm-up: tile plans, allocator
    times: dict[str, list[float]] = {name: [] for name in configs}
    results = {}
    for _ in range(REPEATS):
        for name, patched in configs.items():
            seconds, image, report = run(patched)
            times[name].append(seconds)
            results[name] = (image, report)
    base_time = statistics.median(times["baseline"])
    base_image = results["baseline"][0]
    print(f"Demo model (SD3 MMDiT, depth 4, 4 heads of 64), {SIZE * 8}x{SIZE * 8} px = {(SIZE // 2) ** 2} image "
          f"tokens + 16 text tokens, {STEPS} steps euler, CFG {CFG}, batch 1, float32, "
          f"{torch.get_num_threads()} CPU threads, medians of {REPEATS} interleaved runs\n")
    print("| configuration | median s | speedup vs unpatched | attention FLOPs kept | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|")
    for name in configs:
        image, report = results[name]
        seconds = statistics.median(times[name])
        kept = f"{100 * report.computed_flops / report.full_flops:.1f}%" if report else "n/a"
        print(f"| {name} | {seconds:.2f} | {base_time / seconds:.2f}x | {kept} | "
              f"{metrics.psnr(image, base_image):.1f} | {metrics.ssim(image, base_image):.4f} |")


if __name__ == "__main__":
    main()
