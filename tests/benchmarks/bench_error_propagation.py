"""Where a plan's error goes: what one step's compression costs the final latent, per unit of the local
error the budget search counts for it, on the demo model; and whether weighting the search by it pays.

The budget search (plans/search.py) sums each cell's local error (relative squared error of the layer's
attention output against full attention) unweighted, over every step and technique. Here each step s is
compressed alone, every compressible layer at once, with full attention everywhere else: window + residual
at the quarter window (the residual one step old) and step sharing (the output one step old). The final
latent's relative squared error against full attention, over the local errors the search summed for that
step, is the step's rate: how much of the image one unit of the search's error at that step costs
(`--layer-steps`: the same for each layer windowed alone, at the steps given; `--runs`: runs of compressed
steps, to see how alike their errors point, the budget search's RUN_CORRELATION). The
uniform window + residual patterns check whether the rates add up (error predicted from them against
measured). Everything is measured on bench_calibration's calibration batch (its first caption, a batch of
seeds), calibrated by FLOPs (deterministic: no time probe).

With `--weightings`, bench_calibration then runs once per weighting of the search's errors by those rates
(normalised to a mean of one over the steps, so that a delta keeps its scale), each plan applied to the
held-out captions:
    none        the search as it is
    step        one rate per step (geometric mean of the two techniques')
    technique   window cells by the window's rate, step sharing and skipped steps by step sharing's
    exchange    window cells as they are, step sharing and skipped steps by step sharing's rate over the
                window's (an exchange rate between the techniques, no step weight)
    layer       each layer's cells by its own rate over the all-layer rate of the step (geometric mean over
                the `--layer-steps` measured), normalised to a mean of one over the layers; no step weight
The weighting is an experiment of this script (it wraps the search), not a setting of the pack.

Run: `python tests/benchmarks/run_all.py error_propagation` (defaults: 1024 image tokens, 10 steps; about
2 minutes on 2 cores), or with the comparison (about 6 minutes per weighting on one thread):
`python tests/benchmarks/bench_error_propagation.py --weightings none step technique exchange`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

if __name__ == "__main__" and "harness" not in sys.modules:  # run directly: find the harness
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import pack_import  # noqa: E402, I001  (loads ComfyUI and the pack first)
from harness.models import sample  # noqa: E402
import comfy.sd  # noqa: E402
import torch  # noqa: E402
import bench_calibration  # noqa: E402  (tests/benchmarks, beside this script)
from bench_calibration import CALIBRATION_CAPTIONS, CALIBRATION_SEEDS, CFG  # noqa: E402

demo = pack_import("demo")
patching = pack_import("patching")
plans = pack_import("plans")
calibrate = pack_import("plans.calibrate")

WEIGHTINGS = ("none", "step", "technique", "exchange", "layer")
WINDOW_SCALE = min(calibrate.WINDOW_SCALES)  # the quarter window: the window the search reaches for first
DELTAS = (0.1, 0.15, 0.2)


@dataclass(frozen=True)
class StepRate:
    """One step compressed alone: the local error the search counts for it and the final latent's error."""

    step: int
    sigma: float
    window_local: float  # summed over the compressible layers: window + residual, the residual one step old
    window_final: float  # the final latent's relative squared error with that step windowed alone
    sharing_local: float  # the same for step sharing, the output one step old
    sharing_final: float

    @property
    def window(self) -> float:
        return _ratio(self.window_final, self.window_local)

    @property
    def sharing(self) -> float:
        return _ratio(self.sharing_final, self.sharing_local)


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else math.nan  # nan: nothing measured to divide by


@dataclass(frozen=True)
class Weights:
    """A factor per step for each kind of error the search sums (step 0 is never compressed)."""

    window: tuple[float, ...]  # window + residual cells
    sharing: tuple[float, ...]  # step-sharing cells and skipped steps
    other: tuple[float, ...]  # CFG sharing and block cells
    layers: dict[int, float] = dataclasses.field(default_factory=dict)  # a factor per layer (none: 1)

    def of(self, technique: str, step: int, layer: int) -> float:
        factor = self.layers.get(layer, 1.0)
        if technique.startswith("wars"):
            return factor * self.window[step]
        return factor * (self.sharing[step] if technique == "ast" else self.other[step])


def weights(rates: list[StepRate], weighting: str, layer_rates: dict[int, list[float]] | None = None) -> Weights:
    """The factors of `weighting` (module docstring), each kind's normalised to a mean of one; `layer_rates`
    (layer -> its rate over the all-layer rate at each step of `--layer-steps`) for the weighting "layer"."""
    unmeasured = [rate.step for rate in rates if not (rate.window > 0 and rate.sharing > 0)]
    if unmeasured and weighting != "none":
        raise ValueError(f"no rate to weigh by at steps {unmeasured} (an error of 0 measured there)")
    window = [1.0] + [rate.window for rate in rates]
    sharing = [1.0] + [rate.sharing for rate in rates]
    both = [math.sqrt(a * b) for a, b in zip(window, sharing, strict=True)]
    if weighting == "none":
        window = sharing = both = [1.0] * len(window)
    elif weighting == "step":
        window = sharing = both = _normalised(both)
    elif weighting == "technique":
        scale = _mean(window)
        window, sharing, both = ([value / scale for value in values] for values in (window, sharing, both))
    elif weighting == "exchange":
        sharing = [b / a for a, b in zip(window, sharing, strict=True)]
        both = [math.sqrt(value) for value in sharing]
        window = [1.0] * len(window)
    elif weighting == "layer":
        if not layer_rates:
            raise ValueError("the weighting 'layer' needs the layers' rates: give --layer-steps")
        means = {layer: math.exp(sum(map(math.log, found)) / len(found)) for layer, found in layer_rates.items()}
        scale = sum(means.values()) / len(means)
        ones = tuple([1.0] * len(window))
        return Weights(ones, ones, ones, {layer: value / scale for layer, value in means.items()})
    else:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    return Weights(tuple(window), tuple(sharing), tuple(both))


def _mean(values: list[float]) -> float:
    return sum(values[1:]) / max(1, len(values) - 1)  # step 0 stays full: its factor is never used


def _normalised(values: list[float]) -> list[float]:
    scale = _mean(values)
    return [value / scale for value in values]


@contextlib.contextmanager
def weighted_search(factors: Weights) -> Iterator[None]:
    """Budget calibrations inside scale each cell's local error, and each skipped step's error, by
    `factors` before the search sums them."""
    search, step_reuse = calibrate.Calibration._search, calibrate.Calibration._step_reuse

    def weighted(self):
        for step, layers in enumerate(self.local_errors):
            for layer, options in layers.items():
                for key in options:
                    options[key] *= factors.of(key[0], step, layer)
        return search(self)

    def weighted_reuse(self):
        found = step_reuse(self)
        return dataclasses.replace(found, errors={key: error * factors.sharing[key[0]]
                                                  for key, error in found.errors.items()})

    with (mock.patch.object(calibrate.Calibration, "_search", weighted),
          mock.patch.object(calibrate.Calibration, "_step_reuse", weighted_reuse)):
        yield


class Probe:
    """The calibration batch's full-attention run, and runs of the same batch with chosen steps compressed."""

    def __init__(self, model, size: int, steps: int) -> None:
        self.model, self.steps = model, steps
        self.positive = bench_calibration._encode(CALIBRATION_CAPTIONS[0])
        self.negative = bench_calibration._encode("")
        self.latent = bench_calibration._latent(CALIBRATION_SEEDS, size)
        settings = plans.Settings(0.1, plans.CANDIDATES, mode="budget", cost="flops", step_reuse=True)
        with _captured() as found:
            self.plan, _, self.layers = plans.calibrate(model, self.positive, self.negative, self.latent, seed=0,
                                                        steps=steps, cfg=CFG, sampler="euler", scheduler="simple",
                                                        settings=settings)
        self.calibration = found[0]
        self.fraction = settings.window.fraction * WINDOW_SCALE
        self.reference = self._sample(self.model)

    def _sample(self, model) -> torch.Tensor:
        return sample(model, self.positive, self.negative, self.latent, steps=self.steps, cfg=CFG, seed=0)

    def local(self, step: int, technique: str, age: int = 1) -> float:
        """The local error the search summed for `step` with every compressible layer on `technique`."""
        key = (technique, self.fraction if technique == "wars" else 0.0, age)
        return sum(options.get(key, 0.0) for options in self.calibration.local_errors[step].values())

    @property
    def compressible(self) -> list[int]:
        return [layer for layer, slot in enumerate(self.layers) if slot.compressible]

    def layer_local(self, step: int, layer: int) -> float:
        """The local error the search counts for `layer` windowed at `step` (the residual one step old)."""
        return self.calibration.local_errors[step][layer].get(("wars", self.fraction, 1), 0.0)

    def final_error(self, cells: dict[int, str], layers: list[int] | None = None) -> float:
        """The final latent's relative squared error with each step of `cells` on its technique (on `layers`,
        by default every compressible layer; window cells at the quarter window) and full attention elsewhere."""
        methods = [["full"] * len(self.layers) for _ in range(self.steps)]
        windows: list[list[float | None]] = [[None] * len(self.layers) for _ in range(self.steps)]
        for step, technique in cells.items():
            for layer in self.compressible if layers is None else layers:
                methods[step][layer] = technique
                windows[step][layer] = self.fraction if technique == "wars" else None
        plan = dataclasses.replace(self.plan, methods=methods, windows=windows, heads=[], step_reuse=[])
        out = self._sample(patching.install(self.model, plans.PlannedAttention(plan)))
        return float(((out - self.reference) ** 2).mean() / (self.reference ** 2).mean())

    def rates(self) -> list[StepRate]:
        timeline = self.calibration.timeline
        return [StepRate(step, float(timeline.sigmas[step]), self.local(step, "wars"),
                         self.final_error({step: "wars"}), self.local(step, "ast"), self.final_error({step: "ast"}))
                for step in range(1, self.steps)]


@dataclass(frozen=True)
class RunError:
    """A run of compressed steps: the final error measured and as the step rates predict it."""

    measured: float
    energy: float  # the steps' predicted errors summed: errors pointing independently
    amplitude: float  # their square roots summed, squared: errors pointing alike

    @property
    def correlation(self) -> float:
        """Where the measurement lies between the two: 0 in energy, 1 in amplitude."""
        return _ratio(self.measured - self.energy, self.amplitude - self.energy)


def run_errors(probe: Probe, rates: list[StepRate], technique: str, run: list[int]) -> RunError:
    """`run` compressed with `technique`; consecutive steps read what the step before the run kept."""
    consecutive = run == list(range(run[0], run[-1] + 1))
    parts = [(rates[step - 1].window if technique == "wars" else rates[step - 1].sharing)
             * probe.local(step, technique, step - run[0] + 1 if consecutive else 1) for step in run]
    return RunError(probe.final_error(dict.fromkeys(run, technique)), sum(parts),
                    sum(math.sqrt(part) for part in parts) ** 2)


def _steps(text: str) -> list[int]:
    """"3-5" -> [3, 4, 5]; "2,4,6" -> [2, 4, 6]."""
    if "-" in text:
        first, last = map(int, text.split("-"))
        return list(range(first, last + 1))
    return [int(step) for step in text.split(",")]


@contextlib.contextmanager
def _captured() -> Iterator[list]:
    """The Calibration object of the budget calibration run inside (its measured local errors)."""
    found: list = []
    search = calibrate.Calibration._search

    def spy(self):
        found.append(self)
        return search(self)

    with mock.patch.object(calibrate.Calibration, "_search", spy):
        yield found


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="image tokens per side (32: 1024 tokens)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--weightings", nargs="*", default=[], choices=WEIGHTINGS,
                        help="run bench_calibration with the search weighted each of these ways (none: skip)")
    parser.add_argument("--layer-steps", nargs="*", type=int, default=[],
                        help="also window each layer alone at these steps (its own rate)")
    parser.add_argument("--runs", nargs="*", default=[], metavar="STEPS",
                        help="also compress these runs of steps (e.g. 3-4 5-7 2,4,6) with each technique: how alike "
                             "the errors of a run point (search.RUN_CORRELATION)")
    parser.add_argument("--deltas", nargs="+", type=float, default=list(DELTAS), help="for the comparison")
    parser.add_argument("--rounds", type=int, default=2, help="for the comparison")
    args = parser.parse_args(argv)
    model = comfy.sd.load_diffusion_model(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    probe = Probe(model, args.size, args.steps)
    rates = probe.rates()
    print(f"\nOne step compressed alone ({args.size ** 2} image tokens, {args.steps} steps, calibration batch of "
          f"{CALIBRATION_SEEDS}); window + residual at window {probe.fraction:g}, step sharing; final error: the final "
          "latent's relative squared error against full attention; rate: final error / local error\n")
    print("| step | sigma | window local | window final | window rate | sharing local | sharing final "
          "| sharing rate | sharing / window |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rate in rates:
        print(f"| {rate.step} | {rate.sigma:.3f} | {rate.window_local:.3g} | {rate.window_final:.3g} | "
              f"{rate.window:.3g} | {rate.sharing_local:.3g} | {rate.sharing_final:.3g} | {rate.sharing:.3g} | "
              f"{_ratio(rate.sharing, rate.window):.2f} |")
    print("\nDo the rates add up? Uniform window + residual at the same window, predicted from the window rates "
          "(each step's local error at its residual's age) against measured:\n")
    print("| refresh | predicted final error | measured final error | search's summed local error |")
    print("|---|---|---|---|")
    for refresh in (2, 4):
        steps = [step for step in range(1, args.steps) if step % refresh]
        predicted = sum(rates[step - 1].window * probe.local(step, "wars", step % refresh) for step in steps)
        summed = sum(probe.local(step, "wars", step % refresh) for step in steps)
        print(f"| {refresh} | {predicted:.3g} | {probe.final_error(dict.fromkeys(steps, 'wars')):.3g} | {summed:.3g} |")
    layer_rates: dict[int, list[float]] = {}
    if args.layer_steps:
        print("\nOne layer windowed alone at one step (window + residual, the residual one step old): each layer's "
              "rate beside the rate of all layers at once\n")
        print("| step | layer | local error | final error | rate | all layers' rate |")
        print("|---|---|---|---|---|---|")
        for step in args.layer_steps:
            for layer in probe.compressible:
                local, final = probe.layer_local(step, layer), probe.final_error({step: "wars"}, [layer])
                layer_rates.setdefault(layer, []).append(_ratio(final, local) / rates[step - 1].window)
                print(f"| {step} | {layer} | {local:.3g} | {final:.3g} | {_ratio(final, local):.3g} | "
                      f"{rates[step - 1].window:.3g} |", flush=True)
    if args.runs:
        print("\nRuns of compressed steps (every compressible layer; a run of consecutive steps reads one residual or "
              "output, its ages growing): the final error measured, predicted from the step rates as the errors add "
              "in energy and in amplitude, and the correlation between the two that the measurement implies\n")
        print("| technique | steps | measured | in energy | in amplitude | correlation |")
        print("|---|---|---|---|---|---|")
        for technique in ("wars", "ast"):
            for run in map(_steps, args.runs):
                found = run_errors(probe, rates, technique, run)
                print(f"| {technique} | {','.join(map(str, run))} | {found.measured:.3g} | {found.energy:.3g} | "
                      f"{found.amplitude:.3g} | {found.correlation:.2f} |", flush=True)
    for weighting in args.weightings:
        factors = weights(rates, weighting, layer_rates)
        print(f"\n### The search's errors weighted: {weighting}\n\nwindow {_listed(factors.window)}, "
              f"step sharing {_listed(factors.sharing)}, layers {factors.layers}\n", flush=True)
        with weighted_search(factors):
            bench_calibration.main(["--size", str(args.size), "--steps", str(args.steps), "--modes", "budget",
                                    "--step-reuse", "--cost", "flops", "--deltas", *map(str, args.deltas),
                                    "--rounds", str(args.rounds), "--uniform-fractions", "0.03",
                                    "--uniform-refresh", "2", "--lazy-thresholds", "--easy-thresholds",
                                    "--fbc-thresholds"])


def _listed(values: tuple[float, ...]) -> str:
    return " ".join(f"{value:.2f}" for value in values[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
