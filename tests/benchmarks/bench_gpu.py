"""The GPU window-attention backends (Triton, FlexAttention) against the fastest fused SDPA, and
their correctness against the float64 reference at small odd shapes in float32, bfloat16 and
float16, and against a float32 masked softmax at the benchmark's shapes.

One prepared command for an NVIDIA GPU (H100 / H200 class), under 8 minutes:

    .venv/bin/python tests/benchmarks/bench_gpu.py [--sweep] [--no-flex] [--json results.json]

Without CUDA it says so and exits 0 (`make bench` on a CPU machine passes over it). `--smoke`
runs the whole script on CPU at tiny shapes, Triton under its interpreter (a check of the
script itself: its timings mean nothing).

Timings: bfloat16, batch 1, 24 heads of 128 (Wan: 40), the issue's shapes; medians of 7
CUDA-event timings after 2 warm-up calls. The baseline is the faster of SDPA's flash and cuDNN
kernels (both shown). The Triton backend runs its default launch configuration; `--sweep` also
times each configuration of `sweep_configs` side by side (block / box shapes, warps, pipeline
stages). The first call of each backend at each shape (block maps, Triton / torch.compile
compilation) is timed apart, on the wall clock. "blocks computed" is the share of the full score
matrix that the Triton kernel computes (whole blocks); "mask keeps" what the window keeps.
FlexAttention is timed last, for at most FLEX_BUDGET_S. The process exits 1 if a correctness
check fails.

"bound" is full attention's FLOPs over the mask's (the speedup a kernel computing only the kept
scores at SDPA's rate would reach); "share of bound" is the speedup over it. For circles and
squares the Triton kernel is also timed with tile-major keys (k, v copied into key-box order once
per call, the copy included; its cost alone is shown too). The last shapes are image-only, for the
other libraries' kernels side by side (gpu_peers.py): flash-attn's band, natten's and
comfy-kitchen's neighbourhoods, comfy-kitchen's sol-attn, st-attn; each where it loads, else the
reason it did not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the kernels package, without ComfyUI
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_peers
import gpu_peers  # noqa: E402

from kernels import TokenLayout, Window, attention_flops, reference_attention, window_attention  # noqa: E402
from kernels.masks import sequence_mask  # noqa: E402
from kernels.problem import Problem  # noqa: E402

DIM = 128
REPEATS, WARMUP = 7, 2
FLEX_BUDGET_S = 150  # Flex (compiled per shape: slow first calls) is timed last, for at most this long


@dataclass(frozen=True)
class Shape:
    name: str
    layout: TokenLayout
    window: Window
    heads: int
    goal: float | None  # the speedup over SDPA asked for (issue 22); None: a shape for the peers
    peers: tuple[str, ...] = ()  # other libraries' kernels timed at this shape (gpu_peers.PEERS)


SHAPES = [
    Shape("FLUX 1024^2, band N/8", TokenLayout(512, (64, 64)), Window("band", 512), 24, 1.5),
    Shape("FLUX 2048^2, CLEAR r16", TokenLayout(512, (128, 128)), Window("circle", 16), 24, 3.0,
          ("comfy-kitchen sol-attn",)),
    Shape("FLUX 2048^2, CLEAR r8", TokenLayout(512, (128, 128)), Window("circle", 8), 24, 4.0),
    Shape("FLUX 2048^2, r16 + pool 4", TokenLayout(512, (128, 128)), Window("circle", 16, pool=4), 24, 1.0),
    Shape("FLUX 4096^2, CLEAR r16", TokenLayout(512, (256, 256)), Window("circle", 16), 24, 8.0),
    Shape(
        "Wan 480p 81 frames, r8 t2",
        TokenLayout(0, (21, 30, 52)),
        Window("circle", 8, temporal_radius=2),
        40,
        5.0,
    ),
    # image tokens only, windows the other libraries compute (masks differ only as gpu_peers says)
    Shape("FLUX 1024^2 image only, band N/8", TokenLayout(0, (64, 64)), Window("band", 512), 24, None,
          ("flash-attn",)),
    Shape("FLUX 2048^2 image only, square 31 x 31", TokenLayout(0, (128, 128)), Window("square", 15), 24, None,
          ("natten", "comfy-kitchen na")),
    Shape("Wan 480p 81 frames, square 17 x 17 x 5", TokenLayout(0, (21, 30, 52)),
          Window("square", 8, temporal_radius=2), 40, None, ("natten", "comfy-kitchen na")),
    Shape("Wan 720p 69 frames, square 25 x 25 x 17", TokenLayout(0, (18, 48, 80)),
          Window("square", 12, temporal_radius=8), 40, None, ("st-attn",)),
]

# small odd shapes: grids that are no multiple of any block, text before / after / none
CHECKS = [
    (TokenLayout(77, (13, 17)), Window("circle", 4), True),
    (TokenLayout(33, (11, 15), text_first=False), Window("band", 20), False),
    (TokenLayout(7, (12, 20)), Window("circle", 5, pool=4), True),
    (TokenLayout(0, (3, 7, 9)), Window("circle", 3, temporal_radius=1), False),
    (TokenLayout(5, (9, 13), text_first=False), Window("square", 3), True),
]
FLEX_CHECKS = 2  # the first checks also run on Flex (each dtype and shape is a compilation)
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 2e-3}  # relative Frobenius error


SMOKE_SHAPES = [
    Shape("smoke: 5 text + 8 x 12, circle r3", TokenLayout(5, (8, 12)), Window("circle", 3), 2, 1.0,
          ("comfy-kitchen sol-attn",)),
    Shape("smoke: 3 x 8 x 8, square 2 x 2 x 1", TokenLayout(0, (3, 8, 8)), Window("square", 2, temporal_radius=1),
          2, None, tuple(gpu_peers.PEERS)),
]


def check_correctness(backends: list[str], checks: list, device: str) -> list[str]:
    """Every backend against the float64 reference (residual fused where marked); returns failures."""
    failures = []
    print("| backend | shape | dtype | rel. error | bound |\n|---|---|---|---|---|")
    for number, (layout, window, residual) in enumerate(checks):
        gen = torch.Generator(device=device).manual_seed(number)
        q, k, v, res = (torch.randn(2, 3, layout.seq_len, 64, generator=gen, device=device) for _ in range(4))
        for dtype in BOUND:
            q_, k_, v_, res_ = (x.to(dtype) for x in (q, k, v, res))
            ref = reference_attention(q_.double(), k_.double(), v_.double(), layout, window)
            ref = ref + res_.double() if residual else ref
            tiled = ["triton tile-major"] if "triton" in backends and window.shape != "band" else []
            for backend in backends + tiled:
                if backend == "flex" and number >= FLEX_CHECKS:
                    continue
                out = _checked_call(backend, Problem(q_, k_, v_, layout, window, residual=res_ if residual else None))
                err = float((out.double() - ref).norm() / ref.norm())
                ok = err < BOUND[dtype]
                failures += [] if ok else [f"{backend} {layout} {window} {dtype}: {err:.2e}"]
                shape = f"{layout.text_len} text + {layout.grid}, {window.shape} r{window.radius}"
                print(
                    f"| {backend} | {shape} | {str(dtype)[6:]} | {err:.1e}{'' if ok else ' FAIL'} | {BOUND[dtype]:.0e} |"
                )
    return failures


def _checked_call(backend: str, p: Problem) -> Tensor:
    """A backend by name, or "triton tile-major": the Triton grid kernel with tile-major keys."""
    if backend != "triton tile-major":
        return window_attention(p.q, p.k, p.v, p.layout, p.window, backend=backend, residual=p.residual)
    from kernels.triton_grid import default_config
    from kernels.triton_grid import window_attention as grid_attention

    return grid_attention(p, dataclasses.replace(default_config(p.layout), tile_major_keys=True))


def median_ms(call: Callable[[], object]) -> float:
    """CUDA-event median after warm-ups (on CPU, for --smoke: the wall clock)."""
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(REPEATS):
        if not torch.cuda.is_available():
            start = time.perf_counter()
            call()
            times.append(1000 * (time.perf_counter() - start))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def first_call_s(call: Callable[[], object]) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - start


def sdpa_ms(q: Tensor, k: Tensor, v: Tensor, device: str) -> dict:
    """Full attention by each fused SDPA kernel that runs here; the fastest is the baseline."""
    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    if device != "cuda":
        kernels = {"math": SDPBackend.MATH}
    times = {}
    for name, kernel in kernels.items():
        try:
            with sdpa_kernel(kernel):
                times[f"sdpa_{name}_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as error:  # this kernel does not run on this GPU / shape
            print(f"  SDPA {name}: {str(error).splitlines()[0]}")
    times["sdpa_ms"] = min(times.values())
    return times


def sweep_configs(shape: Shape) -> list:
    """Triton launch configurations timed beside the default per shape (--sweep): the neighbours of
    the defaults that a first H200 sweep chose (BENCHMARKS.md lists what else was tried)."""
    from kernels.triton_grid import GridConfig  # imported late: --smoke sets TRITON_INTERPRET first
    from kernels.triton_kernel import BandConfig

    if shape.window.shape == "band":
        return [BandConfig(64, 4, s) for s in (2, 3, 4, 5)] + [BandConfig(128, 8, s) for s in (3, 4)]
    image = len(shape.layout.grid) == 2
    configs = [GridConfig((1, 8, 8), (1, 8, 8), 4, 3)]  # the configuration before the H200 sweep
    for query_box, key_box in [
        ((1, 16, 8), (1, 8, 8)),
        ((1, 8, 16), (1, 8, 8)) if image else ((2, 8, 8), (1, 8, 8)),
        ((1, 16, 8), (1, 4, 8)),
    ]:
        configs += [GridConfig(query_box, key_box, 8, stages) for stages in (3, 4)]
    # tile-major keys: dense key tiles, so wider key boxes and deeper pipelines may pay now
    for query_box, key_box, warps, stages in [
        ((1, 16, 8), (1, 8, 8), 8, 2),
        ((1, 16, 8), (1, 8, 8), 8, 4),
        ((1, 8, 8), (1, 8, 8), 4, 3),
        ((1, 8, 16), (1, 8, 8), 8, 3) if image else ((2, 8, 8), (2, 4, 8), 8, 3),
    ]:
        configs.append(GridConfig(query_box, key_box, warps, stages, tile_major_keys=True))
    return configs


def describe(config: object) -> str:
    if hasattr(config, "block"):  # the band kernel's
        return f"block {config.block}, {config.num_warps} warps, {config.num_stages} stages"
    boxes = "/".join(
        "x".join(map(str, box[1:] if box[0] == 1 else box)) for box in (config.query_box, config.key_box)
    )
    keys = ", tile-major keys" if config.tile_major_keys else ""
    return f"boxes {boxes}, {config.num_warps} warps, {config.num_stages} stages{keys}"


def chunked_reference(problem: Problem, heads: int, rows: int = 2048) -> Tensor:
    """The masked dense softmax in float32 for the first `heads` heads, `rows` queries at a time
    (the whole score matrix would not fit at 4096^2)."""
    keys, values = (x[:, :heads].float() for x in problem.keys_with_pooled())
    q = problem.q[:, :heads].float()
    mask = sequence_mask(problem.layout, problem.window)
    columns = torch.arange(keys.shape[2], device=q.device)
    out = torch.empty_like(q)
    for first in range(0, q.shape[2], rows):
        index = torch.arange(first, min(first + rows, q.shape[2]), device=q.device)
        scores = (q[:, :, index] @ keys.transpose(-1, -2)) * problem.scale
        scores.masked_fill_(~mask(index[:, None], columns[None, :]), float("-inf"))
        out[:, :, index] = torch.softmax(scores, dim=-1) @ values
    return out


def time_shape(shape: Shape, device: str, sweep: bool) -> dict:
    """SDPA and the Triton backend (its default configuration, and each of the sweep's) at one
    shape, and the default's error on two heads against a float32 masked dense softmax."""
    layout, window = shape.layout, shape.window
    q, k, v = (
        torch.randn(1, shape.heads, layout.seq_len, DIM, device=device, dtype=torch.bfloat16)
        for _ in range(3)
    )
    flops = attention_flops(layout, window, batch=1, heads=shape.heads, head_dim=DIM, backend="triton")
    row = {
        "shape": shape.name,
        "mask_keeps": flops.mask / flops.full,
        "blocks_computed": flops.computed / flops.full,
    }
    row.update(sdpa_ms(q, k, v, device))
    from kernels import triton_kernel  # imported late: --smoke sets TRITON_INTERPRET first

    problem = Problem(q, k, v, layout, window)

    def call(config: object = None) -> Tensor:
        return triton_kernel.window_attention(problem, config)

    row["triton_first_s"] = first_call_s(call)
    row["triton_ms"] = median_ms(call)
    default = call()
    reference = chunked_reference(problem, heads=2)
    row["triton_error"] = float((default[:, :2].float() - reference).norm() / reference.norm())
    if window.shape != "band":  # the default boxes with tile-major keys, and the key copy alone
        from kernels.triton_grid import default_config, tile_major_order

        tiled = dataclasses.replace(default_config(layout), tile_major_keys=True)
        row["tiled_first_s"] = first_call_s(lambda: call(tiled))
        row["tiled_ms"] = median_ms(lambda: call(tiled))
        row["tiled_error"] = float((call(tiled)[:, :2].float() - reference).norm() / reference.norm())
        slots = tile_major_order(layout, tiled.key_box, q.device)
        row["tiled_copy_ms"] = median_ms(lambda: (k.index_select(2, slots), v.index_select(2, slots)))
    row["peers"] = gpu_peers.time_peers(shape.peers, layout, window, q, k, v, median_ms)
    for name, peer in row["peers"].items():
        print(f"  {name}: " + (f"{peer['ms']:.3f} ms, " if "ms" in peer else "") + peer["note"], flush=True)
    if sweep:
        row["sweep"] = []
        for config in sweep_configs(shape):
            try:
                first = first_call_s(lambda config=config: call(config))
                ms = median_ms(lambda config=config: call(config))
            except Exception as error:  # a configuration the compiler refuses (registers, shared memory)
                print(f"  {describe(config)}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            diff = float((call(config).float() - default.float()).norm() / default.float().norm())
            computed = triton_kernel.computed_pairs(layout, window, config) / layout.seq_len**2
            row["sweep"].append({"config": describe(config), "ms": ms, "first_s": first, "diff": diff,
                                 "computed": computed})  # fmt: skip
            print(f"  {describe(config)}: {ms:.3f} ms ({row['sdpa_ms'] / ms:.2f}x), computes {computed:.1%}, "
                  f"diff {diff:.1e}", flush=True)  # fmt: skip
    return row


def time_flex(shape: Shape, device: str) -> dict:
    layout, window = shape.layout, shape.window
    q, k, v = (
        torch.randn(1, shape.heads, layout.seq_len, DIM, device=device, dtype=torch.bfloat16)
        for _ in range(3)
    )

    def call() -> Tensor:
        return window_attention(q, k, v, layout, window, backend="flex")

    return {"flex_first_s": first_call_s(call), "flex_ms": median_ms(call)}


def _times(ms: float | None, row: dict) -> str:
    """A time with its speedup over SDPA and that speedup's share of the mask's bound."""
    if ms is None:
        return "- | -"
    speedup = row["sdpa_ms"] / ms
    return f"{ms:.2f} ({speedup:.2f}x) | {speedup * row['mask_keeps']:.0%}"


def print_table(rows: list[dict]) -> None:
    print(
        "\n| shape | mask keeps | bound | blocks computed | SDPA ms (flash / cuDNN) | Triton ms (x SDPA) | share of bound "
        "| tile-major keys ms (x SDPA) | share of bound | key copy ms | Triton first call s | Triton rel. error "
        "| best of sweep ms (x SDPA), configuration | Flex ms (x SDPA) | Flex first call s | goal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        sdpa = " / ".join(
            f"{row[key]:.2f}" if key in row else "-" for key in ("sdpa_flash_ms", "sdpa_cudnn_ms")
        )
        best = min(row.get("sweep", []), key=lambda entry: entry["ms"], default=None)
        best_cell = (
            f"{best['ms']:.2f} ({row['sdpa_ms'] / best['ms']:.2f}x), {best['config']}" if best else "-"
        )
        flex = (f"{row['flex_ms']:.2f} ({row['sdpa_ms'] / row['flex_ms']:.2f}x) | {row['flex_first_s']:.1f}"
                if "flex_ms" in row else "skipped | -")  # fmt: skip
        copy = f"{row['tiled_copy_ms']:.2f}" if "tiled_copy_ms" in row else "-"
        goal = f"{row['goal']:.1f}x" if row["goal"] else "-"
        print(
            f"| {row['shape']} | {row['mask_keeps']:.1%} | {1 / row['mask_keeps']:.1f}x | {row['blocks_computed']:.1%} "
            f"| {sdpa} | {_times(row['triton_ms'], row)} | {_times(row.get('tiled_ms'), row)} | {copy} "
            f"| {row['triton_first_s']:.1f} | {row['triton_error']:.1e} | {best_cell} | {flex} | {goal} |"
        )
    peers = [(row, name, peer) for row in rows for name, peer in row.get("peers", {}).items()]
    if peers:
        print("\n| shape | other library | ms (x SDPA) | ours: Triton ms (x SDPA), tile-major keys ms | note |")
        print("|---|---|---|---|---|")
    for row, name, peer in peers:
        theirs = f"{peer['ms']:.2f} ({row['sdpa_ms'] / peer['ms']:.2f}x)" if "ms" in peer else "-"
        ours = f"{row['triton_ms']:.2f} ({row['sdpa_ms'] / row['triton_ms']:.2f}x)"
        ours += f", {row['tiled_ms']:.2f}" if "tiled_ms" in row else ""
        print(f"| {row['shape']} | {name} | {theirs} | {ours} | {peer['note']} |")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-flex", action="store_true", help="time and check the Triton backend only")
    parser.add_argument("--sweep", action="store_true", help="also time each Triton launch configuration")
    parser.add_argument(
        "--json", type=Path, help="also write the timings and checks to this file (after each shape)"
    )
    parser.add_argument("--smoke", action="store_true", help="check this script on CPU at tiny shapes")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported (by the first Triton call)
        device, checks, shapes = "cpu", CHECKS[:FLEX_CHECKS], SMOKE_SHAPES
        globals().update(REPEATS=1, WARMUP=0)  # the interpreter is slow; these timings mean nothing
    elif torch.cuda.is_available():
        device, checks, shapes = "cuda", CHECKS, SHAPES
        import triton

        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}\n")
    else:
        print(
            "bench_gpu: no CUDA device here, nothing to run (this benchmark needs an NVIDIA GPU; --smoke "
            "checks the script on CPU)."
        )
        return 0
    started = time.perf_counter()
    backends = ["triton"] if args.no_flex else ["triton", "flex"]
    failures = check_correctness(backends, checks, device)
    rows = []

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps({"rows": rows, "failures": failures}, indent=1))

    for shape in shapes:
        try:
            row = {**time_shape(shape, device, args.sweep), "goal": shape.goal}
        except Exception as error:  # report and go on: one run of this script is all a GPU lease may allow
            failures.append(f"triton at {shape.name}: {type(error).__name__}: {error}")
            print(failures[-1], flush=True)
            continue
        failures += [
            f"triton at {shape.name}{label}: {row[key]:.2e}"
            for key, label in (("triton_error", ""), ("tiled_error", ", tile-major keys"))
            if row.get(key, 0.0) >= BOUND[torch.bfloat16]
        ]
        rows.append(row)
        save()
        print(f"{shape.name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    flex_started = time.perf_counter()
    for shape in shapes:
        row = next((row for row in rows if row["shape"] == shape.name), None)
        if row and "flex" in backends and time.perf_counter() - flex_started < FLEX_BUDGET_S:
            try:
                row.update(time_flex(shape, device))
            except Exception as error:
                print(f"Flex at {shape.name}: {type(error).__name__}: {error}", flush=True)
                continue
            save()
            print(f"{shape.name}: Flex done at {time.perf_counter() - started:.0f} s", flush=True)
    print_table(rows)
    save()
    print(f"\n{len(failures)} correctness failures" + "".join(f"\n  {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    # run_all.py (which imports the harness first) runs this file as __main__ with its own arguments
    status = main([] if "harness" in sys.modules else sys.argv[1:])
    if status:  # run_all runs this file as __main__ too: exit only on failure
        sys.exit(status)
