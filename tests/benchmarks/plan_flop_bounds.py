"""The FLOP bound of saved plans on the demo model: the largest speed-up the FLOPs a plan skips
allow (demo/speed.flop_bound: attention FLOPs not computed, projections branch sharing did not
run, and the whole forwards step reuse skipped, with attention's share of a forward from the
Attention Inspector). A measured speed-up above its plan's bound is machine load, not a result.

Run: `python tests/benchmarks/plan_flop_bounds.py --size 32 --steps 10 PLAN.json ...` (plans written
by `bench_calibration.py --save-plans`); each plan samples one held-out caption once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and "harness" not in sys.modules:  # run directly: find the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import pack_import  # noqa: E402, I001  (loads ComfyUI and the pack first)
from harness.models import sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
from bench_calibration import CFG, HELD_OUT, attention_share  # noqa: E402

demo = pack_import("demo")
speed = pack_import("demo.speed")
demo_nodes = pack_import("nodes.demo")
patching = pack_import("patching")
plans = pack_import("plans")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("plans", nargs="+", type=Path)
    parser.add_argument("--size", type=int, default=32, help="image tokens per side")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    caption, seed = HELD_OUT[0]
    positive = demo_nodes.FastAttnDemoTextEncode.execute(caption).result[0]
    negative = demo_nodes.FastAttnDemoTextEncode.execute("").result[0]
    latent = {"samples": torch.zeros(1, 16, 2 * args.size, 2 * args.size)}
    share = attention_share(model, positive, args.size)
    print(f"{args.size ** 2} image tokens, {args.steps} steps: attention is {share:.1%} of a forward's FLOPs\n")
    print("| plan | FLOP bound |\n|---|---|")
    for path in args.plans:
        patched = patching.install(model, plans.PlannedAttention(plans.Plan.from_json(path.read_text())))
        sample(patched, positive, negative, latent, steps=args.steps, cfg=CFG, seed=seed)
        print(f"| {path.name} | {speed.flop_bound(share, patching.patch_of(patched).last_report.summary()):.2f}x |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] if Path(sys.argv[0]).name == Path(__file__).name else [])
