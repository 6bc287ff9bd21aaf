"""Branch-level vs call-level sharing on real-dimension blocks of ComfyUI's own classes.

One block, random weights, float32, batch 1 (2 for the CFG rows): the time of a full step, of a
step-shared step that skips only the attention call (call level) and of one that skips the whole
attention branch (branch level: QKV and output projections too), and for the FLUX double block a
CFG-shared step (conditional and unconditional rows with the same input). Each shared step runs
through the pack's runtime (ForwardPass, DiTFastAttn, the projection wrappers) after a computed
step stored its caches. Variants run interleaved, medians over the repeats; `bound` is the shared
step's share of the full step's FLOPs (linear layers + attention), counted from the same runs.
Run: `python tests/benchmarks/run_all.py branch` (FLUX double block at 1024^2, step-shared: about 5
minutes on 2 busy cores); `--all` adds its CFG-shared step, the FLUX single block and SD3.5's joint
block, `--large` FLUX at 2048^2, `--wan` a Wan 2.1 14B block at 480p x 33 frames (`--wan-frames`
latent frames); `--rows` names rows one by one. `--smoke` runs the chosen rows with tiny blocks and
grids (seconds), to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import comfy.ops
import torch
from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND, SingleStreamBlock
from comfy.ldm.modules.diffusionmodules.mmdit import JointBlock
from comfy.ldm.wan.model import WanAttentionBlock, WanModel
from harness import pack_import
from harness.models import linear_timeline

patching = pack_import("patching")
adapters = pack_import("patching.adapters")
branch = pack_import("patching.branch")
state = pack_import("patching.state")
schedule = pack_import("patching.schedule")
DiTFastAttn = pack_import("patching.ditfastattn").DiTFastAttn

REPEATS = 3
OPS = comfy.ops.disable_weight_init


@dataclass
class Case:
    name: str
    block: torch.nn.Module
    container: torch.nn.Module  # the block where the adapter's map expects it
    adapter: str
    grid: tuple[int, ...]
    text_len: int
    inputs: Callable[[int], tuple[tuple, dict]]  # batch -> the block's args, kwargs (fresh: blocks add in place)


def _random(module: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(0)
    for parameter in module.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.02
    return module.eval()


def _flux_pe(grid: tuple[int, int], text_len: int) -> torch.Tensor:
    ids = torch.zeros(text_len + grid[0] * grid[1], 3)
    ids[text_len:, 1] = torch.arange(grid[0]).repeat_interleave(grid[1])
    ids[text_len:, 2] = torch.arange(grid[1]).repeat(grid[0])
    return EmbedND(128, 10000, [16, 56, 56])(ids[None])


def _flux_case(kind: str, side: int, smoke: bool) -> Case:
    hidden, heads, text = (256, 2, 32) if smoke else (3072, 24, 512)  # heads of 128 either way (rope axes)
    grid = (side // (128 if smoke else 16),) * 2  # 8x8 latent pixels, 2x2 patches; --smoke: 8x fewer per side
    image = grid[0] * grid[1]
    pe = _flux_pe(grid, text)
    container = torch.nn.Module()
    if kind == "double":
        block = _random(DoubleStreamBlock(hidden, heads, 4.0, qkv_bias=True, operations=OPS))
        container.double_blocks, container.single_blocks = torch.nn.ModuleList([block]), torch.nn.ModuleList()

        def inputs(batch: int) -> tuple[tuple, dict]:
            g = torch.Generator().manual_seed(1)
            img, txt = torch.randn(1, image, hidden, generator=g), torch.randn(1, text, hidden, generator=g)
            return (img.repeat(batch, 1, 1), txt.repeat(batch, 1, 1), torch.randn(batch, hidden, generator=g),
                    pe.expand(batch, -1, -1, -1, -1, -1)), {}
    else:
        block = _random(SingleStreamBlock(hidden, heads, 4.0, operations=OPS))
        container.double_blocks, container.single_blocks = torch.nn.ModuleList(), torch.nn.ModuleList([block])

        def inputs(batch: int) -> tuple[tuple, dict]:
            g = torch.Generator().manual_seed(1)
            x = torch.randn(1, text + image, hidden, generator=g)
            return (x.repeat(batch, 1, 1), torch.randn(batch, hidden, generator=g),
                    pe.expand(batch, -1, -1, -1, -1, -1)), {}
    name = f"FLUX {kind} block {side}^2 ({image}+{text} tokens)"
    return Case(_smoke_name(name, smoke), block, container, "Flux", grid, text, inputs)


def _sd35_case(smoke: bool) -> Case:
    # SD3.5 Large at 1024^2, 77 + 256 text tokens
    hidden, heads, grid, text = (128, 2, (8, 8), 16) if smoke else (64 * 38, 38, (64, 64), 333)
    block = _random(JointBlock(hidden, heads, mlp_ratio=4, qkv_bias=True, attn_mode="torch", pre_only=False,
                               qk_norm="rms", operations=OPS))
    container = torch.nn.Module()
    container.joint_blocks, container.context_processor = torch.nn.ModuleList([block]), None

    def inputs(batch: int) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(1)
        context = torch.randn(1, text, hidden, generator=g).repeat(batch, 1, 1)
        x = torch.randn(1, grid[0] * grid[1], hidden, generator=g).repeat(batch, 1, 1)
        return (context, x), {"c": torch.randn(batch, hidden, generator=g)}
    name = f"SD3.5 Large joint block 1024^2 ({grid[0] * grid[1]}+{text} tokens)"
    return Case(_smoke_name(name, smoke), block, container, "SD3 (MMDiT)", grid, text, inputs)


def _wan_case(smoke: bool, frames: int = 9) -> Case:
    """Wan 2.1 14B at 480x832 x (4 * frames - 3) video frames: latent frames x 60 x 104, 2x2 patches
    (9 latent frames = 33 video frames: 9 x 30 x 52 = 14040 tokens); 512 text tokens (already
    embedded to the hidden width, as the blocks receive them)."""
    hidden, heads, ffn, grid, text = (
        (256, 2, 512, (2, 4, 6), 16) if smoke else (5120, 40, 13824, (frames, 30, 52), 512)
    )
    block = _random(WanAttentionBlock("t2v_cross_attn", hidden, ffn, heads, qk_norm=True, cross_attn_norm=True,
                                      operation_settings={"operations": OPS}))
    # the adapter maps blocks of a WanModel: a bare one (no layers, heads of 128 for the rope) holds this block
    container = WanModel(dim=128, ffn_dim=1, num_heads=1, num_layers=0, text_dim=1, freq_dim=2, operations=OPS)
    container.blocks = torch.nn.ModuleList([block])
    freqs = container.rope_encode(grid[0], 2 * grid[1], 2 * grid[2], device=torch.device("cpu"), dtype=torch.float32)

    def inputs(batch: int) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(1, grid[0] * grid[1] * grid[2], hidden, generator=g).repeat(batch, 1, 1)
        context = torch.randn(1, text, hidden, generator=g).repeat(batch, 1, 1)
        return (x, torch.randn(batch, 6, hidden, generator=g) * 0.1, freqs, context), {"context_img_len": None}
    name = f"Wan 2.1 14B block 480p x {4 * grid[0] - 3} frames ({grid[0] * grid[1] * grid[2]} tokens, {text} text)"
    return Case(_smoke_name(name, smoke), block, container, "Wan", grid, text, inputs)


def _smoke_name(name: str, smoke: bool) -> str:
    return f"smoke-size stand-in for {name.split(' (')[0]}" if smoke else name


class Runner:
    """Runs a case's block as one model call of a sampling run of `method`, at a given step."""

    def __init__(self, case: Case, method, halves: tuple[int, ...]) -> None:
        self.case = case
        adapter = next(a for a in adapters.ADAPTERS if a.name == case.adapter)
        projections = adapter.projections(case.container) if getattr(method, "skip_branch", False) else []
        self.patch = state.AttentionPatch(method, adapter, tuple(projections))
        self.run = state.SamplingRun(self.patch, linear_timeline(4))
        self.projections = projections
        self.halves = halves

    def __call__(self, step: int) -> tuple[float, torch.Tensor]:
        args, kwargs = self.case.inputs(len(self.halves))
        chunks = tuple((f"chunk {i}", (), "cpu", 0) for i in range(len(self.halves)))
        forward = state.ForwardPass(self.run, step, tuple(range(len(self.halves))), chunks, self.case.grid,
                                      self.case.text_len, None, self.halves, tuple(args[0].chunk(len(self.halves))))
        modules = [self.case.container.get_submodule(p.path) for p in self.projections]
        for projection, module in zip(self.projections, modules, strict=True):
            module.forward = branch.projection_forward(projection, module.forward)
        token = state.ACTIVE.set(forward)
        try:
            with torch.no_grad():
                start = time.perf_counter()
                out = self.case.block(*args, **kwargs, transformer_options={state.OVERRIDE_KEY: forward})
                seconds = time.perf_counter() - start
        finally:
            state.ACTIVE.reset(token)
            for module in modules:
                del module.forward
        return seconds, out[0] if isinstance(out, tuple) else out


def _counted(run: Callable[[], tuple[float, torch.Tensor]]) -> tuple[float, torch.Tensor, int]:
    """`run`'s result and the multiply-adds of its torch linear calls."""
    macs = 0
    original = torch.nn.functional.linear

    def counted(x, weight, bias=None):
        nonlocal macs
        macs += x[..., 0].numel() * weight.shape[0] * weight.shape[1]
        return original(x, weight, bias)

    torch.nn.functional.linear = counted
    try:
        seconds, out = run()
    finally:
        torch.nn.functional.linear = original
    return seconds, out, macs


def _measure(case: Case, cfg: bool) -> str:
    halves = (state.COND, state.UNCOND) if cfg else (state.OTHER,)
    technique = schedule.CFGSharing(schedule.Scope()) if cfg else schedule.StepSharing(2, schedule.Scope())
    plan = schedule.Schedule().then(technique)
    shared_step = 0 if cfg else 1
    variants = {"full": Runner(case, DiTFastAttn(schedule.Schedule()), halves),
                "call level": Runner(case, DiTFastAttn(plan, skip_branch=False), halves),
                "branch level": Runner(case, DiTFastAttn(plan), halves)}
    if not cfg:
        for name in ("call level", "branch level"):
            variants[name](0)  # the computed step that stores the caches
    times: dict[str, list[float]] = {name: [] for name in variants}
    flops, outputs = {}, {}
    for repeat in range(REPEATS):
        for name, runner in variants.items():
            if repeat:
                times[name].append(runner(shared_step)[0])
                continue
            before = runner.run.report.computed_flops
            seconds, outputs[name], macs = _counted(lambda runner=runner: runner(shared_step))
            times[name].append(seconds)
            flops[name] = 2 * macs + runner.run.report.computed_flops - before
    error = (outputs["branch level"] - outputs["call level"]).abs().max().item()
    full = statistics.median(times["full"])
    cells = []
    for name in ("call level", "branch level"):
        median = statistics.median(times[name])
        cells.append(f"{median:.3f} ({median / full:.0%}, bound {flops[name] / flops['full']:.0%})")
    label = "CFG-shared (batch 2)" if cfg else "step-shared"
    return f"| {case.name} | {label} | {full:.3f} | {cells[0]} | {cells[1]} | {error:.1e} |"


ROWS = {  # name -> (case maker (smoke, latent frames of Wan) -> Case, CFG-shared)
    "flux-double": (lambda smoke, frames: _flux_case("double", 1024, smoke), False),
    "flux-double-cfg": (lambda smoke, frames: _flux_case("double", 1024, smoke), True),
    "flux-single": (lambda smoke, frames: _flux_case("single", 1024, smoke), False),
    "sd35": (lambda smoke, frames: _sd35_case(smoke), False),
    "flux-double-2048": (lambda smoke, frames: _flux_case("double", 2048, smoke), False),
    "flux-single-2048": (lambda smoke, frames: _flux_case("single", 2048, smoke), False),
    "wan": (lambda smoke, frames: _wan_case(smoke, frames), False),
    "wan-cfg": (lambda smoke, frames: _wan_case(smoke, frames), True),
}
SHORTCUTS = {
    "--all": ["flux-double-cfg", "flux-single", "sd35"],
    "--large": ["flux-double-2048", "flux-single-2048"],
    "--wan": ["wan", "wan-cfg"],
}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="exactly these rows (default: flux-double)")
    for flag, rows in SHORTCUTS.items():
        parser.add_argument(flag, action="store_true", help=f"add the rows {', '.join(rows)}")
    parser.add_argument("--wan-frames", type=int, default=9, help="Wan latent frames (9: 33 video frames)")
    parser.add_argument("--smoke", action="store_true", help="tiny blocks: check the script, not a measurement")
    args, _ = parser.parse_known_args(argv)  # under run_all: also the script names
    rows = args.rows or ["flux-double"]
    for flag, extra in SHORTCUTS.items():
        rows += extra if getattr(args, flag[2:]) else []
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {REPEATS} repeats interleaved\n")
    print("| block | shared step | full median s | call level median s (of full, FLOP bound) | "
          "branch level median s (of full, FLOP bound) | max abs diff branch vs call |")
    print("|---|---|---|---|---|---|")
    cases: dict = {}
    for row in rows:
        make, cfg = ROWS[row]
        key = row.removesuffix("-cfg")
        cases.setdefault(key, make(args.smoke, args.wan_frames))
        print(_measure(cases[key], cfg=cfg), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
