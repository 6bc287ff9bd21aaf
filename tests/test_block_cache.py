"""Block caching: a plan's skipped blocks against a reference written here (the host's own block
replacement for SD3, reusing each block's change by hand), the layer numbering and report around a
skipped block, the architectures it refuses, the plan file, and the budget search that chooses it."""

from __future__ import annotations

import json

import nodes as host_nodes
import pytest
import torch
from harness import pack_import
from harness.models import build_model, conditioning, empty_latent, sample, small_latent

plans = pack_import("plans")
patching = pack_import("patching")
WindowSize = pack_import("patching.schedule").WindowSize

ARCH = "sd3"
STEPS = 6
WINDOW = WindowSize("band", 0.125)


def _inputs(batch: int = 2, arch: str = ARCH) -> tuple:
    latent = small_latent(arch, batch) if arch != ARCH else empty_latent(ARCH, 16, 16, batch=batch)
    return conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), latent


@pytest.fixture(scope="module")
def model():
    return build_model(ARCH)


def _full_plan(model, arch: str = ARCH):
    """A budget plan at delta 0: every cell full, with the model's fingerprint."""
    settings = plans.Settings(0.0, plans.CANDIDATES, WINDOW, "budget")
    plan, _, _ = plans.calibrate(model, *_inputs(arch=arch), seed=3, steps=STEPS, cfg=3.0, sampler="euler",
                                 scheduler="simple", settings=settings)
    return plan


@pytest.fixture(scope="module")
def full_plan(model):
    return _full_plan(model)


def _with_cells(plan, cells: dict[tuple[int, int], str]):
    data = json.loads(plan.to_json())
    for (step, layer), name in cells.items():
        data["methods"][step][layer] = name
    data["version"] = 5
    return plans.Plan.from_json(json.dumps(data))


# Per architecture, its blocks as the host's block replacements name them: (kind, index), the streams the
# block changes, and the first attention layer of the block (the test SD3's first block holds two, MMDiT-X;
# each Wan block a self and a cross attention)
BLOCKS = {
    "sd3": [("double_block", 0, ("txt", "img"), 0), ("double_block", 1, ("txt", "img"), 2)],
    "flux": [("double_block", 0, ("img", "txt"), 0), ("single_block", 0, ("img",), 1)],
    "wan": [("double_block", 0, ("img",), 0), ("double_block", 1, ("img",), 2)],
    "hunyuan_video": [("double_block", 0, ("img", "txt"), 2), ("single_block", 0, ("img",), 3)],  # after 2 refiner calls
    "chroma": [("double_block", 0, ("img", "txt"), 0), ("single_block", 0, ("img",), 1)],
    "flux2": [("double_block", 0, ("img", "txt"), 0), ("single_block", 0, ("img",), 1)],
    "hunyuan_image21": [("double_block", 0, ("img", "txt"), 2), ("single_block", 0, ("img",), 3)],
    "hunyuan_video15": [("double_block", 0, ("img", "txt"), 2), ("single_block", 0, ("img",), 3)],
    "qwen_image": [("double_block", 0, ("img", "txt"), 0), ("double_block", 1, ("img", "txt"), 1)],
    "auraflow": [("double_block", 0, ("img", "txt"), 0), ("single_block", 0, ("img",), 1)],
}
# Models whose host has no block replacement: their blocks by module path (x in, x out), and the first
# attention layer of each (Lumina 2: after a text and an image refiner layer; PixArt: self, then cross)
HOOKED = {
    "lumina2": [("layers.0", 2), ("layers.1", 3)],
    "pixart": [("blocks.0", 0), ("blocks.1", 2)],
}
SKIPPED = {(2, 1), (3, 0), (3, 1), (5, 0), (4, 1)}  # (step, block)


def _reference(model, arch: str, skipped: set[tuple[int, int]], batch: int = 2) -> torch.Tensor:
    """The unpatched model with the host's own block replacement on every block: at a skipped
    (step, block) the block returns its inputs plus the change it made when it last ran."""
    sigmas: list[float] = []
    changes: dict[int, dict[str, torch.Tensor | None]] = {}

    def replacement(block: int, streams: tuple[str, ...]):
        def replace(args, extra):
            sigma = float(args["transformer_options"]["sigmas"].flatten()[0])
            if sigma not in sigmas:
                sigmas.append(sigma)
            if (sigmas.index(sigma), block) in skipped:
                return {name: None if change is None else args[name] + change
                        for name, change in changes[block].items()}
            out = extra["original_block"]({**args, **{name: args[name].clone() for name in streams}})
            changes[block] = {name: None if out[name] is None else out[name] - args[name] for name in streams}
            return out
        return replace

    clone = model.clone()
    for block, (kind, index, streams, _) in enumerate(BLOCKS[arch]):
        clone.set_model_patch_replace(replacement(block, streams), "dit", kind, index)
    return sample(clone, *_inputs(batch, arch), steps=STEPS, seed=3)


def _hooked_reference(model, arch: str, skipped: set[tuple[int, int]]) -> torch.Tensor:
    """The unpatched model with PyTorch forward hooks on its blocks: at a skipped (step, block) the hook
    returns the block's input plus the change the block made when it last ran (the block still runs)."""
    sigmas: list[float] = []
    changes: dict[int, torch.Tensor] = {}

    def step_of(apply_model, args):
        sigma = float(args["timestep"].flatten()[0])
        if sigma not in sigmas:
            sigmas.append(sigma)
        return apply_model(args["input"], args["timestep"], **args["c"])

    def hook(block: int):
        def replace(module, args, output):
            if (len(sigmas) - 1, block) in skipped:
                return args[0] + changes[block]
            changes[block] = output - args[0]
            return output
        return replace

    clone = model.clone()
    clone.set_model_unet_function_wrapper(step_of)
    handles = [model.model.diffusion_model.get_submodule(path).register_forward_hook(hook(block))
               for block, (path, _) in enumerate(HOOKED[arch])]
    try:
        return sample(clone, *_inputs(1, arch), steps=STEPS, seed=3)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize(("arch", "batch"), [("sd3", 1), ("sd3", 2), ("flux", 1), ("wan", 1), ("hunyuan_video", 1),
                                             ("chroma", 1), ("flux2", 1), ("hunyuan_image21", 1), ("hunyuan_video15", 1),
                                             ("qwen_image", 1), ("auraflow", 1)])
def test_skipped_blocks_equal_the_host_block_replacement_reference(model, full_plan, arch, batch):
    """Flux's blocks add to their inputs in place: the change is taken from a copy of them."""
    if arch != ARCH:
        model = build_model(arch)
        full_plan = _full_plan(model, arch)
    plan = _with_cells(full_plan, {(step, BLOCKS[arch][block][3]): "block" for step, block in SKIPPED})
    assert plan.caches_blocks and json.loads(plan.to_json())["version"] == 5
    patched = patching.install(model, plans.PlannedAttention(plan))
    out = sample(patched, *_inputs(batch, arch), steps=STEPS, seed=3)
    reference = _reference(model, arch, SKIPPED, batch)
    plain = sample(model, *_inputs(batch, arch), steps=STEPS, seed=3)
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, plain, rtol=1e-3, atol=1e-4)  # the skipped blocks changed the picture
    report = patching.patch_of(patched).last_report
    computed, full = report.flops_by_technique["block cache"]
    assert computed == 0 and full > 0 and not report.stood_aside
    assert report.layers_per_forward == {len(plan.fingerprint.layers)}  # numbering kept over skipped blocks


@pytest.mark.parametrize("arch", list(HOOKED))
def test_skipped_blocks_equal_a_forward_hook_reference_where_the_host_has_no_block_replacement(arch):
    model = build_model(arch)
    plan = _with_cells(_full_plan(model, arch), {(step, HOOKED[arch][block][1]): "block" for step, block in SKIPPED})
    patched = patching.install(model, plans.PlannedAttention(plan))
    out = sample(patched, *_inputs(1, arch), steps=STEPS, seed=3)
    assert torch.allclose(out, _hooked_reference(model, arch, SKIPPED), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, sample(model, *_inputs(1, arch), steps=STEPS, seed=3), rtol=1e-3, atol=1e-4)
    report = patching.patch_of(patched).last_report
    assert report.flops_by_technique["block cache"][1] > 0 and not report.stood_aside
    assert report.layers_per_forward == {len(plan.fingerprint.layers)}


def test_a_split_sampler_runs_a_block_it_has_no_change_stored_for(model, full_plan):
    """KSamplerAdvanced split at step 3, the plan skipping block 1 at step 3: the second sampler is a run of
    its own with no change kept, so the block runs (and the report says so); the result is the unpatched
    split run's."""
    applied = patching.install(model, plans.PlannedAttention(_with_cells(full_plan, {(3, 2): "block"})))
    positive, negative, latent = _inputs()

    def split(first, second) -> torch.Tensor:
        half = host_nodes.KSamplerAdvanced().sample(first, "enable", 3, STEPS, 3.0, "euler", "simple", positive,
                                                    negative, latent, 0, 3, "enable")[0]
        return host_nodes.KSamplerAdvanced().sample(second, "disable", 3, STEPS, 3.0, "euler", "simple", positive,
                                                    negative, half, 3, STEPS, "disable")[0]["samples"]

    assert torch.equal(split(applied, applied), split(model, model))
    report = patching.patch_of(applied).last_report
    assert "block cache" not in report.flops_by_technique
    assert any("block caching computed the block" in reason for reason in report.stood_aside)


def test_a_layer_shared_after_a_skipped_block_reads_its_last_computed_output(model, full_plan):
    """Step sharing after a skipped block reuses the attention output of the step before the skip (the
    block computed nothing at the skipped step): the same as sharing that older output directly."""
    after = _with_cells(full_plan, {(2, 2): "block", (3, 2): "ast"})
    stood = patching.install(model, plans.PlannedAttention(after))
    sample(stood, *_inputs(), steps=STEPS, seed=3)
    report = patching.patch_of(stood).last_report
    assert not report.stood_aside  # the output of step 1 was kept for step 3
    assert report.flops_by_technique["step sharing"][0] == 0


def test_block_caching_is_refused_where_the_pack_does_not_know_the_blocks():
    other = build_model("hidream")
    method = pack_import("patching.ditfastattn").DiTFastAttn(pack_import("patching.schedule").Schedule())
    method.caches_blocks = True
    with pytest.raises(patching.UnsupportedArchitectureError, match="block caching knows the blocks of these models .*Lumina2.*; this HiDream model"):
        patching.install(other, method)


def test_plans_with_block_cells_load_and_refuse_a_block_at_step_zero(full_plan):
    plan = _with_cells(full_plan, {(1, 0): "block"})
    again = plans.Plan.from_json(plan.to_json())
    assert again.methods == plan.methods and again.caches_blocks
    data = json.loads(plan.to_json())
    data["methods"][0][0] = "block"
    with pytest.raises(plans.PlanError, match="step 0 must compute"):
        plans.Plan.from_json(json.dumps(data))
    assert json.loads(full_plan.to_json())["version"] < 5  # plans without block cells stay readable by older packs


def _calibrated(model, delta: float, **options):
    settings = plans.Settings(delta, plans.CANDIDATES, WINDOW, "budget", block_cache=True, **options)
    return plans.calibrate(model, *_inputs(), seed=3, steps=STEPS, cfg=3.0, sampler="euler", scheduler="simple",
                           settings=settings)


def test_the_budget_search_caches_blocks_and_the_plan_reproduces_its_run(model):
    """With a loose budget the search skips blocks (cheaper than any attention choice: their price is below
    zero), only on the first layer of a block whose other layers are not compressible; applying the plan
    gives the latent the calibration sampled with it."""
    plan, samples, layers = _calibrated(model, 0.5)
    cells = [(step, layer) for step, row in enumerate(plan.methods) for layer, name in enumerate(row) if name == "block"]
    assert cells and {layer for _, layer in cells} == {2}  # block 0 holds two compressible layers: never skipped
    assert layers[2].price("block") < 0 < layers[2].price("full")
    table = pack_import("plans.costs").cost_table(layers)
    assert "| block " in table and "block cache's price is below zero" in table
    applied = patching.install(model, plans.PlannedAttention(plans.Plan.from_json(plan.to_json())))
    assert torch.equal(sample(applied, *_inputs(), steps=STEPS, seed=3), samples)
    assert not patching.patch_of(applied).last_report.stood_aside


def test_block_errors_are_measured_and_a_zero_budget_caches_nothing(model):
    plan, _, _ = _calibrated(model, 0.0)
    assert not plan.caches_blocks
    with pytest.raises(ValueError, match="block caching is planned by the budget search only"):
        plans.Settings(0.1, plans.CANDIDATES, WINDOW, "fast", block_cache=True)


def test_linear_flops_count_what_a_block_runs_besides_attention():
    costs = pack_import("plans.costs")
    layer = torch.nn.Linear(8, 16)
    with costs.LinearFlops() as counter:
        layer(torch.randn(3, 5, 8))
        torch.randn(4, 4) @ torch.randn(4, 4)  # not a linear layer: not counted
    assert counter.flops == 2 * 15 * 8 * 16


def test_block_errors_are_put_into_the_cells_units_by_the_measured_rates():
    """Where skipping every block errs the output 6 per unit of summed block error and step sharing 2 per
    unit of summed attention error, a block cell's error counts 3 times; steps without both rates as measured."""
    calibrate_module = pack_import("plans.calibrate")
    settings = plans.Settings(0.1, plans.CANDIDATES, WINDOW, "budget", block_cache=True)
    calibration = calibrate_module.Calibration(settings, 3)
    calibration.local_errors = [{}, {0: {("block", 0.0, 1): 0.01, ("ast", 0.0, 1): 0.02}},
                                {0: {("block", 0.0, 1): 0.01}}]
    calibration.gains, calibration.block_gains = {1: 2.0, 2: 2.0}, {1: 6.0}
    calibration._block_errors_in_cell_units()
    assert calibration.local_errors[1][0] == {("block", 0.0, 1): pytest.approx(0.03), ("ast", 0.0, 1): 0.02}
    assert calibration.local_errors[2][0] == {("block", 0.0, 1): 0.01}


@pytest.mark.parametrize(("arch", "firsts"), [("flux", {0, 1}), ("wan", {0, 2}), ("qwen_image", {0, 1}),
                                              ("lumina2", {2, 3}), ("zimage", {2}), ("pixart", {0, 2}), ("auraflow", {0, 1})])
def test_other_architectures_calibrate_block_cells_on_their_blocks_first_layers(arch, firsts):
    """Flux: a double and a single block, one joint call each; Wan and PixArt: blocks of a self and a cross
    attention (the cross attention is never compressed, so the block is cacheable); Lumina 2: joint layers
    after two refiner layers, which are not blocks; AuraFlow: double and single layers. A loose budget: the
    random tiny models' blocks change much from step to step. The plan reproduces its run."""
    other = build_model(arch)
    settings = plans.Settings(8.0, plans.CANDIDATES, WINDOW, "budget", block_cache=True)
    plan, samples, _ = plans.calibrate(other, *_inputs(arch=arch), seed=3, steps=STEPS, cfg=3.0, sampler="euler",
                                       scheduler="simple", settings=settings)
    layers = {layer for row in plan.methods for layer, name in enumerate(row) if name == "block"}
    assert layers and layers <= firsts
    applied = patching.install(other, plans.PlannedAttention(plan))
    assert torch.equal(sample(applied, *_inputs(arch=arch), steps=STEPS, seed=3), samples)
