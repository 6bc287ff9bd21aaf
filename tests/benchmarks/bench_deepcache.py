"""DeepCache on the demo U-Net: speed and faithfulness against the unpatched model, beside core
LazyCache and EasyCache.

The demo U-Net (SD 1.5 layout, demo/train_unet.py) loaded with ComfyUI's stock loader, sampled
with the stock sampler (euler, simple schedule, the example workflows' 20 steps and CFG 4) at a
16 x 16 latent (a 64 x 64 image), on captions of the held-out split (demo/scenes.py; the U-Net was
trained before that split existed, so it may have seen them), float32, CPU. Each round samples every configuration once per caption, configurations
interleaved; a configuration's time is the median over rounds and captions. PSNR and SSIM
(metrics.py) compare each decoded image with the unpatched model's of the same caption and
seed, averaged over the captions; caption fidelity (demo/fidelity.py) scores each image against its
caption's ground truth. LazyCache and EasyCache (comfy_extras/nodes_easycache.py) run at
the reuse thresholds given, picked to land near DeepCache's speeds.

Run: `python tests/benchmarks/run_all.py deepcache [--rounds R] [--captions C] [--threads T]
[--lazy THRESHOLD ...] [--easy THRESHOLD ...]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import comfy.sd
import torch
from comfy_extras import nodes_easycache
from harness import pack_import
from harness.models import sample

demo = pack_import("demo")
scenes = pack_import("demo.scenes")
fidelity = pack_import("demo.fidelity")
workflows = pack_import("demo.workflows")
metrics = pack_import("metrics")
demo_nodes = pack_import("nodes.demo")
deepcache_nodes = pack_import("nodes.deepcache")
deepcache = pack_import("patching.deepcache")

SIDE = workflows.UNET_SIZE // 8  # latent side: EmptyLatentImage's 128 px
STEPS, CFG, SEED = workflows.SAMPLER["steps"], workflows.SAMPLER["cfg"], workflows.SAMPLER["seed"]
def configurations(model, lazy: list[float], easy: list[float]) -> dict:
    configs = {"unpatched": model}
    for schedule in ("uniform", "non-uniform"):
        for interval in (2, 3, 5):
            configs[f"DeepCache N={interval} {schedule}"] = deepcache_nodes.DeepCache.execute(
                model, interval, 0, 0.0, 1.0, schedule).result[0]
    for threshold in lazy:
        configs[f"LazyCache {threshold}"] = nodes_easycache.LazyCacheNode.execute(
            model, threshold, 0.15, 0.95, False).result[0]
    for threshold in easy:
        configs[f"EasyCache {threshold}"] = nodes_easycache.EasyCacheNode.execute(
            model, threshold, 0.15, 0.95, False).result[0]
    return configs


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--captions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--lazy", type=float, nargs="*", default=[0.1, 0.2, 0.3], help="LazyCache reuse thresholds")
    parser.add_argument("--easy", type=float, nargs="*", default=[0.1, 0.2, 0.3], help="EasyCache reuse thresholds")
    args = parser.parse_args([arg for arg in argv if arg != "deepcache"])  # run_all.py passes the name on
    torch.set_num_threads(args.threads)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.UNET_FILE))
    encode = demo_nodes.FastAttnDemoUNetTextEncode.execute
    held_out = {scene.caption: scene for scene in scenes.held_out_scenes(args.captions)}
    prompts = [(caption, encode(caption).result[0]) for caption in held_out]
    negative = encode("").result[0]
    latent = {"samples": torch.zeros(1, 4, SIDE, SIDE)}
    configs = configurations(model, args.lazy, args.easy)
    times: dict[str, list[float]] = {name: [] for name in configs}
    images: dict[tuple[str, str], torch.Tensor] = {}
    skipped: dict[str, float] = {}
    sample(model, prompts[0][1], negative, latent, steps=2, cfg=CFG, seed=SEED)  # warm-up, untimed
    for _ in range(args.rounds):
        for caption, positive in prompts:
            for name, patched in configs.items():
                begin = time.perf_counter()
                out = sample(patched, positive, negative, latent, steps=STEPS, cfg=CFG, seed=SEED)
                times[name].append(time.perf_counter() - begin)
                images[(name, caption)] = demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0]
                holder = deepcache.holder_of(patched)
                if holder is not None:
                    report = holder.last_report
                    calls = report.full_calls + report.shallow_calls
                    skipped[name] = report.blocks_skipped / (calls * report.layout.total_blocks)
    base = statistics.median(times["unpatched"])
    print(f"Demo U-Net ({demo.UNET_FILE}), latent {SIDE} x {SIDE} ({4 * SIDE} px image), {STEPS} steps euler simple, "
          f"CFG {CFG}, float32, {args.threads} CPU thread(s) on a shared machine; {args.captions} held-out captions x "
          f"{args.rounds} rounds, interleaved, medians; DeepCache depth 0 (conv_in -> last output block)")
    print("\n| configuration | median s | speedup | U-Net blocks skipped | PSNR dB | SSIM | caption fidelity |")
    print("|---|---|---|---|---|---|---|")
    for name in configs:
        seconds = statistics.median(times[name])
        psnr = statistics.mean(metrics.psnr(images[(name, c)], images[("unpatched", c)]) for c, _ in prompts)
        ssim = statistics.mean(metrics.ssim(images[(name, c)], images[("unpatched", c)]) for c, _ in prompts)
        faithful = statistics.mean(fidelity.score(images[(name, c)], held_out[c]) for c, _ in prompts)
        share = f"{skipped[name]:.0%}" if name in skipped else "-"
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x | {share} | {psnr:.1f} | {ssim:.3f} | {faithful:.3f} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
