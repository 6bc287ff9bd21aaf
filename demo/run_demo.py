"""`make demo`: the demo model through a real headless ComfyUI, every technique, one table.

Starts the host with the pack (torch SDPA attention, CPU), queues the demo workflows through
the API queue, saves the images in output/, and prints wall time of the sampler, speedup,
attention FLOPs kept, PSNR and SSIM against the baseline. One short untimed warm-up run comes
first, so that loading the model and the first use of the attention kernels are not counted in
any row. Every workflow then runs in each of `--rounds` rounds, each round starting at another
workflow (the server caches nothing, so each run samples); demo/speed.py turns the times into
median speed-ups and shows one above the FLOP bound as the measurement error it is. The demo
U-Net follows, unpatched and with DeepCache (its example workflow), in rounds of its own against
its own baseline.

    .venv/bin/python demo/run_demo.py [--size 1024] [--steps 20] [--rounds 3] [--write-workflows] [--write-plan]
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


class _HostAudioNodes(logging.Filter):
    """The host logs tracebacks and warnings when its audio nodes and models cannot import torchaudio
    (not installed: the pack and the demo do not use it); one line says so instead."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "torchaudio" not in record.getMessage():
            return True
        if not self.said:
            print("(ComfyUI's audio nodes are not loaded: torchaudio is not installed; the demo does not need them)")
            self.said = True
        return False


logging.getLogger().addFilter(_HostAudioNodes())

from harness import node_io, pack_import  # noqa: E402  (loads ComfyUI and the pack in this process)
from harness.server import ComfyServer  # noqa: E402

workflows = pack_import("demo.workflows")
metrics = pack_import("metrics")
storage = pack_import("plans.storage")
speed = pack_import("demo.speed")
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


def _kept(text: str) -> str:
    match = re.search(r"attention FLOPs computed ([\d.]+)% of full", text)
    return f"{match.group(1)}%" if match else "100%"


def _rounds(server: ComfyServer, graphs: dict[str, dict], rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Each graph once per round, each round starting at another one: the sampler's seconds of every
    run, and each graph's last result."""
    seconds: dict[str, list[float]] = {name: [] for name in graphs}
    results = {}
    for round_index, order in enumerate(speed.round_orders(list(graphs), rounds)):
        for name in order:
            result = server.run(graphs[name])
            if result.status != "success":
                raise SystemExit(f"workflow {name} failed: {result.error}")
            seconds[name].append(result.seconds_in("sampler"))
            results[name] = result
            print(f"round {round_index + 1}/{rounds}, {name}: {seconds[name][-1]:.1f} s", flush=True)
    return seconds, results


def unet_rows(server: ComfyServer, steps: int, rounds: int) -> list[tuple]:
    """The demo U-Net unpatched, then with DeepCache (the example workflow's settings), in interleaved
    rounds after an untimed 2-step warm-up: table rows against its own baseline (no FLOP bound
    column: DeepCache skips blocks, not attention)."""
    server.run(workflows.unet_graph(steps=2, prefix="warm_up_unet"))
    graphs = {name: workflows.unet_graph(settings, steps=steps, prefix=name.replace(" ", "_").replace(":", "_"))
              for name, settings in (("U-Net baseline", None), ("U-Net DeepCache 1:3", workflows.DEEPCACHE))}
    seconds, results = _rounds(server, graphs, rounds)
    _, reference = _image(server, results["U-Net baseline"])
    rows = []
    for name, result in results.items():
        path, image = _image(server, result)
        each = " / ".join(f"{s:.2f}" for s in speed.round_speedups(seconds["U-Net baseline"], seconds[name]))
        rows.append((name, statistics.median(seconds[name]),
                     f"{speed.median_speedup(seconds['U-Net baseline'], seconds[name]):.2f}x", each, "-", "-",
                     metrics.psnr(image, reference), metrics.ssim(image, reference)))
        print(f"{name} -> {path.relative_to(REPO)}")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image size given to EmptySD3LatentImage")
    parser.add_argument("--steps", type=int, default=workflows.SAMPLER["steps"])
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each workflow (medians)")
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
    with ComfyServer(output / ".server", output_dir=output, extra_args=("--cache-none",)) as server:
        inspected = server.run(workflows.inspector_graph(args.size))
        if inspected.status != "success":
            raise SystemExit(f"the inspector graph failed: {inspected.error}")
        inspector_text = "".join(inspected.outputs("inspector")["text"])
        print(inspector_text, "\n", flush=True)
        warm_up = server.run(workflows.demo_graph(WARM_UP, args.size, steps=2, prefix="warm_up"))
        if warm_up.status != "success":
            raise SystemExit(f"the warm-up run failed: {warm_up.error}")
        print(f"warm-up ({WARM_UP}, 2 steps): {warm_up.seconds_in('sampler'):.1f} s, not timed", flush=True)
        graphs = {name: workflows.demo_graph(name, args.size, args.steps) for name in workflows.TECHNIQUES}
        seconds, results = _rounds(server, graphs, args.rounds)
        # the calibrate workflow's time is the calibration's (once: not a speed-up); its image is the plan applied
        calibrated = server.run(workflows.calibrate_graph(args.size, args.steps))
        if calibrated.status != "success":
            raise SystemExit(f"workflow calibrate failed: {calibrated.error}")
        share = speed.attention_share(inspector_text)
        _, reference = _image(server, results["baseline"])
        rows = []
        for name, result in [*results.items(), ("calibrate (time of the calibration)", calibrated)]:
            path, image = _image(server, result)
            report = "".join(result.outputs("report").get("text", []))
            if name in seconds:
                median, bound = statistics.median(seconds[name]), speed.flop_bound(share, report)
                cell = speed.speedup_cell(speed.median_speedup(seconds["baseline"], seconds[name]), bound)
                each = " / ".join(f"{s:.2f}" for s in speed.round_speedups(seconds["baseline"], seconds[name]))
                bound_cell = f"{bound:.2f}x"
            else:
                median, cell, each, bound_cell = result.seconds_in("calibrate"), "(calibration)", "", ""
            rows.append((name, median, cell, each, bound_cell, _kept(report), metrics.psnr(image, reference),
                         metrics.ssim(image, reference)))
            print(f"{name} -> {path.relative_to(REPO)}")
        rows += unet_rows(server, args.steps, args.rounds)
    tokens = (args.size // 16) ** 2
    print(f"\nDemo model, {args.size}x{args.size} ({tokens} image tokens), {args.steps} steps, CFG "
          f"{workflows.SAMPLER['cfg']}, CPU, torch SDPA baseline; medians of {args.rounds} interleaved rounds; "
          f"attention {100 * share:.1f}% of the FLOPs; the U-Net rows: the demo U-Net at {workflows.UNET_SIZE} px (a "
          "16 x 16 latent) against its own baseline\n")
    print("| workflow | sampler wall time s | speedup | per round | FLOP bound | attention FLOPs kept | PSNR dB | SSIM |")
    print("|---|---|---|---|---|---|---|---|")
    for name, median, cell, each, bound, kept, psnr, ssim in rows:
        print(f"| {name} | {median:.1f} | {cell} | {each} | {bound} | {kept} | {psnr:.1f} | {ssim:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
