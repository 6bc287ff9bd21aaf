"""Never silently wrong: every way ComfyUI calls a model, against an independent reference.

Each test samples with the pack's nodes and with `harness.reference_schedule` (a float64
implementation of the same chain written apart from the pack) through the host's real guiders,
samplers and extensions, and checks that the techniques acted where the reference says they do
(the output moved away from the unpatched model's, and the Attention Report counts them). The
section "where a technique stands aside" has one test per case of docs/host-paths.md's list (but the
unproven token order, in test_generic_layout.py, and an override above the pack's or a CUDA graph
capture, in test_other_overrides.py): the call runs
as without the technique (output equal to the unpatched model's or the reference's) and the
report names the reason.
"""

from __future__ import annotations

import random

import comfy.samplers
import node_helpers
import pytest
import torch
from comfy_extras import nodes_context_windows, nodes_custom_sampler, nodes_perpneg, nodes_slg
from harness import pack_import
from harness.chains import patched_with_nodes
from harness.models import (
    ARCHITECTURES,
    CORE_ARCHITECTURES,
    SPECS,
    build_model,
    conditioning,
    empty_latent,
    expected_layers,
    linear_timeline,
    sample,
)
from harness.reference_schedule import reference_model, techniques_acted

patching = pack_import("patching")
STEPS = 4
ACTED = 1e-6  # a technique that acted moves the output by more than this share of its scale (8 float32 ulps)


def _latent(arch: str, batch: int = 1, frames: int | None = None, size: tuple[int, int] | None = None) -> dict:
    spec = SPECS[arch]
    height, width = size or spec.size
    return empty_latent(arch, height, width, batch=batch, frames=frames or (2 if spec.video else 1))


def _prompts(arch: str) -> tuple[list, list]:
    return conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2)


def _assert_close(out: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-4) -> None:
    error = (out - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max error {error:.3g} vs scale {expected.abs().max().item():.3g}"


def _report(model):
    return patching.patch_of(model).last_report


def _techniques(report) -> set[str]:
    """The techniques the report counts as having computed some call: "window", "step", "cfg"."""
    names = " | ".join(name for name, (_, full) in report.flops_by_technique.items() if full)
    return {kind for kind, phrase in (("window", "window"), ("step", "step sharing"), ("cfg", "cfg sharing"))
            if phrase in names}


def _assert_acted(out: torch.Tensor, plain: torch.Tensor, patched, reference, expected: set[str]) -> None:
    """The pack and the reference applied the same techniques (`expected`) and they changed the output."""
    assert techniques_acted(reference) == expected
    assert _techniques(_report(patched)) == expected, _report(patched).flops_by_technique
    if expected:
        assert (out - plain).abs().max() > ACTED * plain.abs().max()


def _guided(model, guider_class, conds: tuple, cfg: tuple, latent: dict, sampler: str = "euler") -> torch.Tensor:
    """Sample through a guider object, as SamplerCustomAdvanced does."""
    guider = guider_class(model)
    guider.set_conds(*conds)
    guider.set_cfg(*cfg)
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, 0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    return guider.sample(noise, latent_image, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=0)


WINDOW_AND_SHARING = [
    {"technique": "window", "tokens": 3, "refresh_every": 2},
    {"technique": "step", "compute_every": 2, "start": 0.5},
    {"technique": "cfg", "end": 0.75},
]
ALL_THREE = {"window", "step", "cfg"}


def _compared(model, chain: list[dict], arch: str, prompts: tuple, latent: dict, expected: set[str],
              cfg_guider: bool = True, run=None) -> None:
    """Sample `model` unpatched, patched by `chain` and by the reference; the last two agree, and
    the techniques `expected` acted in both. `run(model)` samples (default: the KSampler path)."""
    run = run or (lambda m: sample(m, *prompts, latent, steps=STEPS))
    patched, reference = patched_with_nodes(model, chain), reference_model(model, chain, arch, cfg_guider)
    out = run(patched)
    _assert_close(out, run(reference))
    _assert_acted(out, run(model), patched, reference, expected)


# 1. guiders, samplers and extensions: the techniques act as the reference says ------------------

@pytest.mark.parametrize("arch", ["wan", "pixart", "hunyuan_dit"])
def test_cross_attention_is_never_shared_and_cfg_still_acts(arch):
    """CFG sharing on every layer of a model whose text enters only through cross-attention must
    not turn CFG off: the self-attention layers share, the cross layers stand aside."""
    model = build_model(arch)
    positive, negative = _prompts(arch)
    chain = [{"technique": "cfg"}]
    patched = patched_with_nodes(model, chain)
    out = sample(patched, positive, negative, _latent(arch), steps=STEPS)
    _compared(model, chain, arch, (positive, negative), _latent(arch), {"cfg"})
    cfg_one = sample(model, positive, negative, _latent(arch), steps=STEPS, cfg=1.0)
    assert (out - cfg_one).abs().max() > 0.1  # CFG still acts (the bug made this 1e-6)


@pytest.mark.parametrize("guider", [nodes_custom_sampler.Guider_DualCFG, nodes_perpneg.Guider_PerpNeg])
def test_guiders_with_more_than_two_conditionings_keep_their_caches_apart(guider):
    arch = "sd3" if guider is nodes_custom_sampler.Guider_DualCFG else "flux"
    model = build_model(arch)
    first, negative = _prompts(arch)
    third = conditioning(arch, 7, seed=3)
    conds, cfg = (first, third, negative), (3.0, 2.0)

    def run(m):
        return _guided(m, guider, conds, cfg, _latent(arch))

    _compared(model, WINDOW_AND_SHARING, arch, conds, _latent(arch), {"window", "step"}, cfg_guider=False, run=run)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_second_order_samplers(sampler):
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)

    def run(m):
        return _guided(m, comfy.samplers.CFGGuider, (positive, negative), (3.0,), _latent(arch), sampler)

    _compared(model, WINDOW_AND_SHARING, arch, (positive, negative), _latent(arch), ALL_THREE, run=run)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    run(patched)
    assert _report(patched).forwards == 2 * STEPS - 1  # the last step is a plain Euler step


def test_context_windows_keep_a_cache_per_window():
    arch = "wan"
    model = nodes_context_windows.ContextWindowsManualNode.execute(
        build_model(arch), 2, 1, comfy.context_windows.ContextSchedules.STATIC_STANDARD, 1, False,
        comfy.context_windows.ContextFuseMethods.PYRAMID, 2).result[0]
    chain = [{"technique": "window", "shape": "square", "tokens": 1}, {"technique": "step", "start": 0.5}]
    _compared(model, chain, arch, _prompts(arch), _latent(arch, frames=4), {"window", "step"})
    patched = patched_with_nodes(model, chain)
    sample(patched, *_prompts(arch), _latent(arch, frames=4), steps=STEPS)
    assert _report(patched).forwards == STEPS * 3  # three windows of 2 frames over 4, overlap 1


def test_area_conditioning_copies_cfg_only_between_equal_inputs():
    """A left-half positive beside a whole-image one: the unconditional chunk copies the whole-image
    positive (same input), never the left half."""
    arch = "sd3"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    left = node_helpers.conditioning_set_values(positive, {"area": (16, 8, 0, 0), "strength": 1.0,
                                                           "set_area_to_bounds": False})
    prompts = (left + conditioning(arch, 7, seed=5), negative)
    _compared(model, WINDOW_AND_SHARING, arch, prompts, _latent(arch), ALL_THREE)


def test_two_positive_prompts_combined():
    arch = "flux"
    positive, negative = _prompts(arch)
    prompts = (positive + conditioning(arch, 7, seed=6), negative)
    _compared(build_model(arch), WINDOW_AND_SHARING, arch, prompts, _latent(arch), ALL_THREE)


def test_chunks_without_uuids_get_distinct_identities():
    state, cache = pack_import("patching.state"), pack_import("patching.cache")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = state.SamplingRun(patching.AttentionPatch(None, adapter), linear_timeline(2))
    ids = cache.chunk_ids(run.evaluation_of, 0, (0, 0, 1), {}, torch.device("cpu"))
    assert len(set(ids)) == 3
    on_other_device = cache.chunk_ids(run.evaluation_of, 0, (0, 0, 1), {}, torch.device("meta"))
    assert not set(ids) & set(on_other_device)  # MultiGPU CFG split: halves on two devices never share


def test_hunyuan_video_text_padding_mask_keeps_the_window():
    arch = "hunyuan_video"
    model = build_model(arch)
    positive, negative = conditioning(arch, 7, seed=1), conditioning(arch, 5, seed=2)  # the host cannot batch
    positive[0][1]["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])  # masks: two calls a step, whose
    negative[0][1]["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0]])  # joint layouts differ (no CFG copy)
    chain = [{"technique": "window", "tokens": 5}, {"technique": "cfg"}]
    _compared(model, chain, arch, (positive, negative), _latent(arch), {"window"})
    patched = patched_with_nodes(model, chain)
    sample(patched, positive, negative, _latent(arch), steps=STEPS)
    assert not any("mask" in reason for reason in _report(patched).stood_aside)


def test_overlapping_window_nodes_keep_each_residual_with_its_window():
    arch = "sd3"
    model = build_model(arch)
    chain = [{"technique": "window", "tokens": 2, "refresh_every": 3},
             {"technique": "window", "shape": "square", "tokens": 1, "refresh_every": 2, "start": 0.25, "end": 0.75}]
    patched, reference = patched_with_nodes(model, chain), reference_model(model, chain, arch)
    prompts, latent = _prompts(arch), _latent(arch)
    out = sample(patched, *prompts, latent, steps=6)
    _assert_close(out, sample(reference, *prompts, latent, steps=6))
    _assert_acted(out, sample(model, *prompts, latent, steps=6), patched, reference, {"window"})


# the randomized check --------------------------------------------------------------------------

def _random_chain(rng: random.Random, layers: int) -> list[dict]:
    chain = []
    for _ in range(rng.randint(1, 4)):
        start = rng.choice([0.0, 0.25, 0.5])
        spec = {"technique": rng.choice(["window", "step", "cfg"]), "start": start,
                "end": rng.choice([e for e in (0.5, 0.75, 1.0) if e > start]),
                "layers": rng.choice(["", "", f"0-{rng.randrange(layers)}", str(rng.randrange(layers))])}
        if spec["technique"] == "window":
            spec.update(shape=rng.choice(["band", "square", "circle"]), tokens=rng.randint(1, 4),
                        refresh_every=rng.randint(2, 3), residual=rng.random() < 0.8)
        elif spec["technique"] == "step":
            spec["compute_every"] = rng.randint(2, 3)
        chain.append(spec)
    return chain


@pytest.mark.parametrize("arch", CORE_ARCHITECTURES)
def test_random_chains_match_the_reference(arch):
    """Random chains at batch 1 and 2 and at CFG 1: the same output and the same techniques acting
    as the reference, and the chains act (a chain that acts nowhere would prove nothing)."""
    rng = random.Random(f"chains-{arch}")
    model = build_model(arch)
    positive, negative = _prompts(arch)
    layers = sum(expected_layers(arch).values())
    acted = []
    for batch, cfg in ((1, 3.0), (2, 3.0), (1, 1.0)):
        chain = _random_chain(rng, layers)
        latent = _latent(arch, batch=batch)
        patched, reference = patched_with_nodes(model, chain), reference_model(model, chain, arch)
        out = sample(patched, positive, negative, latent, steps=STEPS, cfg=cfg)
        _assert_close(out, sample(reference, positive, negative, latent, steps=STEPS, cfg=cfg))
        plain = sample(model, positive, negative, latent, steps=STEPS, cfg=cfg)
        _assert_acted(out, plain, patched, reference, techniques_acted(reference))
        acted.append(techniques_acted(reference))
    assert any(acted), f"no random chain acted on {arch}: {acted}"


@pytest.mark.parametrize("arch", [arch for arch in ARCHITECTURES if arch not in CORE_ARCHITECTURES])
def test_windows_and_sharing_match_the_reference_on_the_other_architectures(arch):
    """The other architectures take the host paths the core seven take (batching, guiders); what is
    theirs is the layout: a square window on the grid (its place after or before the text, its rows and
    frames), then step and CFG sharing."""
    model = build_model(arch)
    positive, negative = _prompts(arch)
    chain = [{"technique": "window", "shape": "square", "tokens": 1, "refresh_every": 2}, *WINDOW_AND_SHARING[1:]]
    patched = patched_with_nodes(model, chain)
    out = sample(patched, positive, negative, _latent(arch), steps=STEPS)
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=STEPS))
    techniques = _report(patched).flops_by_technique
    assert "step sharing" in techniques and any(name.startswith("window+residual") for name in techniques)


# 2. where a technique stands aside: one test per case of docs/host-paths.md's list ---------------------------

def _stood_aside(model, phrase: str) -> int:
    """Calls that stood aside for a reason containing `phrase` in the model's last run."""
    return sum(count for reason, count in _report(model).stood_aside.items() if phrase in reason)


@pytest.mark.parametrize("arch", ["wan", "pixart"])
def test_stands_aside_for_cross_attention(arch):
    """Techniques set only on the cross-attention layers change nothing."""
    model = build_model(arch)
    positive, negative = _prompts(arch)
    plain = sample(model, positive, negative, _latent(arch), steps=STEPS)
    cross_only = patched_with_nodes(model, [{"technique": "cfg", "layers": "1"}, {"technique": "step", "layers": "3"}])
    assert torch.equal(sample(cross_only, positive, negative, _latent(arch), steps=STEPS), plain)
    assert _stood_aside(cross_only, "cross-attention") == STEPS + STEPS // 2  # layer 1 every step, 3 when shared


def test_stands_aside_for_text_only_calls_and_calls_it_cannot_place():
    """HunyuanVideo's token refiner (layers 0-1, text only) and a Flux Kontext-style forward whose
    reference-image tokens make its joint calls longer than the latent and the prompt."""
    arch = "hunyuan_video"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    plain = sample(model, positive, negative, _latent(arch), steps=STEPS)
    refiners = patched_with_nodes(model, [{"technique": "window", "tokens": 1, "layers": "0-1"},
                                          {"technique": "step", "layers": "0-1"}, {"technique": "cfg", "layers": "0-1"}])
    assert torch.equal(sample(refiners, positive, negative, _latent(arch), steps=STEPS), plain)
    assert _stood_aside(refiners, "text attention call with no image grid") == 2 * STEPS

    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    for cond in (positive, negative):
        cond[0][1]["reference_latents"] = [torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(3))]
    plain = sample(model, positive, negative, _latent(arch), steps=STEPS)
    edit = patched_with_nodes(model, [{"technique": "window", "tokens": 1}, {"technique": "cfg"}])
    assert torch.equal(sample(edit, positive, negative, _latent(arch), steps=STEPS), plain)
    assert _stood_aside(edit, "unknown attention call with no image grid") == 2 * STEPS


def test_stands_aside_when_its_cache_is_missing_or_made_for_something_else():
    """A prompt that starts halfway (a timestep range) has no output stored at its first shared
    step: it computes in full there, as the reference does. A residual cached for another window
    is not read."""
    arch = "sd3"
    model = build_model(arch)
    first, negative = _prompts(arch)
    later = conditioning(arch, 7, seed=7)
    positive = (node_helpers.conditioning_set_values(first, {"start_percent": 0.0, "end_percent": 0.5})
                + node_helpers.conditioning_set_values(later, {"start_percent": 0.5, "end_percent": 1.0}))
    chain = [{"technique": "step", "compute_every": 3}]
    _compared(model, chain, arch, (positive, negative), _latent(arch), {"step"})
    patched = patched_with_nodes(model, chain)
    sample(patched, positive, negative, _latent(arch), steps=STEPS)
    assert _stood_aside(patched, "step sharing had no output of this layer stored") == 3  # 3 layers, one step

    schedule = pack_import("patching.schedule")
    method = pack_import("patching.ditfastattn").DiTFastAttn(schedule.Schedule((schedule.WindowResidual(
        schedule.WindowSize("band", tokens=2)),)), backend="torch")
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    layout = pack_import("kernels").TokenLayout(0, (4, 6))
    other_window = pack_import("kernels").Window("band", 5)
    cache = {("residual", 0, CHUNK): pack_import("patching.cache").Entry(0, torch.ones(1, 2, 24, 8), (layout, other_window))}
    out, technique, stood_aside = _one_call(method, _sdpa, q, k, v, 2, cache=cache)
    assert technique == "full" and torch.equal(out, _sdpa(q, k, v, 2))
    assert list(stood_aside) == ["window + residual had no residual cached for this window and call (the first of "
                                 "its kind in the run, or another shape)"]


@pytest.mark.parametrize("node", [nodes_slg.SkipLayerGuidanceDiT, nodes_slg.SkipLayerGuidanceDiTSimple])
def test_stands_aside_for_a_forward_with_blocks_replaced_for_it_alone(node):
    """SLG's forwards with blocks skipped number their attention layers differently: no technique
    touches them, and the normal forwards keep their own caches. (The simple node runs the whole
    unconditional prediction with the blocks skipped: nothing there for CFG sharing to copy to.)"""
    arch = "sd3"
    model = build_model(arch)
    if node is nodes_slg.SkipLayerGuidanceDiT:
        model = node.execute(model, 3.0, 0.0, 1.0, double_layers="1").result[0]
        acting = ALL_THREE
    else:
        model = node.execute(model, 0.0, 1.0, double_layers="1").result[0]
        acting = {"window", "step"}
    _compared(model, WINDOW_AND_SHARING, arch, _prompts(arch), _latent(arch), acting)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    sample(patched, *_prompts(arch), _latent(arch), steps=STEPS)
    report = _report(patched)
    assert _stood_aside(patched, "Skip Layer Guidance") > 0
    assert report.layers_per_forward == {3, 2}  # the skipped block's attention is missing from SLG's forwards


@pytest.mark.parametrize("guider", [nodes_custom_sampler.Guider_DualCFG, nodes_perpneg.Guider_PerpNeg])
def test_stands_aside_for_guiders_other_than_cfg(guider):
    arch = "sd3"
    model = build_model(arch)
    first, negative = _prompts(arch)
    conds = (first, conditioning(arch, 7, seed=3), negative)
    plain = _guided(model, guider, conds, (3.0, 2.0), _latent(arch))
    cfg_only = patched_with_nodes(model, [{"technique": "cfg"}])
    assert torch.equal(_guided(cfg_only, guider, conds, (3.0, 2.0), _latent(arch)), plain)
    assert _stood_aside(cfg_only, "CFG sharing needs ComfyUI's CFG guider") == 3 * STEPS


def test_stands_aside_at_cfg_one():
    arch = "sd3"
    model = build_model(arch)
    plain = sample(model, *_prompts(arch), _latent(arch), steps=STEPS, cfg=1.0)
    patched = patched_with_nodes(model, [{"technique": "cfg"}])
    assert torch.equal(sample(patched, *_prompts(arch), _latent(arch), steps=STEPS, cfg=1.0), plain)
    assert _report(patched).stood_aside == {"CFG sharing did nothing: this run had no unconditional batch (CFG 1)": 1}


def test_stands_aside_for_an_unconditional_chunk_without_a_conditional_one_to_copy():
    """A negative prompt of another length runs in a call of its own, after the positive's: its
    image-only layer (SD3's layer 1) copies the positive's output, its joint layers (another text
    length: another layout) have nothing to copy and compute, as the reference does."""
    arch = "sd3"
    model = build_model(arch)
    prompts = (conditioning(arch, 7, seed=1), conditioning(arch, 2, seed=2))
    chain = [{"technique": "cfg"}]
    _compared(model, chain, arch, prompts, _latent(arch), {"cfg"})
    patched = patched_with_nodes(model, chain)
    sample(patched, *prompts, _latent(arch), steps=STEPS)
    assert _report(patched).batch_halves == {(0,), (1,)}
    assert _stood_aside(patched, "CFG sharing found no conditional output of this step") == 2 * STEPS


def _regional_mask(text_len: int, grid: tuple[int, int]) -> torch.Tensor:
    """A regional-prompting mask over [text, image]: the first half of the text is seen only by the
    left half of the image, the rest only by the right half; text queries see everything."""
    height, width = grid
    n = text_len + height * width
    mask = torch.zeros(1, n, n)
    left = (torch.arange(height * width) % width < width // 2)
    first = torch.arange(text_len) < text_len // 2
    image_sees_text = torch.where(left[:, None], first[None, :], ~first[None, :])
    mask[0, text_len:, :text_len] = torch.zeros(height * width, text_len).masked_fill(~image_sees_text, float("-inf"))
    return mask


def test_stands_aside_for_an_attention_mask_other_than_a_text_padding_mask():
    """Flux with a regional mask: window calls run in full as the host computes them (and cache no
    residual); step and CFG sharing still act, as in the reference."""
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    for cond in (positive, negative):
        cond[0][1].update(attention_mask=_regional_mask(7, (8, 8)), attention_mask_img_shape=(8, 8))
    plain = sample(model, positive, negative, _latent(arch), steps=STEPS)
    window = patched_with_nodes(model, [{"technique": "window", "tokens": 3}])
    assert torch.equal(sample(window, positive, negative, _latent(arch), steps=STEPS), plain)
    assert _report(window).stood_aside == {"an attention mask other than a text padding mask": 2 * 2}  # 2 layers x 2 steps
    _compared(model, WINDOW_AND_SHARING, arch, (positive, negative), _latent(arch), {"step", "cfg"})


def test_stands_aside_when_the_window_cannot_apply(caplog):
    """CLEAR with 2 x 2 pooling on a 9 x 9 token grid: pooling needs sides it divides. The log says
    so once per run, the report counts every call."""
    arch = "sd3"
    model = build_model(arch)
    latent = _latent(arch, size=(18, 18))
    plain = sample(model, *_prompts(arch), latent, steps=STEPS)
    clear = pack_import("nodes.clear").ClearAttention.execute(model, 2, 0.25, "2 x 2", 1, 0.0, 1.0, "").result[0]
    with caplog.at_level("INFO"):
        assert torch.equal(sample(clear, *_prompts(arch), latent, steps=STEPS), plain)
    (reason,) = _report(clear).stood_aside
    assert "pool=2 must divide the image height and width, got 9 x 9" in reason
    assert _report(clear).stood_aside[reason] == 3 * STEPS
    logged = [line for line in caplog.messages if line.startswith("FastAttn: a technique stood aside")]
    assert len(logged) == 1 and reason in logged[0]


def _without_cond_or_uncond(apply_model, args: dict) -> torch.Tensor:
    """An extension calling the model itself, without the batch's conditioning roles."""
    c = dict(args["c"])
    c["transformer_options"] = {key: value for key, value in c["transformer_options"].items()
                                if key != "cond_or_uncond"}
    return apply_model(args["input"], args["timestep"], **c)


def _with_a_row_more(apply_model, args: dict) -> torch.Tensor:
    """An extension that adds a row to the batch (here a copy of the first) and drops its output."""
    batch = args["input"].shape[0]

    def grown(value):
        return torch.cat([value, value[:1]]) if isinstance(value, torch.Tensor) and value.shape[:1] == (batch,) else value

    c = {key: grown(value) for key, value in args["c"].items()}
    return apply_model(grown(args["input"]), grown(args["timestep"]), **c)[:batch]


@pytest.mark.parametrize(("wrapper", "reason"), [
    (_without_cond_or_uncond, "a model call without cond_or_uncond"),
    (_with_a_row_more, "a model call whose batch does not split into its cond_or_uncond chunks"),
])
def test_stands_aside_for_a_call_without_conditioning_chunks(wrapper, reason):
    arch = "sd3"
    model = build_model(arch)
    model.set_model_unet_function_wrapper(wrapper)
    plain = sample(model, *_prompts(arch), _latent(arch), steps=STEPS)
    patched = patched_with_nodes(model, WINDOW_AND_SHARING)
    assert torch.equal(sample(patched, *_prompts(arch), _latent(arch), steps=STEPS), plain)
    assert _stood_aside(patched, reason) == 3 * STEPS


CHUNK = ("c", (), "cpu", 0)


def _one_call(method, func, q, k, v, heads: int, cache: dict | None = None, **kwargs):
    """One attention call through `method` as the runtime makes it: an image-only call on a 4 x 6 grid
    at step 1 of 2, with the run's cache holding `cache`."""
    call_module, site_module, state = (pack_import(f"patching.{name}") for name in ("call", "site", "state"))
    kernels = pack_import("kernels")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = state.SamplingRun(patching.AttentionPatch(method, adapter), linear_timeline(2))
    run.cache.update(cache or {})
    site = site_module.CallSite(1, linear_timeline(2), 0, "image", kernels.TokenLayout(0, (4, 6)), (0,), (CHUNK,), (0,),
                           (torch.zeros(1),))
    call = call_module.AttentionCall(func, (q, k, v, heads), {"skip_reshape": True, "skip_output_reshape": True,
                                                             **kwargs}, None)
    out, _, technique = method(call, site, run)
    return out, technique, run.report.stood_aside


def _sdpa(q, k, v, heads, scale=None, enable_gqa=False, **kwargs):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=enable_gqa)


def test_stands_aside_for_what_a_newer_host_passes_that_the_pack_does_not_know():
    """`scale`, `enable_gqa` and `low_precision_attention` are honoured; tensor containers, objects
    without a shape and unknown arguments run as the host runs them."""
    schedule_module = pack_import("patching.schedule")
    window_only = schedule_module.Schedule((schedule_module.WindowResidual(
        schedule_module.WindowSize("band", fraction=1.0), refresh_every=2, residual=False),))
    method = pack_import("patching.ditfastattn").DiTFastAttn(window_only, backend="torch")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 24, 16, generator=gen) for _ in range(3))

    out, technique, _ = _one_call(method, _sdpa, q, k, v, 4, scale=0.3, low_precision_attention=False)
    assert technique == "window"
    _assert_close(out, _sdpa(q, k, v, 4, scale=0.3), 1e-5)

    k2, v2 = k[:, :2], v[:, :2]  # grouped-query attention: 2 key/value heads for 4 query heads
    out, technique, _ = _one_call(method, _sdpa, q, k2, v2, 4, enable_gqa=True)
    assert technique == "window"
    _assert_close(out, _sdpa(q, k2, v2, 4, enable_gqa=True), 1e-5)

    class Container:  # a newer host's tensor container: only the host's own backend can read it
        def __init__(self, tensor):
            self.tensor = tensor
            self.shape = tensor.shape

    def unwrapping(q, k, v, heads, **kwargs):
        return _sdpa(q.tensor, k.tensor, v.tensor, heads)

    out, technique, stood_aside = _one_call(method, unwrapping, Container(q), Container(k), Container(v), 4)
    assert technique == "full" and list(stood_aside) == ["q/k/v passed as tensor containers"]
    assert torch.equal(out, _sdpa(q, k, v, 4))

    out, technique, stood_aside = _one_call(method, _sdpa, q, k, v, 4, cu_seqlens=None)
    assert technique == "full" and list(stood_aside) == ["unknown attention arguments cu_seqlens"]
    assert torch.equal(out, _sdpa(q, k, v, 4))

    state = pack_import("patching.state")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = state.SamplingRun(patching.AttentionPatch(None, adapter), linear_timeline(1))
    forward = state.ForwardPass(run, 0, (0,), ("c",), grid=(4, 6), text_len=0, previous_override=None)
    opaque = type("Opaque", (), {"tensor": q})()
    out = forward(lambda q, k, v, heads, **kwargs: q.tensor * 2, opaque, opaque, opaque, 2, transformer_options={})
    assert torch.equal(out, q * 2) and forward.layers == 1
    assert run.report.stood_aside == {"q/k/v passed as objects without a shape": 1}


def test_a_text_only_call_as_long_as_the_image_is_not_taken_for_image():
    state = pack_import("patching.state")
    adapter = patching.adapter_for(build_model("sd3").model.diffusion_model)
    run = state.SamplingRun(patching.AttentionPatch(None, adapter), linear_timeline(1))
    forward = state.ForwardPass(run, 0, (0,), ("c",), grid=(4, 4), text_len=16, previous_override=None)
    assert forward._classify(16, 16) == ("unknown", None)
    assert forward._classify(32, 32)[0] == "joint"


def test_sampling_on_a_gpu_without_triton_runs_the_torch_tiles(monkeypatch):
    """A non-CPU device without Triton, simulated: every window call resolves "auto" for a CUDA device
    while Triton is missing. Sampling runs the torch tiles from the first call on, no exception, and
    gives the reference's result."""
    backends, attention = pack_import("kernels.backends"), pack_import("kernels.attention")
    monkeypatch.setattr(backends, "_importable", lambda needs: needs != "triton")
    backends._device_backend.cache_clear()
    chosen = []

    def on_a_gpu(name, device):
        chosen.append(backends.choose_backend(name, torch.device("cuda")))
        return chosen[-1]

    monkeypatch.setattr(attention, "choose_backend", on_a_gpu)
    arch = "flux"
    model = build_model(arch)
    positive, negative = _prompts(arch)
    chain = [{"technique": "window", "shape": "circle", "tokens": 3}, {"technique": "cfg"}]
    try:
        out = sample(patched_with_nodes(model, chain), positive, negative, _latent(arch), steps=STEPS)
    finally:
        backends._device_backend.cache_clear()
    assert chosen and set(chosen) == {"torch"}
    _assert_close(out, sample(reference_model(model, chain, arch), positive, negative, _latent(arch), steps=STEPS))
