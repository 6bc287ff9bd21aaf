"""Calibrated plans on the demo model: FLOPs kept, speed and faithfulness on held-out prompts,
and calibration time, per search mode and delta, beside the uniform example settings.

The demo model loads through ComfyUI's own loader and samples through ComfyUI's sampler
(euler, simple, CFG 4, float32, CPU) at 1024 x 1024 (4096 image tokens). Each plan is
calibrated on CALIBRATION_CAPTIONS (a batch of seeds), then applied to HELD_OUT_CAPTIONS,
which calibration never saw; PSNR / SSIM are against full attention on the same caption and
seed. Calibration time is in units of one baseline sampling run of the calibration batch.
Run: `python tests/benchmarks/run_all.py calibration` (all six deltas, both modes, 20 steps:
about two hours on 2 CPU cores), or reduced, e.g.
`python tests/benchmarks/bench_calibration.py --modes fast --deltas 0.05 0.1 0.2 --steps 10`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "harness" not in sys.modules:  # run directly: find the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import pack_import  # noqa: E402, I001  (loads ComfyUI and the pack first)
from harness.models import sample  # noqa: E402
import comfy.sd  # noqa: E402
import nodes as host_nodes  # noqa: E402
import torch  # noqa: E402
from comfy_extras.nodes_easycache import LazyCacheNode  # noqa: E402

demo = pack_import("demo")
workflows = pack_import("demo.workflows")
metrics = pack_import("demo.metrics")
demo_nodes = pack_import("nodes.demo")
patching = pack_import("patching")
plans = pack_import("plans")

CFG = workflows.SAMPLER["cfg"]
DELTAS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15)  # the paper's sweep
CALIBRATION_CAPTIONS = ("a red circle and a blue square on a striped green background",)
CALIBRATION_SEEDS = 2  # latent batch: one noise per seed
HELD_OUT = (("a yellow triangle on a dotted purple background", 11),
            ("a green cross and a white circle on a checkered blue background", 12))


def _encode(caption: str) -> list:
    return demo_nodes.FastAttnDemoTextEncode.execute(caption).result[0]


def _timed(model, positive, latent, steps: int, seed: int) -> tuple[float, torch.Tensor, object]:
    start = time.perf_counter()
    out = sample(model, positive, _encode(""), latent, steps=steps, cfg=CFG, seed=seed)
    seconds = time.perf_counter() - start
    patch = patching.patch_of(model)
    return seconds, out, patch.last_report if patch else None


def _latent(batch: int, size: int) -> dict:
    return {"samples": torch.zeros(batch, 16, size, size)}


def _held_out(model, baseline: dict, steps: int, size: int) -> tuple[float, float, float, str]:
    """Median speedup, mean PSNR, mean SSIM on the held-out prompts; attention FLOPs kept."""
    speedups, psnrs, ssims, kept = [], [], [], "n/a"
    for caption, seed in HELD_OUT:
        seconds, out, report = _timed(model, _encode(caption), _latent(1, size), steps, seed)
        base_seconds, base_image = baseline[caption]
        image = demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0]
        speedups.append(base_seconds / seconds)
        psnrs.append(metrics.psnr(image, base_image))
        ssims.append(metrics.ssim(image, base_image))
        if report is not None:
            kept = f"{100 * report.computed_flops / report.full_flops:.1f}%"
    return statistics.median(speedups), statistics.fmean(psnrs), statistics.fmean(ssims), kept


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(plans.MODES), choices=plans.MODES)
    parser.add_argument("--deltas", nargs="+", type=float, default=list(DELTAS))
    parser.add_argument("--size", type=int, default=128, help="latent side (128: 1024 px, 4096 image tokens)")
    parser.add_argument("--steps", type=int, default=workflows.SAMPLER["steps"])
    parser.add_argument("--save-plans", type=Path, default=None, help="write each plan's JSON into this folder")
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    calibration_positive = _encode(CALIBRATION_CAPTIONS[0])
    calibration_latent = _latent(CALIBRATION_SEEDS, args.size)

    _timed(model, calibration_positive, _latent(1, 32), 2, 0)  # warm-up
    baseline_run = _timed(model, calibration_positive, calibration_latent, args.steps, 0)[0]
    baseline = {}
    for caption, seed in HELD_OUT:
        seconds, out, _ = _timed(model, _encode(caption), _latent(1, args.size), args.steps, seed)
        baseline[caption] = (seconds, demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0])

    rows = []
    for mode in args.modes:
        for delta in args.deltas:
            settings = plans.Settings(delta, plans.CANDIDATES, mode=mode)
            start = time.perf_counter()
            plan, _ = plans.calibrate(model, calibration_positive, _encode(""), calibration_latent, seed=0,
                                      steps=args.steps, cfg=CFG, sampler="euler", scheduler="simple",
                                      settings=settings)
            calibration_units = (time.perf_counter() - start) / baseline_run
            if args.save_plans is not None:
                args.save_plans.mkdir(parents=True, exist_ok=True)
                (args.save_plans / f"demo_{mode}_{delta:g}.json").write_text(plan.to_json())
            patched = patching.install(model, plans.PlannedAttention(plan))
            rows.append((f"{mode} plan, delta {delta:g}", *_held_out(patched, baseline, args.steps, args.size),
                         f"{calibration_units:.1f}"))
            print(rows[-1], flush=True)
    for name in ("window_residual", "combined"):
        chain = workflows.TECHNIQUES[name][1]
        uniform = model
        for class_type, inputs in chain:
            uniform = host_nodes.NODE_CLASS_MAPPINGS[class_type].execute(uniform, **inputs).result[0]
        rows.append((f"uniform: {name} (example settings)", *_held_out(uniform, baseline, args.steps, args.size), "-"))
    lazy = LazyCacheNode.execute(model, 0.2, 0.15, 0.95, False).result[0]
    rows.append(("core LazyCache 0.2", *_held_out(lazy, baseline, args.steps, args.size), "-"))

    print(f"\nDemo model, {args.size * 8}x{args.size * 8} px = {(args.size // 2) ** 2} image tokens, {args.steps} steps euler, "
          f"CFG {CFG}, float32, {torch.get_num_threads()} CPU threads; calibrated on {len(CALIBRATION_CAPTIONS)} "
          f"caption x {CALIBRATION_SEEDS} seeds, measured on {len(HELD_OUT)} held-out captions (one run each); "
          f"baseline run of the calibration batch {baseline_run:.1f} s\n")
    print("| plan | speedup vs full (held-out, median) | PSNR dB | SSIM | attention FLOPs kept | "
          "calibration time (baseline runs) |")
    print("|---|---|---|---|---|---|")
    for name, speedup, psnr, ssim, kept, units in rows:
        print(f"| {name} | {speedup:.2f}x | {psnr:.1f} | {ssim:.4f} | {kept} | {units} |")


if __name__ == "__main__":
    main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])  # under run_all: defaults
