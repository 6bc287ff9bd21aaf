"""Calibrated plans on the demo model against a uniform window + residual at equal measured time:
speed and faithfulness on held-out prompts, and calibration time, per search mode and delta.

Every contestant (full attention, each plan, a grid of uniform window + residual settings, and the
caching baselines: core LazyCache, core EasyCache where it can hook the model, and a first-block
cache (TeaCache / WaveSpeed style, tests/benchmarks/first_block_cache.py), each at a few thresholds)
samples each held-out caption `--rounds` times, the contestants'
order rotated every round (interleaved, so load on the machine falls on all alike); speed is the
median time of full attention / the median time of the contestant, per caption, then the median
over captions. Each plan is then set beside the uniform settings: the best PSNR any uniform setting
reaches at least as fast as the plan (measured), and the uniform setting nearest the plan's speed;
and beside the caching baselines: the best PSNR of each baseline at least as fast as the plan.
Core EasyCache hooks the model's forward through DIFFUSION_MODEL wrappers, which not every model
calls (the host's MMDiT, the demo model's class, does not): the script checks, and leaves EasyCache
out with a message where its hook never runs.

The demo model loads through ComfyUI's own loader and samples through ComfyUI's sampler (euler,
simple, CFG 4, float32). Each plan is calibrated on CALIBRATION_CAPTIONS (the first, or with
`--calibration-captions` several, one per latent row through Prompt Batch for Calibration; a batch of
seeds each), then applied to HELD_OUT captions, which calibration never saw; PSNR / SSIM are against full attention
on the same caption and seed. Calibration time is in units of one baseline sampling run of the
calibration batch. Budget plans price candidates by measured time (`--cost`). Beside each plan's
speed-up stands its FLOP bound (demo/speed.flop_bound: the largest speed-up the FLOPs the plan skips
allow); a speed-up more than 5% above it is flagged as measurement noise or load, not a result.

Run: `python tests/benchmarks/run_all.py calibration` (defaults: 1024 image tokens, 10 steps,
budget and fast, deltas 0.05 0.1 0.15: about 25 minutes on 2 CPU cores), or e.g.
`python tests/benchmarks/bench_calibration.py --size 64 --steps 20 --modes budget --deltas 0.1`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "harness" not in sys.modules:  # run directly: find the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import pack_import  # noqa: E402, I001  (loads ComfyUI and the pack first)
from harness.models import sample  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sd  # noqa: E402
import nodes as host_nodes  # noqa: E402
import torch  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode, LazyCacheNode  # noqa: E402
from first_block_cache import first_block_cache  # noqa: E402  (tests/benchmarks, beside this script)

demo = pack_import("demo")
workflows = pack_import("demo.workflows")
metrics = pack_import("metrics")
demo_nodes = pack_import("nodes.demo")
inspector = pack_import("nodes.inspector")
native = pack_import("kernels.native")
patching = pack_import("patching")
plans = pack_import("plans")
prompts = pack_import("plans.prompts")
speed = pack_import("demo.speed")

CFG = workflows.SAMPLER["cfg"]
LAZY_THRESHOLDS = (0.2, 0.5)  # core LazyCache's reuse threshold (its default: 0.2)
EASY_THRESHOLDS = (0.2,)  # core EasyCache's reuse threshold (its default: 0.2)
# First-block cache: summed relative change of the first block's residual allowed before a full call;
# at 1024 tokens and 10 steps these ran 6, 5, 3 and 2 of 10 calls in full (about 1.4x - 2.5x).
FBC_THRESHOLDS = (0.2, 0.4, 1.0, 2.0)
UNIFORM_FRACTIONS = (0.03, 0.06, 0.125, 0.25)  # uniform window + residual settings, the example's 0.125 among them
UNIFORM_REFRESH = (2, 4)
# Calibration captions (never the held-out ones; the calibration example workflow's): the first alone by default;
# `--calibration-captions` takes more, stacked one per latent row, each with `--calibration-seeds` seeds
CALIBRATION_CAPTIONS = (workflows.CAPTION, *workflows.MORE_CAPTIONS)
CALIBRATION_SEEDS = 2  # latent rows per caption: one noise per seed
HELD_OUT = (("a yellow triangle on a dotted purple background", 11),
            ("a green cross and a white circle on a checkered blue background", 12))
BOUND_SLACK = 1.05  # a speed-up up to 5% above its plan's FLOP bound passes as timer noise; more is flagged


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


def attention_share(model, positive, size: int) -> float:
    """Attention's share of one forward's FLOPs at `size` image tokens per side, from the Attention
    Inspector: the fraction Amdahl's law in demo/speed.flop_bound weighs skipped attention by."""
    return speed.attention_share(inspector.AttentionInspector.execute(model, positive, _latent(1, size)).result[0])


def bound_cell(speedup: float, bound: float) -> str:
    """A plan's FLOP bound beside its measured speed-up, flagged where the speed-up exceeds it by more
    than BOUND_SLACK: no plan runs faster than its FLOPs allow."""
    flag = " (above its FLOP bound: measurement noise or load)" if speedup > bound * BOUND_SLACK else ""
    return f"{bound:.2f}x{flag}"


def _uniform(model, fraction: float, refresh: int):
    """The example window + residual node at another window fraction and refresh."""
    inputs = {**workflows.WINDOW_BAND, "window_fraction": fraction, "refresh_every": refresh}
    return host_nodes.NODE_CLASS_MAPPINGS["FastAttnWindowResidual"].execute(model, **inputs).result[0]


def _core_cache(node, model, threshold: float):
    """Core LazyCache or EasyCache at `threshold`, between their default start and end percent."""
    return node.execute(model, threshold, 0.15, 0.95, False).result[0]


def easycache_hooks(model, positive, size: int) -> bool:
    """Whether core EasyCache's hook runs on this model: EasyCache acts in a DIFFUSION_MODEL wrapper,
    which only some model classes call; a counting wrapper of that kind beside it on the EasyCache
    clone says whether wrappers there run at all (where they never do, EasyCache is full attention
    under another name)."""
    probe = _core_cache(EasyCacheNode, model, EASY_THRESHOLDS[0])
    calls = []

    def count(executor, *args, **kwargs):
        calls.append(1)
        return executor(*args, **kwargs)

    probe.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_probe", count)
    _timed(probe, positive, _latent(1, size), 1, 0)
    return bool(calls)


# speedup (median), PSNR dB (of the captions' pooled squared error: one caption identical to full attention
# does not make it infinite), SSIM (mean), attention FLOPs kept
Row = tuple[float, float, float, str]


def interleaved(contestants: dict[str, object], rounds: int, steps: int,
                size: int) -> tuple[dict[str, Row], dict[str, str]]:
    """Each contestant on each held-out caption, `rounds` times in rotated order; the first of
    `contestants` is full attention, the reference of speed and of the images. Also returns the text
    of each contestant's last Attention Report ("": none, not the pack's)."""
    names = list(contestants)
    seconds = {name: {caption: [] for caption, _ in HELD_OUT} for name in names}
    images: dict[tuple[str, str], torch.Tensor] = {}
    kept: dict[str, str] = dict.fromkeys(names, "-")  # "-": not the pack's (caches skip whole calls)
    kept[names[0]] = "100%"
    reports: dict[str, str] = dict.fromkeys(names, "")
    for caption, seed in HELD_OUT:
        positive = _encode(caption)
        for turn in range(rounds):
            shift = turn * max(1, len(names) // rounds)
            for name in names[shift % len(names):] + names[:shift % len(names)]:
                took, out, report = _timed(contestants[name], positive, _latent(1, size), steps, seed)
                seconds[name][caption].append(took)
                images[(name, caption)] = demo_nodes.FastAttnDemoDecode.execute({"samples": out}).result[0][0]
                if report is not None:
                    reports[name] = report.summary()
                    if report.full_flops:
                        kept[name] = f"{100 * report.computed_flops / report.full_flops:.1f}%"
        print(f"  {caption}: done", flush=True)
    full = names[0]
    rows = {}
    for name in names:
        speedups = [statistics.median(seconds[full][caption]) / statistics.median(seconds[name][caption])
                    for caption, _ in HELD_OUT]
        pairs = [(images[(name, caption)], images[(full, caption)]) for caption, _ in HELD_OUT]
        rows[name] = (statistics.median(speedups), metrics.psnr(*(torch.stack(side) for side in zip(*pairs, strict=True))),
                      statistics.fmean(metrics.ssim(*pair) for pair in pairs), kept[name])
    return rows, reports


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="*", default=["budget", "fast"], choices=plans.MODES,
                        help="searches to run (none: only those --step-reuse and --block-cache add)")
    parser.add_argument("--deltas", nargs="+", type=float, default=[0.05, 0.1, 0.15])
    parser.add_argument("--cost", default="time", choices=plans.COST_MEASURES, help="budget mode's prices")
    parser.add_argument("--size", type=int, default=32,
                        help="image tokens per side (32: 1024 tokens, 512 px; 64: 4096 tokens, 1024 px)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per contestant and caption")
    parser.add_argument("--uniform-fractions", nargs="+", type=float, default=list(UNIFORM_FRACTIONS))
    parser.add_argument("--uniform-refresh", nargs="+", type=int, default=list(UNIFORM_REFRESH))
    parser.add_argument("--lazy-thresholds", nargs="*", type=float, default=list(LAZY_THRESHOLDS),
                        help="core LazyCache reuse thresholds (none: leave LazyCache out)")
    parser.add_argument("--easy-thresholds", nargs="*", type=float, default=list(EASY_THRESHOLDS),
                        help="core EasyCache reuse thresholds (none: leave EasyCache out; left out anyway "
                             "where its hook never runs on the model)")
    parser.add_argument("--fbc-thresholds", nargs="*", type=float, default=list(FBC_THRESHOLDS),
                        help="first-block cache thresholds (none: leave it out)")
    parser.add_argument("--step-reuse", action="store_true",
                        help="also budget plans with step reuse (whole steps skipped) at each delta")
    parser.add_argument("--block-cache", action="store_true",
                        help="also budget plans with block caching (with and without step reuse, as --step-reuse says)")
    parser.add_argument("--calibration-captions", type=int, default=1, choices=range(1, len(CALIBRATION_CAPTIONS) + 1),
                        help="calibrate on this many captions (a prompt batch; never the held-out ones)")
    parser.add_argument("--calibration-seeds", type=int, default=CALIBRATION_SEEDS, help="latent rows per caption")
    parser.add_argument("--save-plans", type=Path, default=None, help="write each plan's JSON into this folder")
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    captions = CALIBRATION_CAPTIONS[:args.calibration_captions]
    encoded = [_encode(caption) for caption in captions]
    calibration_positive = prompts.batch_prompts(encoded) if len(encoded) > 1 else encoded[0]  # as Prompt Batch does
    calibration_latent = _latent(len(captions) * args.calibration_seeds, args.size)

    for warm_up in (model, _uniform(model, 0.125, 4)):  # allocator, tile plans, the native kernel's build
        _timed(warm_up, calibration_positive, _latent(1, args.size), 2, 0)
    while native.building():
        time.sleep(1)
    baseline_run = _timed(model, calibration_positive, calibration_latent, args.steps, 0)[0]
    print(f"one baseline run (calibration batch of {calibration_latent['samples'].shape[0]}, {args.size ** 2} image tokens, "
          f"{args.steps} steps): {baseline_run:.1f} s", flush=True)

    contestants: dict[str, object] = {"full attention": model}
    calibration_units: dict[str, str] = {}
    searches = [(mode, False, False) for mode in args.modes] + [("budget", True, False)] * args.step_reuse
    searches += [("budget", reuse, True) for reuse in (False, True)[:1 + args.step_reuse]] * args.block_cache
    for mode, reuse, blocks in searches:
        for delta in args.deltas:
            settings = plans.Settings(delta, plans.CANDIDATES, mode=mode, cost=args.cost, step_reuse=reuse,
                                      block_cache=blocks)
            name = f"{mode}{' + step reuse' if reuse else ''}{' + block cache' if blocks else ''} plan, delta {delta:g}"
            start = time.perf_counter()
            plan, _, _ = plans.calibrate(model, calibration_positive, _encode(""), calibration_latent, seed=0,
                                         steps=args.steps, cfg=CFG, sampler="euler", scheduler="simple",
                                         settings=settings)
            calibration_units[name] = f"{(time.perf_counter() - start) / baseline_run:.1f}"
            skipped = f", steps skipped {plan.step_reuse}" if plan.reuses_steps else ""
            print(f"{name}: calibrated in {calibration_units[name]} baseline runs, {plan.counts()}{skipped}",
                  flush=True)
            if args.save_plans is not None:
                args.save_plans.mkdir(parents=True, exist_ok=True)
                (args.save_plans / f"demo_{mode}{'_reuse' * reuse}{'_blocks' * blocks}_{delta:g}.json").write_text(
                    plan.to_json())
            contestants[name] = patching.install(model, plans.PlannedAttention(plan))
    uniform_names = []
    for refresh in args.uniform_refresh:
        for fraction in args.uniform_fractions:
            uniform_names.append(f"uniform W+R window {fraction:g}, refresh {refresh}")
            contestants[uniform_names[-1]] = _uniform(model, fraction, refresh)
    easy_thresholds = args.easy_thresholds
    if easy_thresholds and not easycache_hooks(model, calibration_positive, args.size):
        print("core EasyCache left out: its DIFFUSION_MODEL wrapper never runs on this model "
              f"({type(model.get_model_object('diffusion_model')).__name__} does not call those wrappers), "
              "so it would sample exactly as full attention", flush=True)
        easy_thresholds = []
    makers = {"core LazyCache": (args.lazy_thresholds, functools.partial(_core_cache, LazyCacheNode, model)),
              "core EasyCache": (easy_thresholds, functools.partial(_core_cache, EasyCacheNode, model)),
              "first-block cache": (args.fbc_thresholds, functools.partial(first_block_cache, model))}
    baselines: dict[str, list[str]] = {}  # the caching baselines' contestants per group
    for group, (thresholds, make) in makers.items():
        baselines[group] = []
        for threshold in thresholds:
            baselines[group].append(f"{group} {threshold:g}")
            contestants[baselines[group][-1]] = make(threshold)
    share = attention_share(model, _encode(HELD_OUT[0][0]), args.size)
    print(f"{len(contestants)} contestants x {len(HELD_OUT)} captions x {args.rounds} rounds", flush=True)
    rows, reports = interleaved(contestants, args.rounds, args.steps, args.size)

    print(f"\nDemo model, {args.size * 16}x{args.size * 16} px = {args.size ** 2} image tokens, {args.steps} steps "
          f"euler, CFG {CFG}, float32, {torch.get_num_threads()} CPU threads; calibrated on "
          f"{len(captions)} caption(s) x {args.calibration_seeds} seeds, measured on {len(HELD_OUT)} held-out "
          f"captions, {args.rounds} interleaved runs each; baseline run of the calibration batch {baseline_run:.1f} s\n")
    print("| contestant | speedup vs full (median) | FLOP bound | PSNR dB | SSIM | attention FLOPs kept | "
          "calibration time (baseline runs) |")
    print("|---|---|---|---|---|---|---|")
    for name, (speedup, psnr, ssim, kept) in rows.items():
        bound = bound_cell(speedup, speed.flop_bound(share, reports[name])) if name in calibration_units else "-"
        print(f"| {name} | {speedup:.2f}x | {bound} | {psnr:.1f} | {ssim:.4f} | {kept} | "
              f"{calibration_units.get(name, '-')} |")
    print(f"\nFLOP bound: the largest speed-up the FLOPs a plan skips allow (demo/speed.flop_bound; attention is "
          f"{share:.1%} of a forward's FLOPs here); a speed-up more than {BOUND_SLACK - 1:.0%} above it is flagged.")
    print("\nEach plan beside uniform window + residual at equal measured time (speedup, PSNR dB, SSIM, FLOPs kept):\n")
    print("| plan | plan | best uniform at least as fast | nearest-speed uniform | PSNR gain over best |")
    print("|---|---|---|---|---|")
    for name in calibration_units:
        planned = rows[name]
        best = best_as_fast(rows, uniform_names, planned[0])
        nearest = min(uniform_names, key=lambda uniform: abs(rows[uniform][0] - planned[0]))
        best_cell = f"{best}: {_cell(rows[best])}" if best else "-"
        print(f"| {name} | {_cell(planned)} | {best_cell} | {nearest}: {_cell(rows[nearest])} | "
              f"{_gain(rows, name, best, 'uniform setting')} |")
    groups = [group for group, names in baselines.items() if names]
    if not groups:
        return
    print(f"\nEach plan beside the caching baselines ({', '.join(groups)}) at equal measured time: the best "
          "PSNR of each at least as fast as the plan (speedup, PSNR dB, SSIM, FLOPs kept), and the plan's PSNR gain:\n")
    print("| plan | plan | " + " | ".join(f"best {group} at least as fast | gain" for group in groups)
          + " | gain over the best baseline at least as fast |")
    print("|---|---|" + "---|---|" * len(groups) + "---|")
    for name in calibration_units:
        planned = rows[name]
        cells = []
        for group in groups:
            best = best_as_fast(rows, baselines[group], planned[0])
            cells += [f"{best}: {_cell(rows[best])}" if best else "-",
                      _gain(rows, name, best, "setting")]
        overall = best_as_fast(rows, [baseline for group in groups for baseline in baselines[group]], planned[0])
        print(f"| {name} | {_cell(planned)} | {' | '.join(cells)} | {_gain(rows, name, overall, 'baseline')} |")


def best_as_fast(rows: dict[str, Row], names: list[str], speedup: float) -> str | None:
    """The contestant among `names` with the best PSNR of those at least as fast as `speedup` (None: none is)."""
    return max((name for name in names if rows[name][0] >= speedup), key=lambda name: rows[name][1], default=None)


def _gain(rows: dict[str, Row], plan: str, rival: str | None, kind: str) -> str:
    return f"{rows[plan][1] - rows[rival][1]:+.1f} dB" if rival else f"no {kind} as fast"


def _cell(row: Row) -> str:
    speedup, psnr, ssim, kept = row
    return f"{speedup:.2f}x, {psnr:.1f}, {ssim:.3f}, {kept}"


if __name__ == "__main__":
    main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])  # under run_all: defaults
