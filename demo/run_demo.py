"""`make demo`: the demo model through a real headless ComfyUI, every technique, one table.

Starts the host with the pack (torch SDPA attention, CPU), queues the demo workflows through
the API queue (baseline first, then each technique), saves the images in output/, and prints
wall time of the sampler, speedup, attention FLOPs kept, PSNR and SSIM against the baseline.
The demo U-Net follows, unpatched and with DeepCache (its example workflow), against its own
baseline.
One short untimed warm-up run comes first, so that loading the model and the first use of the
attention kernels are not counted in any row.

    .venv/bin/python demo/run_demo.py [--size 1024] [--steps 20] [--write-workflows] [--write-plan]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import node_io, pack_import  # noqa: E402  (loads ComfyUI and the pack in this process)
from harness.server import ComfyServer  # noqa: E402

workflows = pack_import("demo.workflows")
metrics = pack_import("demo.metrics")
storage = pack_import("plans.storage")
WARM_UP = "combined"  # full, window + residual and CFG-shared attention calls all run once
SHIPPED_PLAN_SIZE = 512  # px: 1024 image tokens, minutes on a CPU; the plan's window is a fraction, it carries


def write_shipped_plan(output: Path) -> None:
    """Calibrate the shipped plan (demo/plans/) with the example Calibrate workflow, as a user would
    (in a fresh user folder, so no plan saved by an earlier run is in its way)."""
    with tempfile.TemporaryDirectory() as scratch, ComfyServer(Path(scratch), output_dir=output) as server:
        result = server.run(workflows.calibrate_graph(SHIPPED_PLAN_SIZE, plan_name="shipped"))
        if result.status != "success":
            raise SystemExit(f"the calibrate workflow failed: {result.error}")
        saved = server.scratch / "user" / "default" / storage.FOLDER / "shipped.json"
        workflows.SHIPPED_PLAN.write_text(saved.read_text())
    print(f"wrote {workflows.SHIPPED_PLAN.relative_to(REPO)}; now run --write-workflows to paste it into the examples")


def _image(server: ComfyServer, result) -> tuple[Path, torch.Tensor]:
    saved = result.outputs("save")["images"][0]
    path = server.output_dir / saved.get("subfolder", "") / saved["filename"]
    return path, torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def _kept(result) -> str:
    text = "".join(result.outputs("report").get("text", []))
    match = re.search(r"attention FLOPs computed ([\d.]+)% of full", text)
    return f"{match.group(1)}%" if match else "100%"


def _timed(server: ComfyServer, name: str, graph: dict, timed_node: str):
    """Queue `graph`; the result, the seconds `timed_node` took, and the saved image (path, pixels)."""
    result = server.run(graph)
    if result.status != "success":
        raise SystemExit(f"workflow {name} failed: {result.error}")
    seconds = result.seconds_in(timed_node)
    path, image = _image(server, result)
    print(f"{name}: {seconds:.1f} s -> {path.relative_to(REPO)}", flush=True)
    return result, seconds, path, image


def unet_rows(server: ComfyServer, steps: int) -> list[tuple]:
    """The demo U-Net unpatched, then with DeepCache (the example workflow's settings): table rows,
    after an untimed 2-step warm-up (the first sampling of a model pays for setting it up)."""
    _timed(server, "U-Net warm-up (2 steps, not timed)", workflows.unet_graph(steps=2, prefix="warm_up_unet"), "sampler")
    rows, baseline = [], None
    for name, settings in (("U-Net baseline", None), ("U-Net DeepCache 1:3", workflows.DEEPCACHE)):
        prefix = name.replace(" ", "_").replace(":", "_")
        _, seconds, path, image = _timed(server, name, workflows.unet_graph(settings, steps=steps, prefix=prefix),
                                         "sampler")
        baseline = baseline or (seconds, image)
        rows.append((name, seconds, baseline[0] / seconds, "-", metrics.psnr(image, baseline[1]),
                     metrics.ssim(image, baseline[1]), path))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image size given to EmptySD3LatentImage")
    parser.add_argument("--steps", type=int, default=workflows.SAMPLER["steps"])
    parser.add_argument("--write-workflows", action="store_true",
                        help="only (re)write example_workflows/ from demo/workflows.py")
    parser.add_argument("--write-plan", action="store_true",
                        help=f"only recalibrate the shipped plan ({SHIPPED_PLAN_SIZE} px, the calibrate example's settings)")
    args = parser.parse_args(argv)
    output = REPO / "output"
    if args.write_plan:
        write_shipped_plan(output)
        return
    if args.write_workflows:
        for path in workflows.write_example_workflows(node_io):
            print(f"wrote {path.relative_to(REPO)}")
        return
    with ComfyServer(output / ".server", output_dir=output) as server:
        inspected = server.run(workflows.inspector_graph(args.size))
        if inspected.status != "success":
            raise SystemExit(f"the inspector graph failed: {inspected.error}")
        print("".join(inspected.outputs("inspector")["text"]), "\n", flush=True)
        warm_up = server.run(workflows.demo_graph(WARM_UP, args.size, steps=2, prefix="warm_up"))
        if warm_up.status != "success":
            raise SystemExit(f"the warm-up run failed: {warm_up.error}")
        print(f"warm-up ({WARM_UP}, 2 steps): {warm_up.seconds_in('sampler'):.1f} s, not timed", flush=True)
        rows, baseline = [], None
        runs = [(name, workflows.demo_graph(name, args.size, args.steps), "sampler") for name in workflows.TECHNIQUES]
        # the calibrate workflow's time is the calibration's; its image is the plan applied by the sampler
        runs.append(("calibrate (time of the calibration)", workflows.calibrate_graph(args.size, args.steps), "calibrate"))
        for name, graph, timed_node in runs:
            result, seconds, path, image = _timed(server, name, graph, timed_node)
            baseline = baseline or (seconds, image)
            rows.append((name, seconds, baseline[0] / seconds, _kept(result),
                         metrics.psnr(image, baseline[1]), metrics.ssim(image, baseline[1]), path))
        rows += unet_rows(server, args.steps)
    tokens = (args.size // 16) ** 2
    print(f"\nDemo model, {args.size}x{args.size} ({tokens} image tokens), {args.steps} steps, CFG "
          f"{workflows.SAMPLER['cfg']}, CPU, torch SDPA baseline; the U-Net rows: the demo U-Net at "
          f"{workflows.UNET_SIZE} px (a 16 x 16 latent), against its own baseline\n")
    print("| workflow | sampler wall time s | speedup | attention FLOPs kept | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|")
    for name, seconds, speedup, kept, psnr, ssim, _ in rows:
        print(f"| {name} | {seconds:.1f} | {speedup:.2f}x | {kept} | {psnr:.1f} | {ssim:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
