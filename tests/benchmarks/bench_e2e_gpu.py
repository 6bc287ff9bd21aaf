"""Whole sampling runs on a GPU at real model sizes: every technique against the unpatched model.

One prepared command for one device call (an NVIDIA H100 / H200; at most 10 minutes):

    python tests/benchmarks/bench_e2e_gpu.py [--budget 420] [--out DIR] [--wan 14B]

ComfyUI's own model classes at the released configurations of FLUX.1-dev (1024^2 and 2048^2),
Wan 2.1 1.3B (480p x 81 frames; `--wan 14B` for the 14B, which needs far more than one call) and
SD3.5 Large (1024^2), random weights in bfloat16 (timing needs no weights), sampled by ComfyUI's
sampler as KSampler samples (comfy.sample.sample; each example workflow's sampler, scheduler and
CFG, steps cut to fit, the table says from how many). Rows (e2e_cases.py): the unpatched model;
window + residual, step sharing, CFG sharing and the combined mode at the example workflows'
settings (demo/workflows.py); CLEAR r16; a uniform plan (the combined mode as a plan); core
LazyCache. Per row: seconds per sampling run (median of interleaved runs, after an untimed
2-step warm-up run that compiles the kernels), peak GPU memory, attention FLOPs kept (the pack's report);
per model: attention's share of the model's FLOPs (the Attention Inspector's probe). Full
attention everywhere is SDPA with cuDNN first (the fastest fused kernel measured on an H200).

`--budget` seconds in all: each model gets a share (the unused part passes to the next); rows
that do not fit are skipped, last in priority first, and the output says so. JSON and a markdown
table are rewritten under --out (default $OUT, else bench-results/) after every run, so a run cut
short still leaves its numbers; a failing row is reported and the run goes on.

First, once, at a tiny size: each row run on the GPU (float32) against the same row on the CPU:
the float64 reference semantics of tests/harness/reference_schedule.py where it specifies the row
(unpatched and DiTFastAttn's techniques), else the pack's CPU backends (tested against that
reference in the suite), so the timings are of correct code. The process exits 1 if a check fails.

`--smoke`: tiny models on the CPU, every row end to end in seconds (the test suite runs it); its
timings mean nothing. Without CUDA and without --smoke it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
PACK = "fastattn_pack"
REPEATS = 3
WARM_STEPS = 2  # the warm-up run: step 0 computes the window for the residual, step 1 window + residual
CHECK_TOLERANCE = {"cpu": 2e-4, "cuda": 1e-3}  # max error / max |expected| of the output latent


def set_up_host(device: str) -> None:
    """Import ComfyUI ($COMFYUI_PATH, else the bundled .host/ComfyUI) as `main.py --highvram
    --use-pytorch-cross-attention` would (--cpu for the CPU), and the pack as a package."""
    host = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")
    if not (host / "comfy").is_dir():
        raise SystemExit(f"bench_e2e_gpu: no ComfyUI at {host}; set COMFYUI_PATH")
    sys.path.insert(0, str(host))
    _stand_in_for_missing_pyav()
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu, args.highvram, args.use_pytorch_cross_attention = device == "cpu", device != "cpu", True
    import utils.extra_config  # noqa: F401  (as main.py: ComfyUI's `utils` package before comfy/utils.py)

    importlib.import_module("comfy.utils").PROGRESS_BAR_ENABLED = False
    package = types.ModuleType(PACK)
    package.__path__ = [str(REPO)]
    sys.modules[PACK] = package
    harness = types.ModuleType("harness")  # tests/harness without its __init__ (which loads ComfyUI on the CPU)
    harness.__path__ = [str(REPO / "tests" / "harness")]
    host_module = types.ModuleType("harness.host")
    host_module.pack_import = lambda name: importlib.import_module(f"{PACK}.{name}")
    sys.modules.update({"harness": harness, "harness.host": host_module})


def _stand_in_for_missing_pyav() -> None:
    """ComfyUI's node API imports PyAV (video types) when it loads; the device machine has none and
    its wheel is too large to carry. Nothing here touches video: where PyAV is missing, modules
    stand in for it whose every name is a class that refuses to be used."""
    if importlib.util.find_spec("av") is not None:
        return

    def missing(name: str) -> type:
        def refuse(*args, **kwargs):
            raise RuntimeError(f"PyAV is not installed here ({name} was used); install the av package")

        return type(name, (), {"__init__": refuse, "__init_subclass__": classmethod(lambda cls: None)})

    def attribute(module: str, attr: str) -> type:
        if attr.startswith("__"):  # module metadata (__file__, __path__, ...): absent, as on any module
            raise AttributeError(attr)
        return missing(f"{module}.{attr}")

    for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream"):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr, name=name: attribute(name, attr)
        sys.modules[name] = module
    print("PyAV is not installed: a stand-in lets ComfyUI's node API import (no video is read or written)")


@contextmanager
def full_float32():
    """float32 in full precision on the GPU for the check: no TF32 in cuBLAS products nor in cuDNN's
    convolutions (the patch embeddings; cuDNN allows TF32 by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def sdpa_priority():
    """Full attention through SDPA with cuDNN first (1.7-1.9x faster than flash on an H200)."""
    if not torch.cuda.is_available():
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: its own order among these
        print("SDPA: this torch cannot order its kernels; full attention takes its default choice")
        return sdpa_kernel(order)


class Results:
    """Everything measured, rewritten as JSON and a markdown table after each change."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out, self.data = out, {**header, "checks": [], "cases": []}
        out.mkdir(parents=True, exist_ok=True)

    def case(self, entry: dict) -> dict:
        self.data["cases"].append(entry)
        self.save()
        return entry

    def save(self) -> None:
        (self.out / "e2e_gpu.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "e2e_gpu.md").write_text(self.markdown())

    def markdown(self) -> str:
        d = self.data
        lines = [f"{d['device']}, torch {d['torch']}, {d['dtype']}; medians of interleaved runs", ""]
        if d["checks"]:
            lines += ["| correctness check (tiny) | row | against | max error / scale | verdict |", "|---|---|---|---|---|"]
            lines += [f"| {c['model']} | {c['row']} | {c['against']} | {c.get('error', float('nan')):.1e} | "
                      f"{c['verdict']} |" for c in d["checks"]]
            lines.append("")
        lines += ["| model | row | runs | median s | x unpatched | attention FLOPs kept | peak GiB | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for case in d["cases"]:
            base = case["rows"].get("unpatched", {}).get("median_s")
            for name, row in case["rows"].items():
                median = row.get("median_s")
                speed = f"{base / median:.2f}x" if base and median else "-"
                kept = f"{row['flops_kept']:.1%}" if row.get("flops_kept") is not None else "n/a"
                peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") else "-"
                cell = f"{median:.2f}" if median else "-"
                lines.append(f"| {case['case']} | {name} | {len(row.get('seconds', []))} | {cell} | {speed} | {kept} "
                             f"| {peak} | {row.get('note', '')} |")
            lines.append(f"| {case['case']} | | | | | | | {case['note']} |")
        return "\n".join(lines) + "\n"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_run(cases, case, model, positive, negative, steps: int) -> tuple[float, float, torch.Tensor]:
    """One sampling run: wall seconds, peak GiB of GPU memory (0 on CPU), the output latent."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    synchronize()
    start = time.perf_counter()
    out = cases.sample(model, case, positive, negative, steps)
    synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return seconds, peak, out


def flops_kept(pack_patching, model) -> float | None:
    patch = pack_patching.patch_of(model)
    report = patch.last_report if patch else None
    return report.computed_flops / report.full_flops if report and report.full_flops else None


def run_case(cases, rows, case, device, dtype, deadline: float, results: Results, model_cache: dict) -> None:
    """Warm every row once, then as many interleaved rounds (up to REPEATS) as the time left allows."""
    patching = importlib.import_module(f"{PACK}.patching")
    probe = importlib.import_module(f"{PACK}.patching.probe")
    entry = results.case({"case": case.name, "steps": case.steps, "workflow_steps": case.workflow_steps,
                          "rows": {}, "note": ""})
    notes = [f"{case.steps} of the workflow's {case.workflow_steps} steps, {case.sampler} / {case.scheduler}, "
             f"CFG {case.cfg}, latent {'x'.join(map(str, case.latent))}"]
    notes += [f"{row}: not run ({why})" for row, why in case.skipped.items()]
    entry["note"] = "; ".join(notes)
    key = (case.model.config_class, json.dumps(case.model.unet_config, sort_keys=True))
    if key not in model_cache:  # FLUX's two sizes share one model
        model_cache.clear()
        _release()
        model_cache[key] = cases.build(case.model, device, dtype)
    model = model_cache[key]
    if case.shift is not None:  # the Wan workflow's ModelSamplingSD3 node
        sd3_sampling = importlib.import_module("comfy_extras.nodes_model_advanced").ModelSamplingSD3
        model = sd3_sampling().patch(model, case.shift)[0]
    positive, negative = cases.conditioning(case.model, 1), cases.conditioning(case.model, 2)
    latent = {"samples": torch.zeros(1, *case.latent)}
    profile = probe.profile_attention(model, positive, latent)
    entry["attention_share"] = profile.attention_share
    entry["note"] += f"; attention is {profile.attention_share:.0%} of the model's FLOPs (Inspector's probe)"
    results.save()
    made, per_step = {}, {}
    for row in case.rows:
        record = entry["rows"].setdefault(row, {"seconds": []})
        left = deadline - time.perf_counter()
        guess = per_step.get("unpatched", 0.0) * WARM_STEPS
        if guess > left:
            record["note"] = f"skipped: its warm-up needs ~{guess:.0f} s, {left:.0f} s of the budget left"
            continue
        try:
            made[row] = rows.make(row, model, case, profile.report.layers)
            seconds, peak, _ = timed_run(cases, case, made[row], positive, negative, WARM_STEPS)
            per_step[row] = seconds / WARM_STEPS
        except Exception as error:  # report and go on: one device call is all a session may have
            record["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            made.pop(row, None)
            print(f"  {case.name}, {row}: {record['note']}", flush=True)
        results.save()
    rounds, kept = _fit(case, per_step, made, deadline, entry)
    for _ in range(rounds):
        for row in kept:
            record = entry["rows"][row]
            try:
                seconds, peak, _ = timed_run(cases, case, made[row], positive, negative, case.steps)
            except Exception as error:
                record["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                kept = [r for r in kept if r != row]
                continue
            record["seconds"].append(seconds)
            record["median_s"] = statistics.median(record["seconds"])
            record["peak_gib"] = max(record.get("peak_gib", 0.0), peak)
            record["flops_kept"] = flops_kept(patching, made[row])
            results.save()
            print(f"  {case.name}, {row}: {seconds:.2f} s, peak {peak:.1f} GiB", flush=True)


def _fit(case, per_step: dict, made: dict, deadline: float, entry: dict) -> tuple[int, list[str]]:
    """How many interleaved rounds of which rows fit before the deadline: up to REPEATS rounds of
    every warmed row, else fewer rounds, else drop rows from the end of the priority order."""
    kept = [row for row in case.rows if row in made]
    left = deadline - time.perf_counter()
    while kept:
        one_round = sum(per_step[row] * case.steps for row in kept) * 1.1
        rounds = min(REPEATS, int(left // one_round))
        if rounds >= 1:
            break
        dropped = kept.pop()
        entry["rows"][dropped]["note"] = (f"skipped: a run needs ~{per_step[dropped] * case.steps:.0f} s, "
                                          f"{left:.0f} s of the budget left")
    else:
        return 0, []
    if rounds < REPEATS:
        entry["note"] += f"; {rounds} timed run(s) per row: the budget allowed no more"
    return rounds, kept


def _release() -> None:
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def check_rows(cases, rows, checked: list, device: torch.device, results: Results) -> list[str]:
    """Each row at a tiny size on `device` (float32) against the same row's CPU reference semantics."""
    reference_model = importlib.import_module("harness.reference_schedule").reference_model
    probe = importlib.import_module(f"{PACK}.patching.probe")
    failures = []
    for case in checked:
        tiny = case.model
        on_cpu = cases.build(tiny, torch.device("cpu"), torch.float32)
        here = on_cpu if device.type == "cpu" else cases.moved(on_cpu, device)
        positive, negative = cases.conditioning(tiny, 1), cases.conditioning(tiny, 2)
        layers = probe.profile_attention(on_cpu, positive, {"samples": torch.zeros(1, *case.latent)}).report.layers
        for row in case.rows:
            check = {"model": f"{tiny.arch} (tiny)", "row": row}
            try:
                out = cases.sample(rows.make(row, here, case, layers), case, positive, negative, case.steps)
                chain = rows.reference_chain(row)
                if chain is not None:
                    check["against"] = "float64 reference schedule, CPU"
                    expected = cases.sample(reference_model(on_cpu, chain, tiny.arch), case, positive, negative,
                                            case.steps)
                else:
                    check["against"] = "the pack's CPU backends"
                    expected = cases.sample(rows.make(row, on_cpu, case, layers), case, positive, negative,
                                            case.steps)
                check["error"] = float((out.cpu() - expected).abs().max() / expected.abs().max())
                ok = check["error"] <= CHECK_TOLERANCE[device.type]
                check["verdict"] = "ok" if ok else "FAIL"
            except Exception as error:
                check["against"] = check.get("against", "-")
                check["verdict"], ok = f"FAIL: {type(error).__name__}: {str(error).splitlines()[0][:160]}", False
            failures += [] if ok else [f"{tiny.arch} {row}: {check['verdict']} ({check.get('error', 'no result')})"]
            results.data["checks"].append(check)
            results.save()
    return failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script (default 420)")
    parser.add_argument("--out", type=Path, default=None, help="folder for e2e_gpu.json / .md (default $OUT)")
    parser.add_argument("--wan", choices=["1.3B", "14B"], default="1.3B", help="Wan 2.1 size (14B: far longer)")
    parser.add_argument("--no-check", action="store_true", help="skip the tiny-size correctness check")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks this script")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_e2e_gpu: no CUDA device here, nothing to run (--smoke checks the script on the CPU).")
        return 0
    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    set_up_host(device.type)
    if args.smoke:  # as the pack does when ComfyUI starts on a CPU: the C++ kernel loads (or builds) aside,
        importlib.import_module(f"{PACK}.kernels.native").build_in_background()  # the torch tiles meanwhile
        globals()["REPEATS"] = 1
        torch.set_num_threads(1)  # tiny tensors: a thread pool only waits for a busy machine's cores
    cases = importlib.import_module("e2e_cases") if "e2e_cases" in sys.modules else _load_sibling("e2e_cases")
    specs = importlib.import_module("harness.models").SPECS
    rows = cases.Rows(PACK)
    out = args.out or Path(os.environ.get("OUT") or REPO / "bench-results")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke: timings mean nothing)"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    results = Results(out, {"device": name, "torch": torch.__version__, "dtype": str(dtype)[6:],
                            "budget_s": args.budget})
    tiny = cases.smoke_cases(specs)  # FLUX 1024^2, FLUX 2048^2 (the same tiny model), Wan, SD3.5
    checked = tiny[:1] if args.smoke else tiny[1:]  # every row once; on the GPU every model class
    with full_float32():
        failures = [] if args.no_check else check_rows(cases, rows, checked, device, results)
    print(f"correctness check: {len(failures)} failures, {time.perf_counter() - started:.0f} s", flush=True)
    plan = tiny if args.smoke else cases.real_cases(args.wan)
    model_cache: dict = {}
    with sdpa_priority():
        for index, case in enumerate(plan):
            left = args.budget - (time.perf_counter() - started)
            share = case.budget_share / sum(c.budget_share for c in plan[index:])
            deadline = time.perf_counter() + max(0.0, left) * share
            print(f"{case.name}: {left * share:.0f} s of the budget", flush=True)
            try:
                run_case(cases, rows, case, device, dtype, deadline, results, model_cache)
            except Exception as error:  # a model that does not build or fit: the next one still runs
                message = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                results.case({"case": case.name, "rows": {}, "note": message})
                print(f"{case.name}: {message}", flush=True)
    results.save()
    print(results.markdown())
    print(f"{len(failures)} correctness failures" + "".join(f"\n  {f}" for f in failures))
    print(f"done in {time.perf_counter() - started:.0f} s; results in {out}")
    return 1 if failures else 0


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    if "harness" in sys.modules:  # run_all.py (`make bench`) has ComfyUI loaded for the CPU already
        print("bench_e2e_gpu: runs as its own command (it sets ComfyUI up for the GPU); see its docstring.")
    elif status := main(sys.argv[1:]):
        sys.exit(status)
