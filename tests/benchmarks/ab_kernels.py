"""Side by side: this checkout's window attention (what "auto" runs on CPU) against another
commit's, on one shape of bench_kernels.py, with full SDPA on the same q, k, v, interleaved in
one process.

On a shared, noisy machine the same call moves by 10 - 30% between runs minutes apart, so a
tile change worth that much is judged here before a full `make bench`: each repeat times SDPA,
this checkout and the other commit back to back, and the speedups are taken per repeat. Not
part of `make bench`; fewer heads than the benchmark's 24 keep it to a few minutes.

    .venv/bin/python tests/benchmarks/ab_kernels.py r16 HEAD~1 --heads 8 --repeats 7
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the `harness` package, bench_kernels

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_kernels import DIM, GROUPS, kernels  # noqa: E402

SHAPES = dict(
    zip(("band", "r16", "r8", "r16-pool", "r8-pool", "video"), [c for g in GROUPS for c in g], strict=True)
)


def kernels_at(rev: str, worktree: Path) -> ModuleType:
    """The kernels package of commit `rev`, checked out into `worktree` and imported under its
    own name (its relative imports stay inside it)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), rev], check=True)
    package = worktree / "kernels"
    spec = importlib.util.spec_from_file_location(
        "kernels_other", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def compare(shape: str, other: ModuleType, heads: int, repeats: int) -> None:
    case = SHAPES[shape]
    layout, window = case.layout, case.window
    their_layout = other.TokenLayout(layout.text_len, layout.grid, layout.text_first)
    their_window = other.Window(window.shape, window.radius, window.temporal_radius, window.pool)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, layout.seq_len, DIM, generator=gen) for _ in range(3))
    methods = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "this": lambda: kernels.window_attention(q, k, v, layout, window),
        "other": lambda: other.window_attention(q, k, v, their_layout, their_window),
    }
    difference = (methods["this"]() - methods["other"]()).abs().max().item()  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            times[name].append(time.perf_counter() - start)
    print(f"{case.name}, {heads} heads of {DIM}, {repeats} repeats; max |this - other| = {difference:.1e}")
    for name in ("this", "other"):
        speedups = [s / t for s, t in zip(times["sdpa"], times[name], strict=True)]
        print(
            f"  {name:5s} median {statistics.median(times[name]):.3f} s (SDPA {statistics.median(times['sdpa']):.3f}),"
            f" speedup median {statistics.median(speedups):.2f}x, per repeat {' '.join(f'{x:.2f}' for x in speedups)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("rev", help="the commit to compare with, e.g. HEAD~1")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        worktree = Path(scratch) / "other"
        try:
            compare(args.shape, kernels_at(args.rev, worktree), args.heads, args.repeats)
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False
            )


if __name__ == "__main__":
    main()
