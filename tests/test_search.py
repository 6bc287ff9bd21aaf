"""The budget search: the dynamic program against brute force, the budget it meets, the window
sizes and residual ages it picks on a controlled model, and the cost probe."""

from __future__ import annotations

import functools
import itertools
import json
import random
import statistics

import folder_paths
import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample

plans = pack_import("plans")
patching = pack_import("patching")
kernels = pack_import("kernels")
costs = pack_import("plans.costs")
timings = pack_import("plans.timings")
search = pack_import("plans.search")
schema = pack_import("plans.schema")
WindowSize = pack_import("patching.schedule").WindowSize

STEPS = 4
FRACTIONS = (0.0625, 0.125)
PRICES = costs.Prices(1.0, 0.5, {0.0625: (0.2, 0.1), 0.125: (0.35, 0.175)})
SLOT = costs.LayerSlot(schema.LayerInfo("image", 2, 8), True, 100, {0.0625: 20, 0.125: 35}, PRICES)


def random_errors(seed: int, steps: int, ages: int) -> list[dict]:
    """Every candidate of one layer at every step after the first, each with a random error."""
    rng = random.Random(seed)
    errors = [{}]
    for step in range(1, steps):
        options = {("full+asc", 0.0, 0): rng.random()}
        for age in range(1, min(step, ages) + 1):
            options[("ast", 0.0, age)] = rng.random()
            for fraction, name in itertools.product(FRACTIONS, ("wars", "wars+asc")):
                options[(name, fraction, age)] = rng.random() * age
        errors.append(options)
    return errors


def brute_force(errors: list[dict], weight: float, ages: int) -> float:
    """The least price + weight x error over every sequence the runtime can carry out, walked forwards:
    step sharing reads the output of the last computing step, window + residual the residual of the
    last full step, cached for the window of the first window step after it (the others must match)."""
    best = float("inf")
    steps = len(errors)
    cells = [("full", None), ("full+asc", None), ("ast", None)] + [
        (name, fraction) for name in ("wars", "wars+asc") for fraction in FRACTIONS]
    for sequence in itertools.product(cells, repeat=steps - 1):
        last_full = last_computed = 0
        residual = None
        total = 1.0
        for step, (name, fraction) in enumerate(sequence, start=1):
            if name == "full":
                last_full = last_computed = step
                residual = None
                total += 1.0
                continue
            if name == "full+asc":
                key = (name, 0.0, 0)
            elif name == "ast":
                key = (name, 0.0, step - last_computed)
            else:
                key = (name, fraction, step - last_full)
                if residual not in (None, fraction):
                    break
            if key not in errors[step]:
                break
            price = SLOT.price(name, fraction)
            if name.startswith("wars") and residual is None:
                price += SLOT.price("wars", fraction)
                residual = fraction
            total += price + weight * errors[step][key]
            if name != "ast":
                last_computed = step
        else:
            best = min(best, total)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("weight", [0.05, 0.5, 5.0])
def test_the_dynamic_program_finds_the_brute_force_optimum(seed, weight):
    errors = random_errors(seed, steps=5, ages=3)
    cells, price, error = search.layer_choices(errors, SLOT, weight, ages=3)
    assert price + weight * error == pytest.approx(brute_force(errors, weight, ages=3), rel=1e-12)
    assert cells[0] == search.FULL and len(cells) == 5


def test_a_residual_serves_the_one_window_it_was_cached_for():
    """Switching to the narrower, exact window at step 2 would be cheapest, but the residual the
    full step cached is the wider window's: the runtime could not carry that out."""
    errors = [{}, {("wars", 0.125, 1): 0.0, ("wars", 0.0625, 1): 10.0},
              {("wars", 0.125, 2): 10.0, ("wars", 0.0625, 2): 0.0}]
    cells, price, error = search.layer_choices(errors, SLOT, 1.0, ages=3)
    assert cells == [search.FULL, search.Cell("wars", 0.125, 0.0, 0.35 * 2), search.FULL]
    assert price + error == pytest.approx(brute_force(errors, 1.0, ages=3)) == pytest.approx(1 + 0.35 * 2 + 1)


def test_the_budget_is_met_and_a_larger_one_never_costs_more():
    errors = [{}] + [dict(step) for step in random_errors(7, steps=8, ages=4)[1:]]
    by_layer = [{0: step, 1: {key: 2 * value for key, value in step.items()}} for step in errors]
    prices = []
    for budget in (0.0, 0.3, 1.0, 3.0, 100.0):
        cells = search.allocate(by_layer, [SLOT, SLOT], budget, ages=4).cells
        spent = sum(cell.error for row in cells for cell in row)
        assert spent <= budget
        prices.append(sum(SLOT.price(cell.technique, cell.fraction) for row in cells for cell in row))
    assert prices == sorted(prices, reverse=True) and prices[0] > prices[-1]
    assert all(cell.technique == "full" for row in search.allocate(by_layer, [SLOT, SLOT], 0.0, 4).cells
               for cell in row)


def _two_layers(steps: int) -> list[dict]:
    errors = random_errors(3, steps=steps, ages=4)
    return [{0: step, 1: step} for step in errors]


def test_a_step_reused_without_error_is_skipped_and_its_layers_wait():
    """Step 2's prediction equals step 1's: skipping it errs nothing, so even a zero budget skips it; its
    layers run nothing there, and step sharing at step 3 reads outputs two steps old."""
    reuse = search.StepReuse({(2, 1, -1): 0.0, (3, 1, -1): 50.0}, saving=3.0)
    found = search.allocate(_two_layers(5), [SLOT, SLOT], 0.0, ages=4, reuse=reuse)
    assert found.step_reuse == [None, None, "reuse", None, None] and found.reuse_errors[2] == 0.0
    assert found.cells[2] == [search.Cell("ast"), search.Cell("ast")]
    assert all(cell == search.FULL for step in (0, 1, 3, 4) for cell in found.cells[step])


def test_a_step_reuse_is_weighed_against_the_layers_choices_within_the_budget():
    errors = _two_layers(6)
    reuse = search.StepReuse({(step, last, before): 0.3 * (step - last) + 0.1 * (before < 0)
                              for step in range(1, 6) for last in range(step) for before in range(-1, last)}, 2.0)
    prices = []
    for budget in (0.0, 0.5, 2.0, 8.0):
        found = search.allocate(errors, [SLOT, SLOT], budget, ages=4, reuse=reuse)
        assert sum(cell.error for row in found.cells for cell in row) + sum(found.reuse_errors) <= budget + 1e-12
        assert found.step_reuse[0] is None
        prices.append(sum(cell.price for row in found.cells for cell in row)
                      + reuse.saving * sum(how is None for how in found.step_reuse))
    assert prices == sorted(prices, reverse=True) and prices[0] > prices[-1]
    assert search.allocate(errors, [SLOT, SLOT], 8.0, ages=4, reuse=reuse).step_reuse.count(None) < 6  # it skips
    assert search.allocate(errors, [SLOT, SLOT], 8.0, ages=4).step_reuse == [None] * 6  # not offered: never


def test_a_run_of_reusing_cells_adds_up_partly_in_amplitude():
    """A cell 3 steps after its layer's full step counts its own error plus 2 x correlation x its amplitude x
    the amplitudes of the same candidate at ages 1 and 2 of its run; cells at age 1, full, and full + CFG
    sharing (nothing earlier read) count as measured; correlation 0 changes nothing."""
    errors = [{}, {0: {("wars", 0.125, 1): 1.0, ("full+asc", 0.0, 0): 9.0}}, {0: {("wars", 0.125, 2): 4.0}},
              {0: {("wars", 0.125, 3): 9.0, ("ast", 0.0, 3): 16.0, ("wars", 0.0625, 3): 1.0}, 1: {("ast", 0.0, 1): 2.0}}]
    counted = search.in_runs(errors, 0.5)
    assert counted[1][0] == errors[1][0]  # age 1 and full + CFG sharing: nothing earlier in their runs
    assert counted[2][0][("wars", 0.125, 2)] == pytest.approx(4.0 + 2 * 0.5 * 2.0 * 1.0)
    assert counted[3][0][("wars", 0.125, 3)] == pytest.approx(9.0 + 2 * 0.5 * 3.0 * (1.0 + 2.0))
    assert counted[3][0][("ast", 0.0, 3)] == 16.0  # no step sharing measured at ages 1 and 2 before it
    assert counted[3][0][("wars", 0.0625, 3)] == 1.0  # nor this window's
    assert counted[3][1] == errors[3][1]
    assert search.in_runs(errors, 0.0) == errors


def test_counting_runs_in_amplitude_shortens_them_within_the_same_budget():
    """Errors growing slowly with age: counted in energy alone, the search keeps one full step and windows the
    rest on its residual; counted as runs add up, it refreshes the residual sooner at the same budget, and
    the plan's error counted that way stays within the budget."""
    steps, budget = 7, 6.0
    errors = [{}] + [{0: {("wars", 0.0625, age): 1.0 for age in range(1, min(step, 4) + 1)}} for step in range(1, steps)]
    alone = search.allocate(errors, [SLOT], budget, ages=4).cells
    runs = search.allocate(errors, [SLOT], budget, ages=4, correlation=0.5).cells
    assert sum(cell.technique == "full" for row in runs for cell in row) > \
        sum(cell.technique == "full" for row in alone for cell in row)
    assert sum(cell.error for row in runs for cell in row) <= budget


# --- on a controlled model --------------------------------------------------------------------

ARCH = "sd3"
GRID = (16, 16)  # a 32 x 32 latent: windows on 256 image tokens cost less than full attention here
NARROW = WindowSize("band", FRACTIONS[0])


def _inputs() -> tuple:
    return conditioning(ARCH, 7, seed=1), conditioning(ARCH, 7, seed=2), empty_latent(ARCH, 32, 32, batch=2)


def _narrow_image_layer(model):
    """Layer 1 (image-only, 16 x 16 tokens) made exactly the narrowest band searched."""

    def override(func, *args, **kwargs):
        call = patching.AttentionCall(func, args, kwargs, None)
        if call.q_len != GRID[0] * GRID[1]:
            return func(*args, **kwargs)
        q, k, v = call.heads_first()
        layout = kernels.TokenLayout(0, GRID)
        return call.format_output(kernels.reference_attention(q, k, v, layout, NARROW.window_for(layout)))

    clone = model.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = override
    return clone


@pytest.fixture
def user_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def narrow():
    """(model, budget plan at a tiny delta, the calibration run's latent)."""
    model = _narrow_image_layer(build_model(ARCH))
    positive, negative, latent = _inputs()
    settings = plans.Settings(1e-3, ("wars",), WindowSize("band", 0.125), "budget")
    plan, samples, _ = plans.calibrate(model, positive, negative, latent, seed=3, steps=STEPS, cfg=3.0,
                                       sampler="euler", scheduler="simple", settings=settings)
    return model, plan, samples


def test_a_layer_made_local_gets_the_narrowest_exact_window_on_one_residual(narrow):
    _, plan, _ = narrow
    assert [row[1] for row in plan.methods] == ["full"] + ["wars"] * (STEPS - 1)  # residual ages 1, 2, 3
    assert all(row[0] == row[2] == "full" for row in plan.methods)  # real layers err far more than 1e-3
    assert [plan.window_of(step, 1).fraction for step in range(1, STEPS)] == [FRACTIONS[0]] * (STEPS - 1)


def test_a_budget_plan_with_its_own_windows_round_trips_and_reproduces_its_run(narrow):
    model, plan, samples = narrow
    data = json.loads(plan.to_json())
    assert data["version"] == 3 and data["windows"][1] == [None, FRACTIONS[0], None]
    loaded = plans.Plan.from_json(plan.to_json())
    assert loaded.to_json() == plan.to_json()
    applied = patching.install(model, plans.PlannedAttention(loaded))
    assert torch.equal(sample(applied, *_inputs(), steps=STEPS, seed=3), samples)
    report = patching.patch_of(applied).last_report
    assert not report.stood_aside  # every window step found the residual of its own window
    assert plan.flops_kept == pytest.approx(report.computed_flops / report.full_flops, rel=1e-9)


def _edited(plan, edit) -> str:
    data = json.loads(plan.to_json())
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda data: data["windows"][1].__setitem__(0, 0.25), "only window cells"),
    (lambda data: data["windows"][1].__setitem__(1, 1.5), r"a number in \(0, 1\]"),
    (lambda data: data["windows"].pop(), "one entry per layer"),
])
def test_every_invalid_window_cell_is_a_clear_error(narrow, edit, message):
    _, plan, _ = narrow
    with pytest.raises(plans.PlanError, match=message):
        plans.Plan.from_json(_edited(plan, edit))


def test_a_newer_schema_is_refused_and_the_older_ones_load(narrow):
    _, plan, _ = narrow
    with pytest.raises(plans.PlanError, match="newer than this FastAttn reads"):
        plans.Plan.from_json(_edited(plan, lambda data: data.__setitem__("version", schema.VERSION + 1)))
    version_2 = _edited(plan, lambda data: (data.pop("windows"), data.__setitem__("version", 2)))
    assert plans.Plan.from_json(version_2).window_of(1, 1) == plan.window  # no windows: the plan's own


def test_the_time_probe_measures_once_per_device_and_shape(monkeypatch, user_directory):
    runs = []
    monkeypatch.setattr(costs, "_seconds", {})
    monkeypatch.setattr(costs, "_clock", functools.partial(next, itertools.count(0.0, 0.01)))  # steady runs
    first = costs.probe_seconds(("probe", 1), lambda: runs.append(1), torch.device("cpu"))
    again = costs.probe_seconds(("probe", 1), lambda: runs.append(1), torch.device("cpu"))
    assert first == again >= 0 and len(runs) == 1 + costs.PROBE_RUNS
    costs.probe_seconds(("probe", 2), lambda: runs.append(2), torch.device("cpu"))
    assert len(runs) == 2 * (1 + costs.PROBE_RUNS)


# 32 x 32 image tokens: here the narrow band cost 0.25 - 0.45 of full attention on either CPU backend (at
# 16 x 16, where fixed costs weigh more, the torch tiles' band cost 0.65 - 0.9 of it: load could flip that)
PROBE_LATENT = 64
PROBE_REPEATS = 5  # whole probes, compared by their medians: one probe on a loaded machine can rank either way
PRICED = ("full", "wars", "wars+asc", "ast")


def test_measured_prices_rank_a_narrow_window_below_full_attention(monkeypatch, user_directory):
    """On 32 x 32 tokens the probe times what the runtime runs; a band of 1/16 of the image beats full
    attention by far, and CFG sharing's half batch costs less than the whole one. Each repeat probes
    anew (session memo and file cleared); load on a shared machine moves single probes, not medians.
    One thread: with other processes on the cores, threads waiting on each other swamp the kernels."""
    model = build_model(ARCH)
    repeats: list[dict[str, float]] = []

    def spy(call, site, run):
        if site.kind == "image" and not repeats:
            for _ in range(PROBE_REPEATS):
                monkeypatch.setattr(costs, "_seconds", {})
                timings.timings_path().unlink(missing_ok=True)
                slot = costs.layer_slot(call, site, True, (NARROW,), "time")
                repeats.append({name: slot.price(name, NARROW.fraction) for name in PRICED})
        return call.run_default(), call.flops(), "full"

    positive, negative, _ = _inputs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample(patching.install(model, spy), positive, negative,
               empty_latent(ARCH, PROBE_LATENT, PROBE_LATENT, batch=2), steps=1, seed=3)
    finally:
        torch.set_num_threads(threads)
    price = {name: statistics.median(prices[name] for prices in repeats) for name in repeats[0]}
    assert len(repeats) == PROBE_REPEATS
    assert price["wars"] < price["full"] and price["ast"] == 0
    assert price["wars+asc"] < price["wars"]
    assert len(costs._seconds) == 4  # full and window, whole batch and half


@pytest.mark.parametrize("window_share, chosen", [(0.3, "wars"), (3.0, "full")])
def test_the_calibrate_node_runs_a_budget_search_priced_by_measured_time(narrow, user_directory, monkeypatch,
                                                                         window_share, chosen):
    """The node prices candidates with the time probe (here a fake clock: a window costs `window_share`
    of full attention, a half batch half the whole): its plan follows those prices both ways, every
    window exact on the narrow layer. Real probe times are ranked by the test above."""
    model, _, _ = narrow
    probed: list[tuple] = []

    def fake_probe(key: tuple, run, device) -> float:
        probed.append(key)
        batch = key[1] if key[0] == "full" else key[2]
        return 1e-3 * batch * (1.0 if key[0] == "full" else window_share)

    monkeypatch.setattr(costs, "probe_seconds", fake_probe)
    nodes = pack_import("nodes.plans")
    args = dict(seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="simple", delta=1e-3,
                search_mode="budget", step_sharing=False, window_residual=True, cfg_sharing=False,
                window_shape=next(iter(nodes.WINDOW_SHAPES)), window_fraction=0.125, plan_name="timed",
                overwrite=False, per_head=False, cost="time")
    output = nodes.Calibrate.execute(model, *_inputs(), **args)
    patched, plan, text, out, _, table = output.result
    assert plans.load_plan("timed").to_json() == text == plan.to_json() and plan.calibration.mode == "budget"
    assert output.ui.as_dict() == {"text": (f"{plan.check_summary()}\n\n{table}",)}  # the check, over the prices
    assert (plan.check_error > 0) == (chosen == "wars")  # a plan of full attention alone samples the same latent
    assert [row[1] for row in plan.methods] == ["full"] + [chosen] * (STEPS - 1)
    assert torch.equal(sample(patched, *_inputs(), steps=STEPS, seed=3), out["samples"])
    assert len(set(probed)) == 2 * (2 + 4 * 2)  # 2 shapes (layers 0 and 2 share one): full, 4 windows, x 2 batches
    assert "ms of attention time measured on this device" in table and "| 0, 2 " in table


def test_settings_refuse_an_unknown_cost_and_per_head_budget_search():
    with pytest.raises(ValueError, match="cost must be one of time, flops"):
        plans.Settings(0.1, mode="budget", cost="seconds")
    with pytest.raises(ValueError, match="budget search chooses for whole layers"):
        plans.Settings(0.1, mode="budget", per_head=True)
    assert [size.fraction for size in plans.Settings(0.1, window=WindowSize("band", 0.6), mode="budget").windows] == [
        0.15, 0.3, 0.6, 1.0]  # a quarter, half, once and twice, at most the whole image

