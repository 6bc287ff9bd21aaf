"""Cost of the hook runtime itself: sampling with every layer full vs. the unpatched model.

Same model, same inputs, runs interleaved (unpatched, patched, unpatched, ...) so machine
noise hits both alike; medians over the repeats. Run: `python tests/benchmarks/run_all.py runtime`.
"""

from __future__ import annotations

import statistics
import time

import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample

patching = pack_import("patching")

REPEATS = 7
STEPS = 4
# An MMDiT the size of the demo model (depth 4: hidden 256, 4 heads of 64), float32, CFG 3.
SHAPES = [(64, 64), (128, 128)]  # latent sizes: 1024 and 4096 image tokens


def _timed(model, positive, negative, latent) -> float:
    start = time.perf_counter()
    sample(model, positive, negative, latent, steps=STEPS, cfg=3.0, seed=0)
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    model = build_model("sd3", seed=0, depth=4, context_embedder_config={
        "target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 256}})
    patched = patching.install(model)
    positive, negative = conditioning("sd3", 77, seed=1), conditioning("sd3", 77, seed=2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {STEPS} steps, CFG 3, {REPEATS} repeats\n")
    print("| latent | image tokens | unpatched median s | runtime (all full) median s | overhead |")
    print("|---|---|---|---|---|")
    for height, width in SHAPES:
        latent = empty_latent("sd3", height, width)
        _timed(model, positive, negative, latent)  # warm-up
        _timed(patched, positive, negative, latent)
        plain, hooked = [], []
        for _ in range(REPEATS):
            plain.append(_timed(model, positive, negative, latent))
            hooked.append(_timed(patched, positive, negative, latent))
        base, ours = statistics.median(plain), statistics.median(hooked)
        tokens = (height // 2) * (width // 2)
        print(f"| {height}x{width} | {tokens} | {base:.3f} | {ours:.3f} | {100 * (ours / base - 1):+.2f}% |")


if __name__ == "__main__":
    main()
