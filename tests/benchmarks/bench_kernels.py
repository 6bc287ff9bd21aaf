"""Window-attention kernels on CPU against full attention (torch SDPA) and compiled FlexAttention.

Ours: the native backend (what "auto" runs on CPU) and the torch tile backend (its fallback).

Shapes are FLUX's (24 heads of 128; 512 text tokens first) at 1024^2 and 2048^2 and a video
shape (16 x 32 x 32 latent frames, text after the image), float32, batch 1. For each shape
the methods run interleaved (SDPA, tiles, Flex, SDPA, ...) so machine noise hits all alike;
medians over the repeats. Peak memory: the growth of the process's peak resident set during
one call (glibc's free memory trimmed and the kernel's high-water mark reset just before it),
which counts the output and every temporary, whoever allocates it. Twice: in this process,
with glibc's default allocator, whose per-thread heaps keep freed chunks (their slack moves the
peak by ~2 MiB between runs of the same call); and per method in a fresh process where glibc
maps every allocation of 32 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so freed memory
leaves the resident set at once: what the method holds live.

Run: `python tests/benchmarks/run_all.py kernels` (part of `make bench`).
"""

from __future__ import annotations

import ctypes
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import pack_import

kernels = pack_import("kernels")
TokenLayout, Window = kernels.TokenLayout, kernels.Window

HEADS, DIM = 24, 128
REPEATS = 5
SMALL_SHAPE_REPEATS = 9  # below 8K tokens a repeat takes seconds: more of them steady the medians
SLOW_BASELINE_REPEATS = 3  # SDPA at 16K+ tokens takes ~30 s a call on this CPU


@dataclass
class Case:
    name: str
    layout: TokenLayout
    window: Window


GROUPS = [  # cases sharing one input shape share one SDPA baseline
    [Case("FLUX 1024^2, band N/8", TokenLayout(512, (64, 64)), Window("band", 512))],
    [
        Case("FLUX 2048^2, CLEAR r16", TokenLayout(512, (128, 128)), Window("circle", 16)),
        Case("FLUX 2048^2, CLEAR r8", TokenLayout(512, (128, 128)), Window("circle", 8)),
        Case("FLUX 2048^2, CLEAR r16 pool 4", TokenLayout(512, (128, 128)), Window("circle", 16, pool=4)),
        Case("FLUX 2048^2, CLEAR r8 pool 4", TokenLayout(512, (128, 128)), Window("circle", 8, pool=4)),
    ],
    [
        Case(
            "video 16x32x32 + 256 text, circle r8 / t2",
            TokenLayout(256, (16, 32, 32), text_first=False),
            Window("circle", 8, temporal_radius=2),
        )
    ],
]

LIVE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 10)}
LIVE_REPEATS = 2  # after a warm-up call

_libc = ctypes.CDLL("libc.so.6")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{key}:\s+(\d+)", status.read()).group(1))


def measured(fn) -> tuple[float, float]:
    """(seconds, peak resident growth in MiB) of one call."""
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak resident set (VmHWM) to the current one
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak = (_status_kib("VmHWM") - base) / 1024
    del out
    return seconds, peak


def inputs(layout: TokenLayout) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, HEADS, layout.seq_len, DIM, generator=gen) for _ in range(3))


def live_peak(group: int, method: str, backend: str = "native") -> float:
    """Peak resident growth (MiB) of `method` ("sdpa" or a case name of GROUPS[group], run by
    `backend`) in a fresh process with LIVE_ENV: max over LIVE_REPEATS calls after a warm-up."""
    env = {**os.environ, **LIVE_ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, __file__, "--live-peak", str(group), method, backend]
    run = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(run.stdout.split()[-1])


def _live_peak_here(group: int, method: str, backend: str) -> None:
    cases = GROUPS[group]
    q, k, v = inputs(cases[0].layout)
    if method == "sdpa":
        fn = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    else:
        case = next(c for c in cases if c.name == method)
        fn = lambda: kernels.window_attention(q, k, v, case.layout, case.window, backend=backend)  # noqa: E731
    measured(fn)
    print(max(measured(fn)[1] for _ in range(LIVE_REPEATS)))


def run_group(index: int) -> tuple[list[str], list[str]]:
    """Time and measure every case of a group (one input shape) against one SDPA baseline."""
    group = GROUPS[index]
    layout = group[0].layout
    q, k, v = inputs(layout)

    def method(backend: str):
        return lambda case: kernels.window_attention(q, k, v, case.layout, case.window, backend=backend)

    methods = {name: method(name) for name in ("native", "torch", "flex")}
    # first calls: tile plans, block masks, compilation (the native kernel is built before)
    first = {(c.name, m): measured(lambda c=c, f=f: f(c))[0] for c in group for m, f in methods.items()}
    sdpa, times = [], {(c.name, m): [] for c in group for m in methods}
    small = layout.seq_len < 8192
    repeats = SMALL_SHAPE_REPEATS if small else REPEATS
    sdpa_repeats = repeats if small else SLOW_BASELINE_REPEATS
    for repeat in range(repeats):
        if repeat < sdpa_repeats:
            sdpa.append(measured(lambda: F.scaled_dot_product_attention(q, k, v)))
        for case in group:
            for name, fn in methods.items():
                times[case.name, name].append(measured(lambda c=case, f=fn: f(c)))
    base = statistics.median(s for s, _ in sdpa)
    live_sdpa = live_peak(index, "sdpa")
    timing, memory = [], []
    for case in group:
        count = {
            b: kernels.attention_flops(
                case.layout, case.window, batch=1, heads=HEADS, head_dim=DIM, backend=b
            )
            for b in ("torch", "flex")
        }
        flops = count["torch"]  # the native backend computes the torch backend's tiles
        median = {m: statistics.median(s for s, _ in times[case.name, m]) for m in methods}
        native, tiles, flexed = median["native"], median["torch"], median["flex"]
        allowed = flops.full / flops.mask
        timing.append(
            f"| {case.name} | {layout.seq_len} | {flops.mask / flops.full:.1%} | "
            f"{flops.computed / flops.full:.1%} | {count['flex'].computed / flops.full:.1%} | "
            f"{base:.2f} ({len(sdpa)}) | {native:.3f} | {tiles:.3f} | {flexed:.3f} | "
            f"**{base / native:.2f}x** | {base / tiles:.2f}x | {allowed:.2f}x | {base / native / allowed:.0%} | "
            f"{flexed / native:.2f}x | " + " / ".join(f"{first[case.name, m]:.2f}" for m in methods) + " |"
        )
        peak = {m: max(p for _, p in times[case.name, m]) for m in methods}
        memory.append(
            f"| {case.name} | {max(p for _, p in sdpa):.1f} | {peak['native']:.1f} | {peak['torch']:.1f} | "
            f"{peak['flex']:.1f} | {live_sdpa:.1f} | {live_peak(index, case.name):.1f} | "
            f"{live_peak(index, case.name, 'torch'):.1f} | {q.numel() * q.element_size() / 2**20:.1f} |"
        )
    return timing, memory


def main() -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, batch 1, "
        f"{HEADS} heads x {DIM}; load average at start {os.getloadavg()[0]:.1f}\n"
    )
    if "native" not in kernels.available_backends():  # builds the native kernel (once) before any timing
        sys.exit(
            "the native kernel cannot be built here (the log says why); it is what this benchmark measures"
        )
    timing, memory = [], []
    for index in range(len(GROUPS)):
        rows = run_group(index)
        timing += rows[0]
        memory += rows[1]
    print(
        "| shape | tokens | FLOPs kept by the exact mask | computed by the tiles | computed by Flex "
        "(128-blocks) | SDPA median s (repeats) | native median s | torch tiles median s | Flex median s | "
        "native vs SDPA | torch tiles vs SDPA | allowed by the mask FLOPs | share of allowed (native) | "
        "native vs Flex | first call s: native / torch tiles / Flex (compile) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(timing))
    print(
        "\nPeak resident growth during one call, MiB: in this process with glibc's defaults (max over the "
        f"repeats), and live (fresh process per method, {LIVE_ENV}, max of {LIVE_REPEATS} calls after a "
        "warm-up); the output alone is the last column:\n"
    )
    print(
        "| shape | SDPA | native | torch tiles | Flex | SDPA live | native live | torch tiles live | output |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(memory))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--live-peak"]:
        _live_peak_here(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "native")
    else:
        main()
