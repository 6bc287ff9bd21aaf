"""A calibrated plan carried to other runs of the demo model: a budget plan calibrated at `--steps`
steps, applied at `--more-steps` steps and at `--denoise` (at `--steps` steps), against a plan
calibrated for that very run with the same delta.

Plans are keyed by noise level, so one plan serves any step count and a run at denoise below 1
(docs: plans/schema.py); this measures what that costs. Each plan is a budget plan priced by FLOPs
(deterministic, no time probe), calibrated on bench_calibration's calibration caption (a batch of
seeds). A run at denoise below 1 is a second pass: it starts from the full-attention image of a full
run at the same step count, caption and another seed, as an image-to-image pass would. Every plan is
applied to held-out captions (`--captions`, never seen in calibration); PSNR is against full attention
of the same run (same caption, seed, steps, denoise, start); attention FLOPs kept are the runtime's
own count over those runs. A plan calibrated at denoise below 1 records its own noise levels, so it is
applied to its own run step for step; the table marks every cell where the runtime warned and prints
the warning.

Run: `python tests/benchmarks/run_all.py plan_transfer` (defaults: 1024 image tokens, 20 -> 30 steps
and denoise 0.6, deltas 0.05 0.1), or e.g. `python tests/benchmarks/bench_plan_transfer.py --size 16
--steps 4 --more-steps 6 --deltas 0.1`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__" and "harness" not in sys.modules:  # run directly: find the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import pack_import  # noqa: E402, I001  (loads ComfyUI and the pack first)
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from bench_calibration import CALIBRATION_CAPTIONS, CALIBRATION_SEEDS, CFG, HELD_OUT  # noqa: E402

demo = pack_import("demo")
metrics = pack_import("metrics")
demo_nodes = pack_import("nodes.demo")
patching = pack_import("patching")
plans = pack_import("plans")

SAMPLER, SCHEDULER = "euler", "simple"


@dataclass(frozen=True)
class Setting:
    """One kind of run: its step count and denoise."""

    name: str
    steps: int
    denoise: float = 1.0


@dataclass
class Score:
    """A plan applied to the held-out captions of one setting."""

    psnr: float  # dB, of the captions' pooled squared error
    flops_kept: float  # computed / full attention FLOPs, over all the runs
    warnings: frozenset[str]  # what the runtime warned about on these runs (e.g. steps at other noise levels)


def _encode(caption: str) -> list:
    return demo_nodes.FastAttnDemoTextEncode.execute(caption).result[0]


def _sample(model, positive: list, start: torch.Tensor, steps: int, seed: int, denoise: float) -> torch.Tensor:
    noise = comfy.sample.prepare_noise(start, seed)
    return comfy.sample.sample(model, noise, steps, CFG, SAMPLER, SCHEDULER, positive, _encode(""), start,
                               denoise=denoise, disable_pbar=True, seed=seed)


def _start(model, positive: list, setting: Setting, seed: int, batch: int, size: int) -> torch.Tensor:
    """Where a run of `setting` starts: an empty latent, or below denoise 1 the full-attention image of
    a full run at the same steps and caption from another seed."""
    empty = torch.zeros(batch, 16, 2 * size, 2 * size)  # the demo model patches 2 x 2
    return empty if setting.denoise == 1 else _sample(model, positive, empty, setting.steps, seed + 1, 1.0)


def calibrate(model, setting: Setting, delta: float, size: int, step_reuse: bool):
    positive = _encode(CALIBRATION_CAPTIONS[0])
    start = _start(model, positive, setting, 0, CALIBRATION_SEEDS, size)
    plan, _, _ = plans.calibrate(model, positive, _encode(""), {"samples": start}, seed=0, steps=setting.steps,
                              cfg=CFG, sampler=SAMPLER, scheduler=SCHEDULER, denoise=setting.denoise,
                              settings=plans.Settings(delta, plans.CANDIDATES, mode="budget", cost="flops",
                                                      step_reuse=step_reuse))
    skipped = f", steps skipped {plan.step_reuse}" if plan.reuses_steps else ""
    print(f"delta {delta:g}, calibrated for {setting.name}: {plan.counts()}{skipped}", flush=True)
    return plan


@dataclass(frozen=True)
class Reference:
    """One held-out caption's run of a setting with full attention."""

    positive: list
    seed: int
    start: torch.Tensor
    image: torch.Tensor


def _decode(latent: torch.Tensor) -> torch.Tensor:
    return demo_nodes.FastAttnDemoDecode.execute({"samples": latent}).result[0][0]


def references(model, setting: Setting, captions: list[tuple[str, int]], size: int) -> list[Reference]:
    runs = []
    for caption, seed in captions:
        positive = _encode(caption)
        start = _start(model, positive, setting, seed, 1, size)
        image = _decode(_sample(model, positive, start, setting.steps, seed, setting.denoise))
        runs.append(Reference(positive, seed, start, image))
    return runs


def score(model, plan, setting: Setting, runs: list[Reference]) -> Score:
    """`plan` on each held-out run of `setting`, against full attention on that run."""
    patched = patching.install(model, plans.PlannedAttention(plan))
    images, computed, full, warnings = [], 0, 0, set()
    for run in runs:
        images.append(_decode(_sample(patched, run.positive, run.start, setting.steps, run.seed, setting.denoise)))
        report = patching.patch_of(patched).last_report
        computed, full = computed + report.computed_flops, full + report.full_flops
        warnings.update(report.warnings)
    psnr = metrics.psnr(torch.stack(images), torch.stack([run.image for run in runs]))
    return Score(psnr, computed / full, frozenset(warnings))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image tokens per side (32: 1024 tokens, 512 px)")
    parser.add_argument("--steps", type=int, default=20, help="the steps the transferred plan is calibrated at")
    parser.add_argument("--more-steps", type=int, default=30, help="the other step count it is applied at")
    parser.add_argument("--denoise", type=float, default=0.6, help="the denoise it is applied at (at --steps)")
    parser.add_argument("--deltas", nargs="+", type=float, default=[0.05, 0.1])
    parser.add_argument("--captions", nargs="+", default=[caption for caption, _ in HELD_OUT],
                        help="held-out captions (seeds 11, 12, ...)")
    parser.add_argument("--step-reuse", action="store_true", help="budget plans with step reuse")
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    source = Setting(f"{args.steps} steps", args.steps)
    targets = (Setting(f"{args.more_steps} steps", args.more_steps),
               Setting(f"denoise {args.denoise:g}, {args.steps} steps", args.steps, args.denoise))
    captions = [(caption, 11 + index) for index, caption in enumerate(args.captions)]
    runs = {target: references(model, target, captions, args.size) for target in targets}
    rows = []
    for delta in args.deltas:
        transferred = calibrate(model, source, delta, args.size, args.step_reuse)
        for target in targets:
            own = calibrate(model, target, delta, args.size, args.step_reuse)
            rows.append((target.name, delta, score(model, transferred, target, runs[target]),
                         score(model, own, target, runs[target])))

    command = ["python", "tests/benchmarks/bench_plan_transfer.py", "--size", str(args.size), "--steps",
               str(args.steps), "--more-steps", str(args.more_steps), "--denoise", f"{args.denoise:g}",
               "--deltas", *(f"{delta:g}" for delta in args.deltas), "--captions", *args.captions,
               *(["--step-reuse"] if args.step_reuse else [])]
    print(f"\n`{shlex.join(command)}`\n\nDemo model, {args.size ** 2} image tokens, {SAMPLER} {SCHEDULER}, CFG {CFG}, "
          f"float32, {torch.get_num_threads()} CPU threads; budget plans{' with step reuse' * args.step_reuse} priced "
          f"by FLOPs, calibrated on "
          f"{len(CALIBRATION_CAPTIONS)} caption x {CALIBRATION_SEEDS} seeds; PSNR against full attention of the same "
          f"run, pooled over {len(captions)} held-out captions; the transferred plan was calibrated at {source.name}\n")
    print("| setting | delta | PSNR dB, transferred plan | PSNR dB, plan made for the run | difference | "
          "attention FLOPs kept, transferred | attention FLOPs kept, made for the run |")
    print("|---|---|---|---|---|---|---|")
    notes: dict[str, str] = {}  # warning -> its mark
    for name, delta, moved, own in rows:
        moved_mark, own_mark = (_marks(notes, score.warnings) for score in (moved, own))
        print(f"| {name} | {delta:g} | {moved.psnr:.1f}{moved_mark} | {own.psnr:.1f}{own_mark} | "
              f"{moved.psnr - own.psnr:+.1f} dB | {100 * moved.flops_kept:.1f}% | {100 * own.flops_kept:.1f}% |")
    for warning, mark in notes.items():  # a plan made for the run that is warned about was not applied as calibrated
        print(f"\n{mark} FastAttn warned on these runs: {warning}")


def _marks(notes: dict[str, str], warnings: frozenset[str]) -> str:
    """Footnote marks for `warnings`, numbering new ones in `notes`."""
    return "".join(notes.setdefault(warning, f"[{len(notes) + 1}]") for warning in sorted(warnings))


if __name__ == "__main__":
    main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])  # under run_all: defaults
