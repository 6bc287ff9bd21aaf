"""Step reuse: a plan's skipped steps against a reference written here (a model function wrapper that
reuses or extrapolates the guided model's noise estimates by hand), the host paths where nothing is
there to reuse, the budget search that chooses them, and the plan file that carries them."""

from __future__ import annotations

import json

import nodes as host_nodes
import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample

plans = pack_import("plans")
patching = pack_import("patching")
step_reuse = pack_import("patching.step_reuse")
WindowSize = pack_import("patching.schedule").WindowSize

ARCH = "sd3"
STEPS = 6
WINDOW = WindowSize("band", 0.125)


def _inputs() -> tuple:
    return conditioning(ARCH, 7, seed=1), conditioning(ARCH, 7, seed=2), empty_latent(ARCH, 16, 16, batch=2)


@pytest.fixture(scope="module")
def model():
    return build_model(ARCH)


@pytest.fixture(scope="module")
def full_plan(model):
    """A budget plan at delta 0: every cell full, the model's fingerprint, no step reused."""
    settings = plans.Settings(0.0, plans.CANDIDATES, WINDOW, "budget", step_reuse=True)
    plan, _, _ = plans.calibrate(model, *_inputs(), seed=3, steps=STEPS, cfg=3.0, sampler="euler", scheduler="simple",
                              settings=settings)
    assert not plan.reuses_steps and {name for row in plan.methods for name in row} == {"full"}
    return plan


def _with_reuse(plan, skipped: dict[int, str]):
    data = json.loads(plan.to_json())
    data["step_reuse"] = [skipped.get(step) for step in range(STEPS)]
    data["version"] = 4
    return plans.Plan.from_json(json.dumps(data))


def _reference(model, skipped: dict[int, str]) -> torch.Tensor:
    """The unpatched model, sampled with a model function wrapper that answers the skipped steps from
    the noise estimates (x - denoised) / sigma it kept of the computed ones: the last (reuse), or the
    line through the last two, in sigma (forecast)."""
    seen: list[float] = []
    kept: list[tuple[float, torch.Tensor]] = []

    def wrapper(apply_model, args):
        x, t = args["input"], args["timestep"]
        sigma = float(t.flatten()[0])
        if sigma not in seen:
            seen.append(sigma)
        how = skipped.get(seen.index(sigma))
        column = t.view(-1, 1, 1, 1)
        if how is not None:
            at_last, last = kept[-1]
            estimate = last
            if how == "forecast":
                at_before, before = kept[-2]
                estimate = last + (last - before) / (at_last - at_before) * (sigma - at_last)
            return x - column * estimate
        out = apply_model(x, t, **args["c"])
        kept.append((sigma, (x - out) / column))
        return out

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return sample(clone, *_inputs(), steps=STEPS, seed=3)


def test_a_forecast_is_exact_on_a_line():
    slope, offset = torch.randn(4), torch.randn(4)
    line = lambda sigma: offset + slope * sigma  # noqa: E731
    assert torch.allclose(step_reuse.forecast(line(0.8), line(0.9), (0.8, 0.9), 0.55), line(0.55), atol=1e-6)


@pytest.mark.parametrize("skipped", [{2: "reuse"}, {2: "reuse", 3: "reuse"}, {3: "forecast"}, {2: "reuse", 4: "forecast"}])
def test_skipped_steps_match_the_hand_written_reference(model, full_plan, skipped):
    applied = patching.install(model, plans.PlannedAttention(_with_reuse(full_plan, skipped)))
    out = sample(applied, *_inputs(), steps=STEPS, seed=3)
    expected = _reference(model, skipped)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), (out - expected).abs().max()
    assert not torch.allclose(out, sample(model, *_inputs(), steps=STEPS, seed=3), rtol=1e-3, atol=1e-3)  # it acted
    report = patching.patch_of(applied).last_report
    assert report.forwards_reused == len(skipped) and report.forwards == STEPS - len(skipped)
    reused_flops = sum(report.flops_by_technique[name][1] for name in report.flops_by_technique if "step reuse" in name)
    assert reused_flops == len(skipped) * report.full_flops // STEPS  # each skipped forward's attention, none computed


def test_a_split_sampler_computes_a_step_it_has_nothing_to_reuse_for(model, full_plan):
    """KSamplerAdvanced split at step 3, the plan reusing step 3: the second sampler is a run of its own
    with no prediction kept, so it computes that step; the result is the unpatched split run's."""
    applied = patching.install(model, plans.PlannedAttention(_with_reuse(full_plan, {3: "reuse"})))
    positive, negative, latent = _inputs()

    def split(first, second) -> torch.Tensor:
        half = host_nodes.KSamplerAdvanced().sample(first, "enable", 3, STEPS, 3.0, "euler", "simple", positive,
                                                    negative, latent, 0, 3, "enable")[0]
        return host_nodes.KSamplerAdvanced().sample(second, "disable", 3, STEPS, 3.0, "euler", "simple", positive,
                                                    negative, half, 3, STEPS, "disable")[0]["samples"]

    assert torch.equal(split(applied, applied), split(model, model))
    assert patching.patch_of(applied).last_report.forwards_reused == 0


def test_a_forecast_with_one_prediction_kept_computes_the_step(model, full_plan):
    """A forecast at step 1 has only step 0 to read: the step is computed, so the run is the unpatched one."""
    applied = patching.install(model, plans.PlannedAttention(_with_reuse(full_plan, {1: "forecast"})))
    assert torch.equal(sample(applied, *_inputs(), steps=STEPS, seed=3), sample(model, *_inputs(), steps=STEPS, seed=3))


@pytest.fixture(scope="module")
def reusing(model):
    """(plan, calibration latent): a budget plan with step reuse at a delta that skips steps."""
    settings = plans.Settings(1.0, plans.CANDIDATES, WINDOW, "budget", step_reuse=True)
    plan, samples, _ = plans.calibrate(model, *_inputs(), seed=3, steps=STEPS, cfg=3.0, sampler="euler",
                                       scheduler="simple", settings=settings)
    return plan, samples


def test_the_budget_search_skips_steps_and_the_plan_reproduces_its_calibration_run(model, reusing):
    plan, samples = reusing
    skipped = [step for step, how in enumerate(plan.step_reuse) if how is not None]
    assert skipped and 0 not in skipped
    assert all(plan.methods[step][layer] == "ast" for step in skipped for layer in range(3))  # all three are joint/image
    loaded = plans.Plan.from_json(plan.to_json())
    assert json.loads(plan.to_json())["version"] == 4 and loaded.to_json() == plan.to_json()
    applied = patching.install(model, plans.PlannedAttention(loaded))
    assert torch.equal(sample(applied, *_inputs(), steps=STEPS, seed=3), samples)
    report = patching.patch_of(applied).last_report
    assert report.forwards_reused == len(skipped)
    assert plan.flops_kept == pytest.approx(report.computed_flops / report.full_flops, rel=1e-9)


def test_without_step_reuse_no_step_is_skipped(model):
    settings = plans.Settings(1.0, plans.CANDIDATES, WINDOW, "budget")
    plan, _, _ = plans.calibrate(model, *_inputs(), seed=3, steps=STEPS, cfg=3.0, sampler="euler", scheduler="simple",
                              settings=settings)
    assert not plan.reuses_steps and json.loads(plan.to_json())["version"] < 4


@pytest.mark.parametrize(("steps", "message"), [
    (["reuse"] + [None] * (STEPS - 1), "step 0 cannot reuse"),
    ([None, "again"] + [None] * (STEPS - 2), "null or one of reuse, forecast"),
    ([None, "reuse"], "for every step"),
])
def test_an_invalid_step_reuse_is_a_clear_error(full_plan, steps, message):
    data = json.loads(full_plan.to_json())
    data["step_reuse"], data["version"] = steps, 4
    with pytest.raises(plans.PlanError, match=message):
        plans.Plan.from_json(json.dumps(data))


def test_step_reuse_needs_the_budget_search():
    with pytest.raises(ValueError, match="step reuse is planned by the budget search only"):
        plans.Settings(0.1, mode="fast", step_reuse=True)


def test_the_heatmap_marks_each_skipped_step_above_its_column(full_plan):
    heatmap = pack_import("plans.heatmap")
    plan = _with_reuse(full_plan, {2: "reuse", 4: "forecast"})
    marked, plain = heatmap.render_heatmap(plan), heatmap.render_heatmap(full_plan)
    strip = set(heatmap.STEP_REUSE_COLOURS.values())
    colours = [{colour for _, colour in image.getcolors(1 << 20)} for image in (marked, plain)]
    assert strip <= colours[0] and not strip & colours[1]
    assert marked.height > plain.height  # the strip and its legend lines


def test_a_second_order_sampler_reuses_each_evaluation_from_its_own_kind(model, full_plan):
    """Heun evaluates twice per step (the last step once): a skipped step answers both evaluations,
    each from the predictions its own kind of evaluation kept (cache.chunk_ids' evaluation count)."""
    applied = patching.install(model, plans.PlannedAttention(_with_reuse(full_plan, {3: "reuse"})))
    positive, negative, latent = _inputs()

    def heun(patched) -> torch.Tensor:
        return host_nodes.KSampler().sample(patched, 3, STEPS, 3.0, "heun", "simple", positive, negative,
                                            latent)[0]["samples"]

    out, plain = heun(applied), heun(model)
    report = patching.patch_of(applied).last_report
    assert report.forwards_reused == 2 and report.forwards == 2 * STEPS - 1 - 2
    assert 0 < (out - plain).norm() < 0.2 * plain.norm()  # it acted, and stayed near the unpatched run


def test_the_calibrate_node_plans_step_reuse_and_its_model_carries_it_out(model):
    nodes = pack_import("nodes.plans")
    args = dict(seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="simple", delta=1.0,
                search_mode="budget", step_sharing=True, window_residual=True, cfg_sharing=True,
                window_shape=next(iter(nodes.WINDOW_SHAPES)), window_fraction=0.125, plan_name="", overwrite=False,
                per_head=False, cost="flops", step_reuse=True)
    patched, plan, text, out, heatmap, _ = nodes.Calibrate.execute(model, *_inputs(), **args).result
    assert plan.reuses_steps and json.loads(text)["step_reuse"] == plan.step_reuse and heatmap.ndim == 4
    assert torch.equal(sample(patched, *_inputs(), steps=STEPS, seed=3), out["samples"])
    assert patching.patch_of(patched).last_report.forwards_reused == sum(how is not None for how in plan.step_reuse)
    with pytest.raises(ValueError, match="budget search only"):
        nodes.Calibrate.execute(model, *_inputs(), **{**args, "search_mode": "fast"})
