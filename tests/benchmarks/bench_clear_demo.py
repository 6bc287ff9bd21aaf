"""CLEAR end to end on the demo model: zero-shot and distilled local attention against the
unpatched model (speed, PSNR, SSIM), and what the distillation cost.

Sampling as bench_ditfastattn.py: ComfyUI's loader and sampler, 1024 x 1024 (64 x 64 = 4096
image tokens), 20 steps, CFG 4, float32, CPU, runs interleaved with the baseline, medians.
The distillation (unless --iterations 0) trains the radius-`--radius` student on the teacher's
samples of the benchmark caption at the same size, with the CLEAR Distillation node's code,
and the distilled model is sampled like the others.

Run: `python tests/benchmarks/run_all.py clear_demo`, or directly with --radius / --pool /
--iterations / --samples / --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import comfy.sd
import torch
from harness import pack_import
from harness.models import sample
from safetensors.torch import save_file

demo = pack_import("demo")
evaluate = pack_import("demo.evaluate")
workflows = pack_import("demo.workflows")
metrics = pack_import("metrics")
demo_nodes = pack_import("nodes.demo")
clear_nodes = pack_import("nodes.clear")
distillation = pack_import("patching.clear_distill")
patching = pack_import("patching")

SIZE = 128  # latent side: 1024 px, 4096 image tokens
STEPS, CFG, SEED = workflows.SAMPLER["steps"], workflows.SAMPLER["cfg"], workflows.SAMPLER["seed"]
POOLING = {0: "off", 2: "2 x 2", 4: "4 x 4 (CLEAR's pooled variants)"}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--radius", type=int, default=8)
    parser.add_argument("--pool", type=int, default=0, choices=sorted(POOLING))
    parser.add_argument("--iterations", type=int, default=100, help="distillation steps (0: zero-shot only)")
    parser.add_argument("--samples", type=int, default=4, help="teacher samples to distil on")
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    encode = demo_nodes.FastAttnDemoTextEncode.execute
    positive, negative = encode(workflows.CAPTION).result[0], encode("").result[0]
    latent = evaluate.empty_latent(model, SIZE // 2)
    configs = {"baseline": model}
    configs[f"CLEAR r{args.radius} zero-shot"] = clear_nodes.ClearAttention.execute(
        model, args.radius, 0.25, POOLING[args.pool], 1, 0.0, 1.0, "").result[0]
    training = ""
    if args.iterations:
        batch = evaluate.empty_latent(model, SIZE // 2, args.samples)
        start = time.perf_counter()
        teacher = clear_nodes.teacher_samples(model, positive, negative, batch, SEED + 1, STEPS, CFG)
        sampled = time.perf_counter() - start
        path = Path(tempfile.mkdtemp()) / "distilled.safetensors"
        settings = distillation.DistillSettings(args.radius, args.pool, args.iterations, args.learning_rate, SEED)
        distillation.distill(model, positive, negative, CFG, teacher, settings,
                             lambda tensors, metadata: save_file(tensors, str(path), metadata=metadata))
        trained = time.perf_counter() - start - sampled
        configs[f"CLEAR r{args.radius} distilled"] = clear_nodes.load_clear(model, str(path))
        training = (f"distillation: {args.samples} teacher samples (seed {SEED + 1}, not the benchmark's seed) in "
                    f"{sampled / 60:.1f} min, {args.iterations} steps (lr {args.learning_rate}) in {trained / 60:.1f} min")

    times: dict[str, list[float]] = {name: [] for name in configs}
    images = {}
    for _ in range(args.repeats):
        for name, patched in configs.items():
            begin = time.perf_counter()
            out = sample(patched, positive, negative, latent, steps=STEPS, cfg=CFG, seed=SEED)
            times[name].append(time.perf_counter() - begin)
            images[name] = demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0]
    base_time = statistics.median(times["baseline"])
    print(f"Demo model, 1024x1024 px = 4096 image tokens, {STEPS} steps euler, CFG {CFG}, float32, "
          f"{torch.get_num_threads()} CPU threads (shared machine), medians of {args.repeats}; pool {args.pool}")
    if training:
        print(training)
    print("\n| configuration | median s | speedup | attention FLOPs kept | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|")
    for name, patched in configs.items():
        patch = patching.patch_of(patched)
        report = patch.last_report if patch else None
        kept = f"{100 * report.computed_flops / report.full_flops:.1f}%" if report else "100%"
        seconds = statistics.median(times[name])
        print(f"| {name} | {seconds:.1f} | {base_time / seconds:.2f}x | {kept} | "
              f"{metrics.psnr(images[name], images['baseline']):.1f} | "
              f"{metrics.ssim(images[name], images['baseline']):.4f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] if sys.argv[0].endswith("bench_clear_demo.py") else [])
