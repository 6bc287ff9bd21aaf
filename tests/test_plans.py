"""Plans: calibration on real tiny models (controlled ones where the answer is known), the
plan file and its validation, storage, and applying a plan."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import unittest.mock
from pathlib import Path

import comfy.model_management
import comfy.samplers
import folder_paths
import nodes as host_nodes
import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample

plans = pack_import("plans")
patching = pack_import("patching")
kernels = pack_import("kernels")
schema = pack_import("plans.schema")
calibrate = pack_import("plans.calibrate")
Timeline = pack_import("patching.timeline").Timeline
nodes = pack_import("nodes.plans")
technique_nodes = pack_import("nodes.ditfastattn")
clear_nodes = pack_import("nodes.clear")

STEPS = 4
DELTA = {"greedy": 0.1, "fast": 0.3, "budget": 0.5}  # accepts some techniques on the random tiny model, refuses others
ARCH = "sd3"  # 3 attention layers per forward: joint, image (layer 1, 8 x 8 tokens), joint
WINDOW = pack_import("patching.schedule").WindowSize("band", 0.125)  # 8 tokens per side on the 64 image tokens


def _inputs(arch: str = ARCH) -> tuple:
    return conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), empty_latent(arch, 16, 16, batch=2)


def _calibrate(model, mode: str, delta: float, candidates=plans.CANDIDATES, arch: str = ARCH):
    positive, negative, latent = _inputs(arch)
    settings = plans.Settings(delta, tuple(candidates), WINDOW, mode)
    plan, samples, _ = plans.calibrate(model, positive, negative, latent, seed=3, steps=STEPS, cfg=3.0,
                                       sampler="euler", scheduler="simple", settings=settings)
    return plan, samples


def _timeline(model, steps: int):
    """The run timeline of KSampler's euler / simple schedule at `steps` steps on `model`."""
    return Timeline.ksampler(model.get_model_object("model_sampling"), "simple", steps)


def _apply(model, plan, steps: int = STEPS, arch: str = ARCH) -> torch.Tensor:
    positive, negative, latent = _inputs(arch)
    return sample(patching.install(model, plans.PlannedAttention(plan)), positive, negative, latent, steps=steps,
                  seed=3)


@pytest.fixture(scope="module")
def model():
    return build_model(ARCH)


@pytest.fixture(scope="module", params=plans.MODES)
def calibrated(request, model):
    """(mode, plan, final latent) at a delta that accepts some techniques and refuses others."""
    plan, latent = _calibrate(model, request.param, DELTA[request.param])
    return request.param, plan, latent


@pytest.fixture
def user_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    return tmp_path


def with_image_layer(model, attention):
    """A clone whose image-only attention layer (layer 1, the only call over the 64 image tokens
    alone) is computed by `attention(call)`: a controlled model, where its right plan is known."""

    def override(func, *args, **kwargs):
        call = patching.AttentionCall(func, args, kwargs, None)
        return attention(call) if call.q_len == 64 else func(*args, **kwargs)

    clone = model.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = override
    return clone


def local_attention(call) -> torch.Tensor:
    """Layer 1 (image-only, 8 x 8 tokens) made truly local: exactly the candidate window."""
    q, k, v = call.heads_first()
    layout = kernels.TokenLayout(0, (8, 8))
    return call.format_output(kernels.reference_attention(q, k, v, layout, WINDOW.window_for(layout)))


def constant_attention(call) -> torch.Tensor:
    """An attention output that never changes across steps."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(call.output_shape, generator=generator)


def drifting_attention(model, drift: float):
    """An attention output that grows by `drift` x its first value each step: reusing the last
    step's output errs about `drift`, reusing an output two steps old about twice that."""
    model_sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "simple", STEPS)

    def attention(call) -> torch.Tensor:
        step = int((sigmas[:-1] - call.kwargs["transformer_options"]["sigmas"].flatten()[0]).abs().argmin())
        return constant_attention(call) * (1 + drift * step)

    return attention


# --- calibration ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["greedy", "fast"])  # budget: tests/test_search.py (these windows cost no less)
def test_a_layer_made_local_gets_the_window(model, mode):
    plan, _ = _calibrate(with_image_layer(model, local_attention), mode, 1e-3, candidates=("wars",))
    assert [row[1] for row in plan.methods] == ["full"] + ["wars"] * (STEPS - 1)
    assert all(row[0] == row[2] == "full" for row in plan.methods)  # real layers err far more than 1e-3


@pytest.mark.parametrize("mode", plans.MODES)
def test_a_layer_constant_across_steps_gets_step_sharing(model, mode):
    plan, _ = _calibrate(with_image_layer(model, constant_attention), mode, 1e-3)
    assert [row[1] for row in plan.methods] == ["full"] + ["ast"] * (STEPS - 1)
    assert all(row[0] == row[2] == "full" for row in plan.methods)


def test_fast_mode_scores_step_sharing_against_the_output_it_would_reuse(model):
    """The layer drifts 0.1 a step: sharing one step errs <= 0.1, but a second step in a row
    would reuse the same, older output (error ~0.2): so shared steps alternate with computed
    ones, at a local threshold of 0.13 that one step of drift passes. (Greedy measures this by
    running the trial, on the model's output, where one layer's error weighs less.)"""
    plan, _ = _calibrate(with_image_layer(model, drifting_attention(model, 0.1)), "fast", 0.13, candidates=("ast",))
    assert [row[1] for row in plan.methods] == ["full", "ast", "full", "ast"]


@pytest.mark.parametrize("mode", plans.MODES)
def test_delta_zero_keeps_full_attention_and_the_unpatched_result(model, mode):
    plan, latent = _calibrate(model, mode, 0.0)
    assert plan.counts()["full"] == STEPS * 3
    positive, negative, inputs = _inputs()
    reference = sample(model, positive, negative, inputs, steps=STEPS, seed=3)
    assert torch.equal(latent, reference)


def test_some_techniques_are_accepted_and_some_refused(calibrated):
    _, plan, _ = calibrated
    counts = plan.counts()
    assert counts["full"] > 3 and sum(counts.values()) - counts["full"] > 0  # step 0 plus refusals


def test_every_accepted_choice_is_within_its_budget(calibrated):
    mode, plan, _ = calibrated
    layers = len(plan.fingerprint.layers)
    checked = 0
    if mode == "budget":  # summed over every cell compressible after step 0: within delta squared per cell
        squared = [loss ** 2 for row in plan.losses for loss in row if loss is not None]
        assert squared and sum(squared) <= plan.calibration.delta ** 2 * (STEPS - 1) * 3
        return
    for step, (row, losses) in enumerate(zip(plan.methods, plan.losses, strict=True)):
        assert plan.step_losses[step] <= plan.calibration.delta
        for layer, (name, loss) in enumerate(zip(row, losses, strict=True)):
            if name != "full":
                budget = (layer + 1) / layers * plan.calibration.delta if mode == "greedy" else plan.calibration.delta
                assert loss is not None and 0 <= loss <= budget
                checked += 1
    assert checked > 0


def test_the_same_inputs_give_the_same_plan(model, calibrated):
    mode, plan, latent = calibrated
    again, latent_again = _calibrate(model, mode, DELTA[mode])
    assert again.methods == plan.methods and again.to_json() == plan.to_json()
    assert torch.equal(latent_again, latent)


def test_applying_the_saved_plan_reproduces_the_calibration_run(model, calibrated, user_directory):
    _, plan, latent = calibrated
    plans.save_plan(plan, "mine", overwrite=False)
    loaded = plans.load_plan("mine")
    assert torch.equal(_apply(model, loaded), latent)


def test_flops_kept_is_what_the_applied_run_computes(model, calibrated):
    _, plan, _ = calibrated
    applied = patching.install(model, plans.PlannedAttention(plan))
    positive, negative, latent = _inputs()
    sample(applied, positive, negative, latent, steps=STEPS, seed=3)
    report = patching.patch_of(applied).last_report
    assert plan.flops_kept == pytest.approx(report.computed_flops / report.full_flops, rel=1e-9)


def test_a_full_step_caches_a_residual_only_for_the_window_steps_that_read_it(model, calibrated):
    """Step sharing reads no residual and a full step refreshes it; a full step that shares CFG
    refreshes only the conditional rows', so the one before must be kept for the others."""
    _, plan, _ = calibrated
    row = ["full", "full", "ast", "wars", "full", "full+asc", "wars", "full"]
    layers = len(plan.fingerprint.layers)
    plan = dataclasses.replace(plan, methods=[[name] * layers for name in row], losses=[], step_losses=[], heads=[])
    full_steps = [step for step, name in enumerate(row) if name.startswith("full")]
    caches = [plan.residual_window(step, _timeline(model, len(row)), 1) is not None for step in full_steps]
    assert dict(zip(full_steps, caches, strict=True)) == {0: False, 1: True, 4: True, 5: True, 7: False}


def test_another_step_count_maps_by_noise_level(model, calibrated):
    _, plan, _ = calibrated
    assert plan.step_map(_timeline(model, STEPS)) == (tuple(range(STEPS)), True)
    assert plan.step_map(_timeline(model, 2 * STEPS)) == ((0, 0, 1, 1, 2, 2, 3, 3), False)
    assert plan.choose(5, _timeline(model, 2 * STEPS), 1) == schema.choice_of(plan.methods[2][1], plan.window)


def test_a_plan_runs_at_another_step_count(model, calibrated):
    """At 8 steps a 4-step plan gives what the 8-step plan repeating each of its steps twice gives,
    and its techniques act (the output moves away from the unpatched model's)."""
    _, plan, _ = calibrated
    positive, negative, latent = _inputs()
    applied = patching.install(model, plans.PlannedAttention(plan))
    out = sample(applied, positive, negative, latent, steps=2 * STEPS, seed=3)
    stretched = dataclasses.replace(plan, methods=[row for row in plan.methods for _ in range(2)],
                                    calibration=dataclasses.replace(plan.calibration, steps=2 * STEPS))
    assert torch.equal(out, _apply(model, stretched, steps=2 * STEPS))
    plain = sample(model, positive, negative, latent, steps=2 * STEPS, seed=3)
    assert (out - plain).abs().max() > 1e-4 * plain.abs().max()
    assert set(patching.patch_of(applied).last_report.flops_by_technique) - {"full"}


def test_a_split_run_and_denoise_use_the_plan_steps_of_their_noise_levels(model, calibrated):
    _, plan, _ = calibrated
    whole = _timeline(model, STEPS)
    assert plan.step_map(Timeline.of(whole.sigmas[2:], whole.model_sampling)) == ((2, 3), True)  # a split's 2nd half
    denoised = comfy.samplers.calculate_sigmas(whole.model_sampling, "simple", int(STEPS / 0.6))[-STEPS - 1:]
    assert plan.step_map(Timeline.of(denoised, whole.model_sampling)) == ((1, 2, 3, 3), False)  # denoise 0.6

    applied = patching.install(model, plans.PlannedAttention(plan))
    positive, negative, latent = _inputs()
    sampler = host_nodes.KSamplerAdvanced()
    first = sampler.sample(applied, "enable", 3, STEPS, 3.0, "euler", "simple", positive, negative, latent, 0, 2,
                           "enable")[0]
    assert not patching.patch_of(applied).last_report.warnings
    sampler.sample(applied, "disable", 3, STEPS, 3.0, "euler", "simple", positive, negative, first, 2, STEPS, "disable")
    report = patching.patch_of(applied).last_report
    assert report.total_steps == 2 and not report.warnings  # plan steps 2 and 3: the run's own
    host_nodes.KSampler().sample(applied, 3, STEPS, 3.0, "euler", "simple", positive, negative, latent, denoise=0.6)
    assert "at other noise levels" in patching.patch_of(applied).last_report.warnings[0]


def test_a_plan_calibrated_at_denoise_0_6_keeps_its_own_noise_levels(model):
    """KSampler's schedule of 4 steps is not a denoise run's: the plan records the run's noise levels, so
    the same run maps onto its own plan steps (no warning) and reproduces the calibration run; a whole run
    at 4 steps maps onto the nearest of them."""
    positive, negative, latent = _inputs()
    plan, samples, _ = plans.calibrate(model, positive, negative, latent, seed=3, steps=STEPS, cfg=3.0, sampler="euler",
                                    scheduler="simple", settings=plans.Settings(0.3, plans.CANDIDATES, WINDOW, "budget",
                                                                                cost="flops"), denoise=0.6)
    loaded = plans.Plan.from_json(plan.to_json())
    assert len(loaded.calibration.sigmas) == STEPS + 1 and json.loads(plan.to_json())["version"] == 4
    applied = patching.install(model, plans.PlannedAttention(loaded))
    (out,) = host_nodes.KSampler().sample(applied, 3, STEPS, 3.0, "euler", "simple", positive, negative, latent,
                                          denoise=0.6)
    assert torch.equal(out["samples"], samples) and not patching.patch_of(applied).last_report.warnings
    mapped, same = loaded.step_map(_timeline(model, STEPS))  # a whole run starts noisier than any plan step
    assert not same and mapped[:2] == (0, 0) and list(mapped) == sorted(mapped)
    whole, _ = _calibrate(model, "budget", 0.3)
    assert "sigmas" not in json.loads(whole.to_json())["calibration"]  # a whole run's are KSampler's: not written


def test_a_20_step_plan_at_30_steps_and_denoise_0_6_uses_the_nearest_noise_levels(model, calibrated):
    _, plan, _ = calibrated
    rotation = ("full", "ast", "wars", "wars+asc", "full+asc")  # layer 1's technique tells its plan step apart
    methods = [["full"] * 3] + [["full", rotation[step % 5], "full"] for step in range(1, 20)]
    twenty = plans.Plan(plan.fingerprint, dataclasses.replace(plan.calibration, steps=20), plan.window, methods)
    levels = [math.log(sigma) for sigma in _timeline(model, 20).sigmas[:20]]
    model_sampling = model.get_model_object("model_sampling")
    thirty = _timeline(model, 30)
    denoised = Timeline.of(comfy.samplers.calculate_sigmas(model_sampling, "simple", int(20 / 0.6))[-21:], model_sampling)
    for run, first, last in ((thirty, 0, 19), (denoised, 8, 19)):
        nearest = tuple(min(range(20), key=lambda i: abs(levels[i] - math.log(sigma))) for sigma in run.sigmas[:-1])
        assert twenty.step_map(run) == (nearest, False) and (nearest[0], nearest[-1]) == (first, last)
        assert [twenty.choose(step, run, 1) for step in range(run.steps)] == [
            schema.choice_of(methods[plan_step][1], plan.window) for plan_step in nearest]
    assert twenty.step_map(thirty)[0] != tuple(_timeline(model, 20).step_of(s) for s in thirty.sigmas[:-1])


def test_interrupt_stops_calibration_cleanly(model, monkeypatch):
    import comfy.model_management

    calls = {"count": 0}

    def interrupt_on_third():
        calls["count"] += 1
        if calls["count"] == 3:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt_on_third)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _calibrate(model, "greedy", 0.1)
    assert "fastattn_run" not in model.model_options["transformer_options"]


# --- the plan file ----------------------------------------------------------------------------


def test_a_plan_round_trips_through_its_file(calibrated, user_directory):
    _, plan, _ = calibrated
    path = plans.save_plan(plan, "round trip", overwrite=False)
    assert path == user_directory / "default" / "fastattn_plans" / "round trip.json"
    loaded = plans.load_plan("round trip")
    assert loaded.to_json() == plan.to_json()
    assert (loaded.fingerprint, loaded.calibration, loaded.window) == (plan.fingerprint, plan.calibration, plan.window)
    assert plans.list_plans() == ["round trip"]


def test_saving_never_overwrites_without_the_switch(calibrated, user_directory):
    _, plan, _ = calibrated
    path = plans.save_plan(plan, "kept", overwrite=False)
    path.write_text(path.read_text().replace('"flops_kept"', '"flops_kept" '))
    before = path.read_text()
    with pytest.raises(plans.PlanError, match="already exists.*overwrite"):
        plans.save_plan(plan, "kept", overwrite=False)
    assert path.read_text() == before
    plans.save_plan(plan, "kept", overwrite=True)
    assert path.read_text() == plan.to_json()


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 200])
def test_plan_names_stay_in_the_plans_folder(name, user_directory):
    with pytest.raises(plans.PlanError, match="not a usable plan name"):
        plans.load_plan(name)


def test_a_missing_saved_plan_is_a_clear_error(user_directory):
    with pytest.raises(plans.PlanError, match="no saved plan named 'absent'"):
        plans.load_plan("absent")


def _edited(plan, edit) -> str:
    data = json.loads(plan.to_json())
    edit(data)
    return json.dumps(data)


def _set(path: tuple, value):
    def edit(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return edit


INVALID = {
    "corrupt JSON": (lambda plan: plan.to_json()[:-20], "not valid JSON"),
    "not a plan": (lambda plan: json.dumps({"hello": 1}), "not a FastAttn plan"),
    "newer version": (lambda plan: _edited(plan, _set(("version",), 99)), "newer than this FastAttn reads"),
    "no version": (lambda plan: _edited(plan, _set(("version",), "1")), "integer \"version\""),
    "missing section": (lambda plan: _edited(plan, lambda d: d.pop("window")), "no 'window' section"),
    "incomplete layers": (lambda plan: _edited(plan, _set(("model", "layers", 0), {"kind": "joint"})),
                          "incomplete or wrong"),
    "bad window": (lambda plan: _edited(plan, _set(("window", "shape"), "hexagon")), "window"),
    "unknown technique": (lambda plan: _edited(plan, _set(("methods", 1, 0), "magic")), "unknown technique 'magic'"),
    "wrong layer count": (lambda plan: _edited(plan, _set(("methods", 1), ["full"])), "has 1 layers"),
    "compressed cross layer": (lambda plan: _edited(plan, _set(("model", "layers", 0, "kind"), "cross")),
                               "only joint / image"),
    "reuse at step 0": (lambda plan: _edited(plan, _set(("methods", 0, 0), "ast")), "step 0 must compute"),
    "no methods": (lambda plan: _edited(plan, _set(("methods",), [])), "non-empty list of steps"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_every_invalid_plan_is_a_clear_error(case, calibrated):
    _, plan, _ = calibrated
    if case == "compressed cross layer" and plan.methods[1][0] == "full":
        plan = plans.Plan(plan.fingerprint, plan.calibration, plan.window,
                          [plan.methods[0], ["ast", *plan.methods[1][1:]], *plan.methods[2:]])
    text, message = INVALID[case]
    with pytest.raises(plans.PlanError, match=message):
        plans.Plan.from_json(text(plan))


def test_a_plan_for_another_model_fails_when_sampling_starts(model, calibrated):
    _, plan, _ = calibrated
    layers = list(plan.fingerprint.layers)
    layers[1] = schema.LayerInfo("image", layers[1].heads * 2, layers[1].head_dim // 2)
    other = plans.Plan(schema.Fingerprint(plan.fingerprint.architecture, tuple(layers)), plan.calibration,
                       plan.window, plan.methods)
    with pytest.raises(plans.PlanError, match="attention layer 1 differs"):
        _apply(model, other)
    flux = build_model("flux")
    with pytest.raises(plans.PlanError, match="the plan is for a SD3"):
        _apply(flux, plan, arch="flux")
    with pytest.raises(plans.PlanError, match="the plan is for a SD3"):
        nodes.ApplyPlan.execute(flux, nodes.NO_PLAN, plan.to_json())


def test_a_budget_plan_is_checked_against_full_attention(calibrated, model):
    """Budget mode samples with full attention first: the plan's own run is checked against that run's latent,
    and the check travels in the plan's JSON (older readers ignore the key). The other modes have no full run."""
    mode, plan, samples = calibrated
    if mode != "budget":
        assert plan.check_error is None and plan.check_summary() is None
        assert "check_error" not in json.loads(plan.to_json())
        return
    positive, negative, latent = _inputs()
    full = sample(model, positive, negative, latent, steps=STEPS, cfg=3.0, seed=3)  # the unpatched model
    expected = ((samples.double() - full.double()).square().sum() / full.double().square().sum()).item()
    assert plan.check_error == pytest.approx(expected, rel=1e-6) and plan.check_error > 0
    assert f"full attention's: {-10 * math.log10(expected):.1f} dB signal to error" in plan.check_summary()
    assert plans.Plan.from_json(plan.to_json()).check_error == plan.check_error
    assert dataclasses.replace(plan, check_error=0.0).check_summary().endswith("is identical to full attention's")
    heatmap = pack_import("plans.heatmap")
    checked, unchecked = (heatmap.render_heatmap(shown) for shown in (plan, dataclasses.replace(plan, check_error=None)))
    assert checked.height == unchecked.height + heatmap.FONT_SIZE + 6  # one more line of title: the check
    font = heatmap.ImageFont.load_default(size=heatmap.FONT_SIZE)
    assert checked.width >= 2 * heatmap.MARGIN + font.getlength(plan.check_summary())  # wide enough to read it


@pytest.mark.parametrize("value", [-0.5, "small", [0.1]])
def test_a_check_that_is_not_an_error_is_refused(calibrated, value):
    _, plan, _ = calibrated
    data = json.loads(plan.to_json())
    data["check_error"] = value
    with pytest.raises(plans.PlanError, match="check_error must be a number >= 0"):
        plans.Plan.from_json(json.dumps(data))


def _measured(model, settings: plans.Settings, **kwargs) -> tuple:
    """The budget calibration's plan and its measured local errors ([step][layer] -> candidate -> error), as the
    measuring run scored them."""
    found = []
    search = calibrate.Calibration._search

    def spy(self):
        found.append([{layer: dict(options) for layer, options in step.items()} for step in self.local_errors])
        return search(self)  # (which scales block cells by rates the rated forwards measured)

    positive, negative, latent = _inputs()
    with unittest.mock.patch.object(calibrate.Calibration, "_search", spy):
        plan, _, _ = plans.calibrate(model, positive, negative, latent, seed=3, steps=STEPS, cfg=3.0, sampler="euler",
                                     scheduler="simple", settings=settings, **kwargs)
    return plan, found[0]


def test_a_budget_calibration_measures_both_cfg_halves_when_the_host_runs_them_apart(model, monkeypatch, caplog):
    """Short of free memory, the host runs the conditional and unconditional halves as two model calls. Each
    is scored joined with what the first computed: every step measures the candidates a batched run measures
    (CFG sharing aside: it needs both halves in one call), block caching's too, at the same errors."""
    settings = plans.Settings(1.0, plans.CANDIDATES, WINDOW, "budget", cost="flops", block_cache=True)  # compresses
    batched_plan, batched = _measured(model, settings)
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 1.0)  # one byte free
    with caplog.at_level(logging.WARNING):
        split_plan, split = _measured(model, settings)
    assert "separate model calls" not in caplog.text  # both measured: nothing to warn of
    for step in range(1, STEPS):
        assert split[step].keys() == batched[step].keys() and split[step]
        for layer, options in batched[step].items():
            assert split[step][layer].keys() == {key for key in options if not key[0].endswith("+asc")}
            assert split[step][layer] == pytest.approx({key: options[key] for key in split[step][layer]}, rel=1e-5)
    assert any(key[0] == "block" for step in split for options in step.values() for key in options)
    assert any(name != "full" for row in split_plan.methods for name in row)


def test_a_fast_calibration_whose_cfg_halves_ran_apart_says_so(model, monkeypatch, caplog):
    """Fast search decides a step on its first call: where the host ran the halves apart, that is half the batch;
    the user is told which steps, and what to do."""
    positive, negative, latent = _inputs()
    settings = plans.Settings(DELTA["fast"], plans.CANDIDATES, WINDOW, "fast")
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *args, **kwargs: 1.0)
    with caplog.at_level(logging.WARNING):
        plans.calibrate(model, positive, negative, latent, seed=3, steps=STEPS, cfg=3.0, sampler="euler",
                        scheduler="simple", settings=settings)
    assert f"as separate model calls at steps {list(range(STEPS))}" in caplog.text
    assert "decided those steps on the first call's half of the batch alone" in caplog.text
    assert "use search_mode budget, which measures both calls" in caplog.text


# --- nodes and picture ------------------------------------------------------------------------


def test_calibrate_node_outputs_and_refuses_to_overwrite_before_running(model, user_directory):
    positive, negative, latent = _inputs()
    args = dict(seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="simple", delta=0.1,
                search_mode="fast", step_sharing=True, window_residual=True, cfg_sharing=True,
                window_shape=next(iter(nodes.WINDOW_SHAPES)), window_fraction=0.125, plan_name="node plan",
                overwrite=False)
    output = nodes.Calibrate.execute(model, positive, negative, latent, **args)
    patched, plan, text, out, heatmap, table = output.result
    assert plans.Plan.from_json(text).to_json() == plan.to_json() == plans.load_plan("node plan").to_json()
    assert output.ui.as_dict() == {"text": (table,)} and "attention GFLOPs" in table  # fast mode prices by FLOPs
    assert out["samples"].shape == latent["samples"].shape and heatmap.ndim == 4 and heatmap.shape[-1] == 3
    assert patching.patch_of(model) is None and patching.patch_of(patched) is not None
    with pytest.raises(plans.PlanError, match="already exists"):
        nodes.Calibrate.execute(None, positive, negative, latent, **args)  # refused before touching the model
    (applied,) = nodes.ApplyPlan.execute(model, "node plan", "").result
    assert torch.equal(sample(applied, positive, negative, latent, steps=STEPS, seed=3), out["samples"])
    with pytest.raises(plans.PlanError, match="no plan given"):
        nodes.ApplyPlan.execute(model, nodes.NO_PLAN, "  ")


TECHNIQUE_NODES = {  # each technique node with inputs that act on every step and layer
    "window + residual": lambda model: technique_nodes.WindowResidualAttention.execute(
        model, next(iter(technique_nodes.WINDOW_SHAPES)), 0.125, 0, 2, True, 0.0, 1.0, ""),
    "step sharing": lambda model: technique_nodes.StepSharingAttention.execute(model, 2, 0.0, 1.0, ""),
    "CFG sharing": lambda model: technique_nodes.CFGSharingAttention.execute(model, 0.0, 1.0, ""),
    "CLEAR": lambda model: clear_nodes.ClearAttention.execute(model, 2, 0.25, "off", 0, 0.0, 1.0, ""),
}


@pytest.mark.parametrize("technique", list(TECHNIQUE_NODES))
def test_a_technique_node_after_a_plan_is_refused_saying_what_to_do(model, calibrated, technique):
    _, plan, _ = calibrated
    (applied,) = nodes.ApplyPlan.execute(model, nodes.NO_PLAN, "", plan).result
    with pytest.raises(plans.PlanError, match="carries a calibrated plan.*Use either the plan or technique nodes"):
        TECHNIQUE_NODES[technique](applied)


@pytest.mark.parametrize("technique", list(TECHNIQUE_NODES))
def test_a_plan_node_after_a_technique_node_is_refused_not_dropped(model, calibrated, technique, user_directory):
    _, plan, _ = calibrated
    (patched,) = TECHNIQUE_NODES[technique](model).result
    with pytest.raises(plans.PlanError, match="Apply Plan: this model already has FastAttn technique nodes"):
        nodes.ApplyPlan.execute(patched, nodes.NO_PLAN, "", plan)
    positive, negative, latent = _inputs()
    args = dict(seed=3, steps=STEPS, cfg=3.0, sampler_name="euler", scheduler="simple", delta=0.1,
                search_mode="fast", step_sharing=True, window_residual=True, cfg_sharing=True,
                window_shape=next(iter(nodes.WINDOW_SHAPES)), window_fraction=0.125, plan_name="", overwrite=False)
    with pytest.raises(plans.PlanError, match="Calibrate: this model already has FastAttn technique nodes"):
        nodes.Calibrate.execute(patched, positive, negative, latent, **args)  # refused before sampling


def test_a_second_plan_on_a_planned_model_is_refused(model, calibrated):
    _, plan, _ = calibrated
    (applied,) = nodes.ApplyPlan.execute(model, nodes.NO_PLAN, "", plan).result
    with pytest.raises(plans.PlanError, match="already carries a plan"):
        nodes.ApplyPlan.execute(applied, nodes.NO_PLAN, plan.to_json())


def test_heatmap_shows_every_cell_in_its_technique_colour(calibrated):
    heatmap = pack_import("plans.heatmap")
    _, plan, _ = calibrated
    image = heatmap.render_heatmap(plan)
    colours = {colour for _, colour in image.getcolors(1 << 20)}
    used = {heatmap.COLOURS[name] for row in plan.methods for name in row}
    assert used <= colours
    tensor = heatmap.image_tensor(image)
    assert tensor.shape == (1, image.height, image.width, 3) and 0.0 <= tensor.min() <= tensor.max() <= 1.0


# --- per-head plans ---------------------------------------------------------------------------

LOCAL_HEADS = (0,)  # of layer 1's two heads: head 0 made local, head 1 keeps global attention


def half_local_attention(call) -> torch.Tensor:
    """Layer 1 with head 0 exactly the candidate window and head 1 full attention."""
    q, k, v = call.heads_first()
    layout = kernels.TokenLayout(0, (8, 8))
    out = kernels.reference_attention(q, k, v, layout, WINDOW.window_for(layout)).to(q.dtype)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out[:, 1:] = dense[:, 1:]
    return call.format_output(out)


@pytest.fixture(scope="module")
def per_head(model):
    """(controlled model, per-head plan, its final latent): fast mode, window candidate only."""
    controlled = with_image_layer(model, half_local_attention)
    positive, negative, latent = _inputs()
    settings = plans.Settings(1e-3, ("wars",), WINDOW, "fast", per_head=True)
    plan, out, _ = plans.calibrate(controlled, positive, negative, latent, seed=3, steps=STEPS, cfg=3.0,
                                   sampler="euler", scheduler="simple", settings=settings)
    return controlled, plan, out


def test_a_per_head_plan_windows_exactly_the_local_heads(model, per_head):
    _, plan, _ = per_head
    assert [row[1] for row in plan.methods] == ["full"] + ["wars"] * (STEPS - 1)
    assert [row[1] for row in plan.heads] == [None] + [list(LOCAL_HEADS)] * (STEPS - 1)
    assert all(row[0] == row[2] == "full" for row in plan.methods)  # real layers err far more than 1e-3
    assert all(row[0] is None and row[2] is None for row in plan.heads)
    assert plan.windowed_share(1, 1) == 0.5 and plan.per_head
    assert plan.choose(2 * STEPS - 1, _timeline(model, 2 * STEPS), 1).heads == LOCAL_HEADS  # another step count
    whole_layer, _ = _calibrate(with_image_layer(model, half_local_attention), "fast", 1e-3, candidates=("wars",))
    assert whole_layer.counts()["full"] == STEPS * 3  # without per_head the global head keeps layer 1 full


def test_greedy_refuses_per_head_search():
    with pytest.raises(ValueError, match="per-head choices need search_mode fast"):
        plans.Settings(0.1, mode="greedy", per_head=True)


def _head_one_windowed(model, positive, negative, latent, size) -> tuple:
    """A plan windowing head 1 of every image / joint layer after step 0 (head 0 full), and which
    layers it windows; the layers read from a plain run of the model."""
    probe = patching.install(model)
    sample(probe, positive, negative, latent, steps=STEPS, seed=3)
    layers = patching.patch_of(probe).last_report.layers
    fingerprint = schema.Fingerprint(patching.adapter_for(model.model.diffusion_model).name,
                                     tuple(schema.LayerInfo(r.kind, r.heads, r.head_dim) for r in layers))
    windowed = [r.kind in schema.WINDOWED_KINDS for r in layers]
    methods = [["full"] * len(layers)] + [["wars" if w else "full" for w in windowed]] * (STEPS - 1)
    heads = [[None] * len(layers)] + [[[1] if w else None for w in windowed]] * (STEPS - 1)
    return plans.Plan(fingerprint, schema.CalibrationInfo(STEPS), size, methods, heads=heads), windowed


def _spied_run(model, method, positive, negative, latent, check) -> None:
    """Sample with `method`, calling check(call, site, run, out, technique) after each attention call."""

    def spied(call, site, run):
        out, flops, technique = method(call, site, run)
        check(call, site, run, out, technique)
        return out, flops, technique

    spied.finish_run = method.finish_run
    sample(patching.install(model, spied), positive, negative, latent, steps=STEPS, seed=3)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_per_head_call_equals_the_float64_reference(arch):
    """Windowed heads: window + the residual of the layer's last full step; the other heads:
    dense attention, all against float64 recomputations from the call's q, k, v."""
    model = build_model(arch)
    positive, negative, latent = _inputs(arch)
    size = schema.WindowSize("band", tokens=5)
    plan, windowed = _head_one_windowed(model, positive, negative, latent, size)
    residuals, checked = {}, []

    def check(call, site, run, out, technique):
        if not windowed[site.layer]:
            return
        q, k, v = (t.double() for t in call.heads_first())
        window = kernels.reference_attention(q, k, v, site.layout, size.window_for(site.layout))
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=call.scale)
        out = call.output_heads_first(out).double()
        key = (site.layer, site.cond_or_uncond)
        if technique == "full":
            assert (out - dense).abs().max() <= 1e-5 * dense.abs().max()
            residuals[key] = out - window
            return
        assert technique == "window+residual on some heads"
        assert (out[:, 0] - dense[:, 0]).abs().max() <= 1e-5 * dense.abs().max()
        expected = window[:, 1] + residuals[key][:, 1]
        assert (out[:, 1] - expected).abs().max() <= 1e-5 * expected.abs().max()
        checked.append(site.step)

    _spied_run(model, plans.PlannedAttention(plan), positive, negative, latent, check)
    assert set(checked) == set(range(1, STEPS))


def test_a_per_head_call_keeps_the_text_padding_mask():
    """HunyuanVideo with padded prompts: the full heads are the host's masked attention, the
    windowed heads what the whole-layer window (which honours the mask) gives them."""
    arch = "hunyuan_video"
    model = build_model(arch)
    positive, negative = conditioning(arch, 7, seed=1), conditioning(arch, 5, seed=2)
    positive[0][1]["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    negative[0][1]["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0]])
    latent = empty_latent(arch, 16, 16, frames=1)
    plan, windowed = _head_one_windowed(model, positive, negative, latent, schema.WindowSize("band", tokens=5))
    method = plans.PlannedAttention(plan)
    checked = []

    def check(call, site, run, out, technique):
        if technique != "window+residual on some heads":
            return
        assert call.mask is not None
        whole_layer = dataclasses.replace(plan.choose(site.step, site.timeline, site.layer), heads=None)
        expected = call.output_heads_first(method._compute(call, site, run, whole_layer, site.chunk_ids)[0])
        out, host = call.output_heads_first(out), call.output_heads_first(call.run_default())
        assert torch.allclose(out[:, 0], host[:, 0], atol=1e-6) and torch.allclose(out[:, 1], expected[:, 1], atol=1e-6)
        checked.append(site.layer)

    _spied_run(model, method, positive, negative, latent, check)
    assert len(checked) >= STEPS - 1 and not patching.patch_of(model)


def test_a_per_head_plan_round_trips_and_reproduces_its_run(per_head, user_directory):
    controlled, plan, latent = per_head
    path = plans.save_plan(plan, "per head", overwrite=False)
    assert json.loads(path.read_text())["version"] == 2
    loaded = plans.load_plan("per head")
    assert loaded.to_json() == plan.to_json() and loaded.heads == plan.heads
    positive, negative, inputs = _inputs()
    applied = patching.install(controlled, plans.PlannedAttention(loaded))
    assert torch.equal(sample(applied, positive, negative, inputs, steps=STEPS, seed=3), latent)


def test_a_per_head_plans_flops_kept_is_what_the_applied_run_computes(per_head):
    controlled, plan, _ = per_head
    applied = patching.install(controlled, plans.PlannedAttention(plan))
    positive, negative, latent = _inputs()
    sample(applied, positive, negative, latent, steps=STEPS, seed=3)
    report = patching.patch_of(applied).last_report
    assert "window+residual on some heads" in report.flops_by_technique
    assert plan.flops_kept == pytest.approx(report.computed_flops / report.full_flops, rel=1e-9)


def test_old_per_layer_plans_still_load(model, calibrated):
    shipped = Path(__file__).resolve().parents[1] / "demo" / "plans" / "fastattn_demo_sd3_fast.json"
    text = shipped.read_text()
    assert json.loads(text)["version"] == 1  # written before per-head plans existed
    assert plans.Plan.from_json(text).heads == []
    _, plan, _ = calibrated
    text = plan.to_json()
    assert json.loads(text)["version"] == 1 and "heads" not in json.loads(text)  # per-layer plans stay version 1
    loaded = plans.Plan.from_json(text)
    assert loaded.heads == [] and not loaded.per_head
    timeline = _timeline(model, STEPS)
    assert all(loaded.choose(step, timeline, layer).heads is None for step in range(STEPS) for layer in range(3))


INVALID_HEADS = {
    "heads on a full cell": (_set(("heads", 1, 0), [0]), "only window cells"),
    "head out of range": (_set(("heads", 1, 1), [0, 5]), r"increasing head numbers in 0\.\.1"),
    "unordered heads": (_set(("heads", 1, 1), [1, 0]), "increasing head numbers"),
    "empty heads": (_set(("heads", 1, 1), []), "increasing head numbers"),
    "a step missing": (lambda data: data["heads"].pop(), "one entry per layer"),
}


@pytest.mark.parametrize("case", list(INVALID_HEADS))
def test_every_invalid_per_head_cell_is_a_clear_error(case, per_head):
    _, plan, _ = per_head
    edit, message = INVALID_HEADS[case]
    with pytest.raises(plans.PlanError, match=message):
        plans.Plan.from_json(_edited(plan, edit))


def test_heatmap_fills_a_per_head_cell_up_to_its_share_of_heads(per_head):
    heatmap = pack_import("plans.heatmap")
    _, plan, _ = per_head
    image = heatmap.render_heatmap(plan)
    cell = int(max(6, min(36, 640 / max(plan.steps, 3))))  # the layout render_heatmap draws
    left, top = heatmap.MARGIN + heatmap.LABEL_WIDTH, 2 * (heatmap.FONT_SIZE + 6) + heatmap.MARGIN
    x, y = left + 1 * cell + cell // 2, top + 1 * cell  # step 1, layer 1: head 0 of 2 windowed
    assert image.getpixel((x, y + 4)) == heatmap.COLOURS["full"]
    assert image.getpixel((x, y + cell - 4)) == heatmap.COLOURS["wars"]
    assert image.getpixel((x, y - cell + 4)) == heatmap.COLOURS["full"]  # layer 0: full attention


# --- another step count: the warning the user sees ---------------------------------------------


class Screen:
    """Stands in for the running server's PromptServer: records the progress text sent to nodes."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text: str, node_id: str, sid=None) -> None:
        self.texts.append((node_id, text))


@pytest.mark.parametrize("steps", [STEPS, 2 * STEPS])
def test_a_plan_mapped_to_another_step_count_warns_on_the_nodes_and_in_the_report(model, calibrated, steps,
                                                                                 monkeypatch):
    import server
    from comfy_execution.utils import CurrentNodeContext

    assert callable(server.PromptServer.send_progress_text)  # the host's API this pack calls
    screen = Screen()
    monkeypatch.setattr(server.PromptServer, "instance", screen, raising=False)
    _, plan, _ = calibrated
    with CurrentNodeContext("prompt", "apply node"):
        (applied,) = nodes.ApplyPlan.execute(model, nodes.NO_PLAN, plan.to_json()).result
    positive, negative, latent = _inputs()
    with CurrentNodeContext("prompt", "sampler node"):
        sample(applied, positive, negative, latent, steps=steps, seed=3)
    (text,) = pack_import("nodes.inspector").AttentionReport.execute(applied, latent).result
    if steps == STEPS:
        assert screen.texts == [] and "warning" not in text
        return
    expected = f"the plan was calibrated at {STEPS} steps (simple) and this run samples {steps} steps at other noise"
    assert [node for node, _ in screen.texts] == ["sampler node", "apply node"]
    assert all(expected in shown for _, shown in screen.texts)
    assert f"warning: {expected}" in text


def test_a_failed_fast_check_returns_the_riskier_half_of_the_choices_to_full():
    """Layers 0 and 3 (the largest local errors) make the model output fail; the others pass."""
    errors = {0: 0.3, 1: 0.01, 2: 0.02, 3: 0.25, 4: 0.1, 5: 0.2}
    checked = []

    def check(kept: dict) -> tuple[float, str]:
        checked.append(sorted(kept))
        return (1.0 if {0, 3} & set(kept) else 0.05), f"output of {sorted(kept)}"

    choices = dict.fromkeys(errors, "wars")
    assert calibrate.passing_choices(choices, errors, check, 0.1) == (
        {1: "wars", 2: "wars", 4: "wars"}, 0.05, "output of [1, 2, 4]")
    assert checked == [[0, 1, 2, 3, 4, 5], [1, 2, 4]]
    checked.clear()
    assert calibrate.passing_choices(choices, errors, lambda kept: (1.0, None), 0.1) == ({}, 0.0, None)
    assert calibrate.passing_choices({0: "ast"}, {0: 0.3}, check, 0.1) == ({}, 0.0, None)  # one layer: full


def _scored(scale: float | None, same_inputs: bool):
    """A Scorer after one call of an image-only layer (4 x 6 grid, batch [unconditional, conditional])
    with attention `scale`, whose two chunks have the same model input or not; and that call."""
    scorer_module, site_module = pack_import("plans.scorer"), pack_import("patching.site")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 24, 8, generator=gen) for _ in range(3))

    def sdpa(q, k, v, heads, scale=None, **kwargs):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    kwargs = {"skip_reshape": True, "skip_output_reshape": True, **({} if scale is None else {"scale": scale})}
    call = patching.AttentionCall(sdpa, (q, k, v, 2), kwargs, None)
    x = torch.randn(1, 16, 8, 12, generator=gen)
    inputs = (x, x if same_inputs else x + 1)
    site = site_module.CallSite(1, 2, 0, "image", kernels.TokenLayout(0, (4, 6)), (1, 0), ("u", "c"), (1, 0), inputs)
    scorer = scorer_module.Scorer((schema.WindowSize("band", tokens=2),), plans.CANDIDATES)
    scorer.score(call, site, call.run_default())
    return scorer, call


def test_fast_scoring_uses_the_calls_scale():
    """The residual a window step would add is full - window, both with the call's own scale."""
    scorer, call = _scored(0.3, same_inputs=True)
    q, k, v = (t.double() for t in call.heads_first())
    window = kernels.reference_attention(q, k, v, kernels.TokenLayout(0, (4, 6)), kernels.Window("band", 2), scale=0.3)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    (residual,) = scorer.pending[0][0].residuals.values()
    assert torch.allclose(residual.double(), full - window, atol=1e-5)


def test_fast_scoring_copies_cfg_only_between_equal_inputs():
    """As the runtime: CFG sharing is scored where the unconditional chunk has a conditional chunk
    with the same model input (its error: the two chunks' difference), and not at all elsewhere."""
    scorer, call = _scored(None, same_inputs=True)
    unconditional, conditional = call.run_default().double().chunk(2)
    expected = (unconditional - conditional).square().sum(dim=(0, 2, 3))
    assert torch.allclose(scorer.squared_errors[0][("full+asc", 0.0, 0)], expected)
    scorer, _ = _scored(None, same_inputs=False)
    assert ("full+asc", 0.0, 0) not in scorer.squared_errors[0]


def test_a_plan_on_another_token_grid_warns(model, calibrated):
    """The window is a fraction of the grid, so a plan runs at another size, but the errors it kept
    within delta were measured at its own: the run says so, as for another step count."""
    _, plan, _ = calibrated
    assert plan.calibration.grid == (8, 8)
    positive, negative, _ = _inputs()
    for size, warned in ((16, False), (24, True)):
        applied = patching.install(model, plans.PlannedAttention(plan))
        sample(applied, positive, negative, empty_latent(ARCH, size, size, batch=2), steps=STEPS, seed=3)
        warnings = patching.patch_of(applied).last_report.warnings
        assert [w for w in warnings if "token grid" in w] == (
            ["the plan was calibrated on a token grid of 8 x 8 and this run has 12 x 12; its window scales with the "
             "grid, but the errors it kept within delta were measured at the calibration's size (calibrate at this "
             "size for a plan made for it)"] if warned else [])


def test_per_head_options_window_the_heads_within_delta_if_the_layer_stays_within_it():
    """Relative errors per head (norms 1): window+residual 0.05 / 0.5, full+asc 0.02 / 0.2."""
    scorer = pack_import("plans.scorer").Scorer((WINDOW,), plans.CANDIDATES)
    scorer.squared_norms[1] = torch.tensor([1.0, 1.0], dtype=torch.float64)
    scorer.squared_errors[1] = {key: torch.tensor(errors, dtype=torch.float64) ** 2 for key, errors in
                                {("wars", WINDOW.fraction, 1): [0.05, 0.5], ("wars+asc", WINDOW.fraction, 1): [0.05, 0.5],
                                 ("full+asc", 0.0, 0): [0.02, 0.2]}.items()}
    candidates = ["wars+asc", "wars", "full+asc"]
    assert scorer.options(1, candidates, 0.1, per_head=False) == []  # each whole-layer error is above 0.1
    (found,) = scorer.options(1, candidates, 0.1, per_head=True)  # wars+asc on head 0 errs 0.146 with head 1's asc
    assert found[:2] == ("wars", (0,)) and found[2] == pytest.approx((0.05 ** 2 / 2) ** 0.5)
    assert scorer.options(1, candidates, 0.6, per_head=True)[0] == ("wars+asc", None, pytest.approx(0.355, abs=1e-3))


def test_the_budget_search_scores_errors_on_the_guided_prediction():
    """An error both CFG halves share weighs as without CFG; an error of the unconditional half alone (what
    CFG sharing makes) is amplified by (cfg - 1) as the guider amplifies it: 9 times in squares at CFG 4."""
    scorer = pack_import("plans.scorer")
    exact = torch.randn(2, 2, 4, 3, dtype=torch.float64)  # [conditional; unconditional] chunks
    both = exact + 0.1
    uncond = exact.clone()
    uncond[1] += 0.1
    errors, norm = scorer.guided_errors({"both": both, "uncond": uncond}, exact, (0, 1), 4.0, ())
    assert errors["both"].item() == pytest.approx(0.01 * 24) and errors["uncond"].item() == pytest.approx(0.09 * 24)
    assert norm.item() == pytest.approx(exact.square().sum().item() / 2)
    assert scorer.guided_errors({"both": both}, exact, (0, 0), 4.0, ()) is None  # not one of each half
