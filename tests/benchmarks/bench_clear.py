"""How attention cost grows with resolution: one real-dimension FLUX attention layer (24 heads
of 128, 512 text tokens first, float32, batch 1) at 1024^2, 2048^2 and 4096^2, full attention
(torch SDPA) against CLEAR r16 (the window_attention "auto" backend: the native kernel on CPU).

Each 2x in resolution is 4x the image tokens: SDPA's time should grow ~16x, CLEAR's <= 4.5x.
SDPA at 4096^2 takes minutes a call on a small CPU; it runs only with --sdpa-4096.
Medians over the repeats, the methods interleaved so machine noise hits both alike.

Run: `python tests/benchmarks/run_all.py clear` (part of `make bench`), or this file directly
with `--sdpa-4096` / `--repeats N`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from harness import pack_import

kernels = pack_import("kernels")

HEADS, DIM, TEXT = 24, 128, 512
SIDES = {"1024^2": 64, "2048^2": 128, "4096^2": 256}  # FLUX: 16 px per token side
WINDOW = kernels.Window("circle", 16)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(side: int, repeats: int, with_sdpa: bool) -> tuple[float | None, float]:
    """Median seconds of SDPA (None when skipped) and of CLEAR r16 at a side x side grid."""
    layout = kernels.TokenLayout(TEXT, (side, side))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, layout.seq_len, DIM, generator=gen) for _ in range(3))
    clear = lambda: kernels.window_attention(q, k, v, layout, WINDOW)  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    clear()  # warm-up: builds the native kernel and its tile plan
    sdpa_times, clear_times = [], []
    for _ in range(repeats):
        if with_sdpa:
            sdpa_times.append(_seconds(sdpa))
        clear_times.append(_seconds(clear))
    return (statistics.median(sdpa_times) if sdpa_times else None), statistics.median(clear_times)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdpa-4096", action="store_true", help="also time SDPA at 4096^2 (minutes per call)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"CLEAR r16 vs SDPA, 24 heads x 128, 512 text tokens, float32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("| resolution | tokens | SDPA s | CLEAR r16 s | speedup | SDPA growth | CLEAR growth |")
    print("|---|---|---|---|---|---|---|")
    previous = None
    for name, side in SIDES.items():
        sdpa, clear = measure(side, args.repeats, with_sdpa=side < 256 or args.sdpa_4096)
        growth = lambda now, before: f"{now / before:.2f}x" if now and before else "-"  # noqa: E731
        print(f"| {name} | {TEXT + side * side} | {f'{sdpa:.3f}' if sdpa else 'skipped'} | {clear:.3f} | "
              f"{f'{sdpa / clear:.2f}x' if sdpa else '-'} | {growth(sdpa, previous and previous[0])} | "
              f"{growth(clear, previous and previous[1])} |", flush=True)
        previous = (sdpa, clear)


if __name__ == "__main__":
    main(sys.argv[1:] if sys.argv[0].endswith("bench_clear.py") else [])  # run_all's own arguments are not ours
