"""Cost of the hook runtime itself: sampling with every layer full vs. the unpatched model.

Same model, same inputs, runs interleaved (unpatched, patched, unpatched, ...) so machine
noise hits both alike; medians over the repeats. On a shared machine run-to-run noise is
larger than the effect, so the hook's own work is also timed per attention call (the
override with an attention function that returns at once) and scaled to the run.
Run: `python tests/benchmarks/run_all.py runtime`.
"""

from __future__ import annotations

import statistics
import time

import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, linear_timeline, sample

patching = pack_import("patching")
state = pack_import("patching.state")

REPEATS = 7
STEPS = 4
# An MMDiT the size of the demo model (depth 4: hidden 256, 4 heads of 64), float32, CFG 3.
SHAPES = [(64, 64), (128, 128)]  # latent sizes: 1024 and 4096 image tokens


def _timed(model, positive, negative, latent) -> float:
    start = time.perf_counter()
    sample(model, positive, negative, latent, steps=STEPS, cfg=3.0, seed=0)
    return time.perf_counter() - start


def _hook_seconds_per_call(model, calls: int = 20000) -> float:
    """Median time the override adds to one attention call (the attention itself returns at once)."""
    patch = patching.patch_of(patching.install(model))
    run = state.SamplingRun(patch, linear_timeline(STEPS))
    q = torch.zeros(2, 1040, 256)
    instant = lambda *args, **kwargs: q  # noqa: E731
    samples = []
    for _ in range(5):
        forward = state.ForwardPass(run, 0, (1, 0), ("u", "c"), (32, 32), 16, None)
        start = time.perf_counter()
        for _ in range(calls):
            forward(instant, q, q, q, 4, mask=None, transformer_options={})
        hooked = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            instant(q, q, q, 4, mask=None, transformer_options={})
        samples.append((hooked - (time.perf_counter() - start)) / calls)
    return statistics.median(samples)


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
        report = patching.patch_of(patched).last_report
        calls = report.forwards * len(report.layers)
        hook = _hook_seconds_per_call(model) * calls
        print(f"| {height}x{width} | {tokens} | {base:.3f} | {ours:.3f} | {100 * (ours / base - 1):+.2f}% "
              f"(hook's own work: {calls} calls x {1e6 * hook / calls:.1f} us = {1e3 * hook:.1f} ms = "
              f"{100 * hook / base:.3f}%) |")


if __name__ == "__main__":
    main()
