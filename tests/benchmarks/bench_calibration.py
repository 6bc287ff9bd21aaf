"""Calibrated plans on the demo model: FLOPs kept, speed and faithfulness on held-out prompts,
and calibration time, per search mode and delta, each beside its two comparisons:

  at equal FLOPs  a uniform window + residual plan (the example node, full attention every
                  `refresh_every` steps) whose window fraction is bisected to keep the plan's
                  attention FLOPs (refresh 4 as the example, longer only if 4 cannot go that low);
  at equal speed  core LazyCache at the reuse threshold, of a small sweep, whose measured
                  speedup is closest to the plan's.

The demo model loads through ComfyUI's own loader and samples through ComfyUI's sampler
(euler, simple, CFG 4, float32). Each plan is calibrated on CALIBRATION_CAPTIONS (a batch of
seeds), then applied to HELD_OUT captions, which calibration never saw; PSNR / SSIM are against
full attention on the same caption and seed. Calibration time is in units of one baseline
sampling run of the calibration batch, printed first so the length of the whole run can be
estimated (about: 2 + 2 x held-out runs per row, one row per plan, per uniform match and per
LazyCache threshold, plus calibration: fast ~3, greedy ~L x candidates baseline runs per plan).

Run: `python tests/benchmarks/run_all.py calibration` (defaults: 4096 image tokens, 20 steps, both
modes, the paper's six deltas: hours on 2 CPU cores), or reduced, e.g.
`python tests/benchmarks/bench_calibration.py --size 32 --steps 10 --modes fast --deltas 0.05 0.1 --per-head`.
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
metrics = pack_import("metrics")
demo_nodes = pack_import("nodes.demo")
kernels = pack_import("kernels")
backends = pack_import("kernels.backends")
native = pack_import("kernels.native")
patching = pack_import("patching")
plans = pack_import("plans")
schema = pack_import("plans.schema")
Timeline = pack_import("patching.timeline").Timeline

CFG = workflows.SAMPLER["cfg"]
DELTAS = (0.025, 0.05, 0.075, 0.1, 0.125, 0.15)  # the paper's sweep
LAZY_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5)  # core LazyCache's reuse threshold (its default: 0.2)
REFRESH = (4, 8, 16)  # uniform window + residual: the example's refresh first, longer to reach fewer FLOPs
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


def _latent(batch: int, tokens_per_side: int) -> dict:
    """An empty latent whose image has tokens_per_side^2 tokens (the demo model patches 2 x 2)."""
    return {"samples": torch.zeros(batch, 16, 2 * tokens_per_side, 2 * tokens_per_side)}


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


def _uniform(model, fraction: float, refresh: int):
    """The example window + residual node at another window fraction and refresh."""
    inputs = {**workflows.WINDOW_BAND, "window_fraction": fraction, "refresh_every": refresh}
    return host_nodes.NODE_CLASS_MAPPINGS["FastAttnWindowResidual"].execute(model, **inputs).result[0]


def schedule_flops_kept(schedule, layers: list, timeline) -> float:
    """Attention FLOPs a DiTFastAttn schedule computes / full attention's, counted as the runtime
    counts them (a full step that caches a residual pays for the window too), without sampling."""
    backend = backends.choose_backend("auto", torch.device("cpu"))
    computed = full = 0
    for step in range(timeline.steps):
        for record in layers:
            whole = 4 * record.heads * record.q_len * record.k_len * record.head_dim
            full += whole
            if record.kind not in schema.WINDOWED_KINDS or record.layout is None:
                computed += whole
                continue
            choice = schedule.choose(step, timeline, record.layer)
            if choice.compute == "window":
                computed += _window_flops(record, choice.window, backend)
            elif choice.compute == "full":
                size = schedule.residual_window(step, timeline, record.layer)
                computed += whole + (_window_flops(record, size, backend) if size is not None else 0)
    return computed / full


def _window_flops(record, size, backend: str) -> int:
    """FLOPs of one window attention call of this layer (batch 1)."""
    return kernels.attention_flops(record.layout, size.window_for(record.layout), batch=1, heads=record.heads,
                                   head_dim=record.head_dim, backend=backend).computed


def matching_uniform(model, layers: list, steps: int, target: float) -> tuple[object, str]:
    """The uniform window + residual model keeping `target` attention FLOPs (bisection over the
    window fraction, at the first refresh of REFRESH that can go that low), and its settings."""
    timeline = Timeline.ksampler(model.get_model_object("model_sampling"), "simple", steps)

    def kept(fraction: float, refresh: int) -> float:
        return schedule_flops_kept(patching.patch_of(_uniform(model, fraction, refresh)).method.schedule,
                                   layers, timeline)

    refresh = next((r for r in REFRESH if kept(0.01, r) <= target), REFRESH[-1])
    low, high = 0.01, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if kept(middle, refresh) < target else (low, middle)
    fraction = low if abs(kept(low, refresh) - target) <= abs(kept(high, refresh) - target) else high
    settings = f"window {fraction:.3f}, refresh {refresh} (estimated {kept(fraction, refresh):.1%})"
    return _uniform(model, fraction, refresh), settings


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(plans.MODES), choices=plans.MODES)
    parser.add_argument("--per-head", action="store_true", help="also calibrate fast mode per head at each delta")
    parser.add_argument("--deltas", nargs="+", type=float, default=list(DELTAS))
    parser.add_argument("--size", type=int, default=64,
                        help="image tokens per side (64: 4096 tokens, 1024 px; 32: 1024 tokens, 512 px)")
    parser.add_argument("--steps", type=int, default=workflows.SAMPLER["steps"])
    parser.add_argument("--lazy-thresholds", nargs="+", type=float, default=list(LAZY_THRESHOLDS),
                        help="LazyCache reuse thresholds swept for the equal-speed comparison")
    parser.add_argument("--save-plans", type=Path, default=None, help="write each plan's JSON into this folder")
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    calibration_positive = _encode(CALIBRATION_CAPTIONS[0])
    calibration_latent = _latent(CALIBRATION_SEEDS, args.size)

    for warm_up in (model, _uniform(model, 0.125, 4)):  # allocator, tile plans, the native kernel's build
        _timed(warm_up, calibration_positive, _latent(1, args.size), 2, 0)
    while native.building():
        time.sleep(1)
    baseline_run = _timed(model, calibration_positive, calibration_latent, args.steps, 0)[0]
    print(f"one baseline run (calibration batch of {CALIBRATION_SEEDS}, {args.size ** 2} image tokens, "
          f"{args.steps} steps): {baseline_run:.1f} s", flush=True)
    baseline = {}
    for caption, seed in HELD_OUT:
        seconds, out, _ = _timed(model, _encode(caption), _latent(1, args.size), args.steps, seed)
        baseline[caption] = (seconds, demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0])
    probe = patching.install(model)  # the attention layers as the runtime sees them, for FLOPs counts
    sample(probe, calibration_positive, _encode(""), _latent(1, args.size), steps=1, cfg=CFG)
    layers = patching.patch_of(probe).last_report.layers

    lazy = []  # (threshold, held-out row), the equal-speed candidates
    for threshold in args.lazy_thresholds:
        cached = LazyCacheNode.execute(model, threshold, 0.15, 0.95, False).result[0]
        lazy.append((threshold, _held_out(cached, baseline, args.steps, args.size)))
        print(f"LazyCache {threshold:g}: {lazy[-1][1]}", flush=True)

    searches = [(mode, False) for mode in args.modes]
    searches += [("fast", True)] if args.per_head else []
    rows, pairs = [], []
    for mode, per_head in searches:
        for delta in args.deltas:
            settings = plans.Settings(delta, plans.CANDIDATES, mode=mode, per_head=per_head)
            name = f"{mode}{' per-head' if per_head else ''} plan, delta {delta:g}"
            start = time.perf_counter()
            plan, _ = plans.calibrate(model, calibration_positive, _encode(""), calibration_latent, seed=0,
                                      steps=args.steps, cfg=CFG, sampler="euler", scheduler="simple",
                                      settings=settings)
            calibration_units = (time.perf_counter() - start) / baseline_run
            if args.save_plans is not None:
                args.save_plans.mkdir(parents=True, exist_ok=True)
                label = f"{mode}{'_per_head' if per_head else ''}"
                (args.save_plans / f"demo_{label}_{delta:g}.json").write_text(plan.to_json())
            planned = _held_out(patching.install(model, plans.PlannedAttention(plan)), baseline, args.steps, args.size)
            uniform, uniform_settings = matching_uniform(model, layers, args.steps, plan.flops_kept)
            matched = _held_out(uniform, baseline, args.steps, args.size)  # measured right after the plan
            threshold, fastest = min(lazy, key=lambda entry: abs(entry[1][0] - planned[0]))
            rows.append((name, *planned, f"{calibration_units:.1f}"))
            pairs.append((name, planned, uniform_settings, matched,
                          f"{threshold:g}", fastest))
            print(rows[-1], pairs[-1][2:4], flush=True)
    for name in ("window_residual", "combined"):
        chain = workflows.TECHNIQUES[name][1]
        uniform = model
        for class_type, inputs in chain:
            uniform = host_nodes.NODE_CLASS_MAPPINGS[class_type].execute(uniform, **inputs).result[0]
        rows.append((f"uniform: {name} (example settings)", *_held_out(uniform, baseline, args.steps, args.size), "-"))
    rows += [(f"core LazyCache {threshold:g}", *row, "-") for threshold, row in lazy]

    print(f"\nDemo model, {args.size * 16}x{args.size * 16} px = {args.size ** 2} image tokens, {args.steps} steps "
          f"euler, CFG {CFG}, float32, {torch.get_num_threads()} CPU threads; calibrated on "
          f"{len(CALIBRATION_CAPTIONS)} caption x {CALIBRATION_SEEDS} seeds, measured on {len(HELD_OUT)} held-out "
          f"captions (one run each); baseline run of the calibration batch {baseline_run:.1f} s\n")
    print("| plan | speedup vs full (held-out, median) | PSNR dB | SSIM | attention FLOPs kept | "
          "calibration time (baseline runs) |")
    print("|---|---|---|---|---|---|")
    for name, speedup, psnr, ssim, kept, units in rows:
        print(f"| {name} | {speedup:.2f}x | {psnr:.1f} | {ssim:.4f} | {kept} | {units} |")
    print("\nSide by side (speedup, PSNR dB, SSIM, FLOPs kept):\n")
    print("| plan | plan | uniform W+R at equal FLOPs | its settings | LazyCache at equal speed | its threshold |")
    print("|---|---|---|---|---|---|")
    for name, planned, settings, matched, threshold, fastest in pairs:
        print(f"| {name} | {_cell(planned)} | {_cell(matched)} | {settings} | {_cell(fastest)} | {threshold} |")


def _cell(row: tuple[float, float, float, str]) -> str:
    speedup, psnr, ssim, kept = row
    return f"{speedup:.2f}x, {psnr:.1f}, {ssim:.3f}, {kept}"


if __name__ == "__main__":
    main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])  # under run_all: defaults
