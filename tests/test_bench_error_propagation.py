"""The error-propagation benchmark (tests/benchmarks/bench_error_propagation.py): its weightings of the budget
search's errors, that the weighting reaches the search and leaves nothing behind, and its tables on a tiny run."""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
plans = pack_import("plans")
calibrate = pack_import("plans.calibrate")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its neighbours as top-level modules
    return importlib.import_module("bench_error_propagation")


def _rates(bench):
    return [bench.StepRate(1, 0.9, 2.0, 0.2, 1.0, 0.4), bench.StepRate(2, 0.5, 1.0, 0.02, 1.0, 0.01)]


def test_a_run_is_read_as_steps_and_its_correlation_between_energy_and_amplitude(bench):
    assert bench._steps("3-5") == [3, 4, 5] and bench._steps("2,4,6") == [2, 4, 6] and bench._steps("7") == [7]
    assert bench.RunError(0.3, 0.2, 0.4).correlation == pytest.approx(0.5)
    assert bench.RunError(0.2, 0.2, 0.4).correlation == 0.0 and math.isnan(bench.RunError(0.2, 0.2, 0.2).correlation)


def test_each_weighting_scales_as_documented(bench):
    rates = _rates(bench)  # window rates 0.1, 0.02; step-sharing rates 0.4, 0.01
    assert bench.weights(rates, "none") == bench.Weights((1.0,) * 3, (1.0,) * 3, (1.0,) * 3)
    step = bench.weights(rates, "step")
    means = (0.2, 0.0002 ** 0.5)  # geometric means of the two techniques' rates
    assert step.window == step.sharing and step.window[1:] == pytest.approx([m / (sum(means) / 2) for m in means])
    technique = bench.weights(rates, "technique")  # both kinds over the window rates' mean
    assert technique.window[1:] == pytest.approx((0.1 / 0.06, 0.02 / 0.06))
    assert technique.sharing[1:] == pytest.approx((0.4 / 0.06, 0.01 / 0.06))
    exchange = bench.weights(rates, "exchange")
    assert exchange.window == (1.0,) * 3 and exchange.sharing[1:] == pytest.approx((4.0, 0.5))
    assert exchange.of("wars+asc", 1, 0) == 1.0 and exchange.of("ast", 1, 0) == pytest.approx(4.0)
    assert exchange.of("block", 1, 0) == pytest.approx(2.0)
    layer = bench.weights(rates, "layer", {0: [2.0, 8.0], 1: [1.0]})  # geometric means 4 and 1, over their mean
    assert layer.window == layer.sharing == (1.0,) * 3 and layer.layers == pytest.approx({0: 1.6, 1: 0.4})
    assert layer.of("ast", 2, 0) == pytest.approx(1.6) and layer.of("wars", 1, 7) == 1.0  # a layer not measured
    with pytest.raises(ValueError, match="needs the layers' rates: give --layer-steps"):
        bench.weights(rates, "layer")
    with pytest.raises(ValueError, match="weighting must be one of"):
        bench.weights(rates, "sigma")
    unchanged = bench.StepRate(3, 0.2, 1.0, 0.0, 0.0, 0.01)  # no final error; no local error
    assert unchanged.window == 0 and math.isnan(unchanged.sharing)
    assert bench.weights([*rates, unchanged], "none").window == (1.0,) * 4
    with pytest.raises(ValueError, match=r"no rate to weigh by at steps \[3\]"):
        bench.weights([*rates, unchanged], "step")


def _calibrated(bench, factors=None):
    model = build_model("sd3")
    settings = plans.Settings(0.1, plans.CANDIDATES, mode="budget", cost="flops", step_reuse=True)
    weighting = bench.weighted_search(factors) if factors is not None else bench.contextlib.nullcontext()
    with weighting, bench._captured() as found:
        plans.calibrate(model, conditioning("sd3", 7, seed=1), conditioning("sd3", 7, seed=2),
                        empty_latent("sd3", 16, 16, batch=2), seed=3, steps=4, cfg=3.0, sampler="euler",
                        scheduler="simple", settings=settings)
    return found[0]


def test_the_weighting_reaches_the_search_and_is_undone_after(bench):
    search, step_reuse = calibrate.Calibration._search, calibrate.Calibration._step_reuse
    plain = _calibrated(bench)
    doubled = _calibrated(bench, bench.Weights((1.0, 2.0, 2.0, 2.0), (1.0, 3.0, 3.0, 3.0), (1.0,) * 4))
    assert (calibrate.Calibration._search, calibrate.Calibration._step_reuse) == (search, step_reuse)
    compared = 0
    for step, layers in enumerate(plain.local_errors):
        for layer, options in layers.items():
            for key, error in options.items():
                factor = 2.0 if key[0].startswith("wars") else 3.0 if key[0] == "ast" else 1.0
                assert doubled.local_errors[step][layer][key] == pytest.approx(factor * error)
                compared += 1
    assert compared


def test_the_tables_list_every_compressed_step(bench, capsys):
    bench.main(["--size", "8", "--steps", "3", "--layer-steps", "2", "--runs", "1-2"])
    out = capsys.readouterr().out
    runs = re.findall(r"^\| (wars|ast) \| 1,2 \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", out, re.MULTILINE)
    assert [run[0] for run in runs] == ["wars", "ast"]
    for _, measured, energy, amplitude, correlation in runs:
        assert 0 < float(energy) <= float(amplitude) and float(measured) > 0
        assert float(correlation) == pytest.approx((float(measured) - float(energy)) /
                                                   (float(amplitude) - float(energy)), abs=0.01)
    out = out.split("Runs of compressed steps")[0]
    layers = re.findall(r"^\| 2 \| (\d+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \| [^|]+ \|$", out, re.MULTILINE)
    assert layers and all(float(final) > 0 for _, _, final, _ in layers)  # each compressible layer alone
    out = out.split("One layer windowed alone")[0]  # the tables of whole steps
    rows = re.findall(r"^\| (\d) \| [\d.]+ \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", out, re.MULTILINE)
    assert [row[0] for row in rows] == ["1", "2"]
    for _, local, final, rate in rows:
        assert float(local) > 0 and float(final) > 0
        assert float(rate) == pytest.approx(float(final) / float(local), rel=0.05)
    assert re.search(r"^\| 2 \| [\d.e-]+ \| [\d.e-]+ \| [\d.e-]+ \|$", out, re.MULTILINE)  # refresh 2: adds up?
