"""start / end percent are noise levels, as ComfyUI's own nodes read them (percent_to_sigma against
the sigma sampled): a KSamplerAdvanced split, denoise below 1 and custom sigmas put each technique
at the noise levels the user set. Sampled through the host's own sampler nodes, against the pack
run in one sampler and against the independent float64 reference (`harness.reference_schedule`)."""

from __future__ import annotations

import nodes
import pytest
import torch
from comfy_extras import nodes_custom_sampler
from harness import pack_import
from harness.chains import patched_with_nodes
from harness.models import build_model, conditioning, empty_latent, linear_timeline
from harness.reference_schedule import reference_model

patching = pack_import("patching")
Timeline = pack_import("patching.timeline").Timeline
ARCH = "sd3"  # flow sampling with shift 3: 8 simple steps start at sigma 1, .95, .9, .83, .75, .64, .5, .3
STEPS, SPLIT = 8, 4
# window + residual over all noise levels (refreshes at steps 0, 2, 4, 6: each half starts with one), step
# sharing within the first half (percent 0.1 - 0.45: steps 1 - 3), CFG sharing across the split (steps 2 - 7)
ACROSS_THE_SPLIT = [
    {"technique": "window", "tokens": 3, "refresh_every": 2},
    {"technique": "step", "compute_every": 2, "start": 0.1, "end": 0.45},
    {"technique": "cfg", "start": 0.25},
]


@pytest.fixture(scope="module")
def model():
    return build_model(ARCH)


def _prompts() -> tuple[list, list, dict]:
    return conditioning(ARCH, 7, seed=1), conditioning(ARCH, 7, seed=2), empty_latent(ARCH, 16, 16)


def _advanced(model, latent: dict, first: int, last: int, add_noise: bool) -> dict:
    positive, negative, _ = _prompts()
    return nodes.KSamplerAdvanced().sample(model, "enable" if add_noise else "disable", 5, STEPS, 3.0, "euler",
                                           "simple", positive, negative, latent, first, last,
                                           "enable" if last < STEPS else "disable")[0]


def _split(first_model, second_model, split: int = SPLIT) -> torch.Tensor:
    """Two KSamplerAdvanced nodes: steps 0 - split with leftover noise, then split - STEPS."""
    _, _, latent = _prompts()
    half = _advanced(first_model, latent, 0, split, add_noise=True)
    return _advanced(second_model, half, split, STEPS, add_noise=False)["samples"]


def _whole(model) -> torch.Tensor:
    return _advanced(model, _prompts()[2], 0, STEPS, add_noise=True)["samples"]


def _assert_close(out: torch.Tensor, expected: torch.Tensor, rtol: float = 2e-5) -> None:
    error = (out - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), f"max error {error:.3g} vs scale {expected.abs().max().item():.3g}"


def test_percent_is_the_models_noise_level():
    timeline = linear_timeline(6, [1.0, 0.97, 0.9, 0.7, 0.45, 0.2, 0.0])  # shift 1: percent p is sigma 1 - p
    assert timeline.steps_within(0.1, 0.55) == (2, 3)  # 0.9 is at the start, 0.45 at the end: excluded
    assert timeline.steps_within(0.0, 1.0) == tuple(range(6)) and timeline.steps_within(0.5, 0.5) == ()
    shifted = Timeline.ksampler(build_model(ARCH).get_model_object("model_sampling"), "simple", STEPS)
    assert shifted.steps_within(0.25, 1.0) == (2, 3, 4, 5, 6, 7)  # percent 0.25 is sigma 0.9 at shift 3
    tail = Timeline.of(shifted.sigmas[SPLIT:], shifted.model_sampling)  # the second sampler of a split
    assert tail.steps_within(0.25, 1.0) == (0, 1, 2, 3) and tail.steps_within(0.1, 0.45) == ()


def test_a_split_run_applies_the_techniques_at_the_same_noise_levels_as_one_sampler(model):
    patched = patched_with_nodes(model, ACROSS_THE_SPLIT)
    whole = _whole(patched)
    _assert_close(whole, _whole(reference_model(model, ACROSS_THE_SPLIT, ARCH)))
    assert (whole - _whole(model)).abs().max() > 1e-3  # the techniques change the result
    split = _split(patched, patched)
    _assert_close(split, whole)
    report = patching.patch_of(patched).last_report  # the second sampler's run
    assert report.total_steps == STEPS - SPLIT and not report.stood_aside
    assert {"full + cfg sharing", "window+residual + cfg sharing"} <= set(report.flops_by_technique)
    assert "step sharing" not in report.flops_by_technique  # its range lies in the first half


def test_a_split_restarts_the_refresh_count_in_each_sampler(model):
    """refresh_every counts each sampler's own steps in the range: the second sampler starts with a
    full step (caches live in one sampling run), so a split that falls between refreshes differs from
    one sampler, exactly as the reference's per-run rule says, and nothing stands aside."""
    chain = [{"technique": "window", "tokens": 3, "refresh_every": 3}]
    patched = patched_with_nodes(model, chain)
    split = _split(patched, patched)
    _assert_close(split, _split(reference_model(model, chain, ARCH), reference_model(model, chain, ARCH)))
    assert not patching.patch_of(patched).last_report.stood_aside
    assert (split - _whole(patched)).abs().max() > 1e-3  # one sampler refreshes at steps 0, 3, 6; the split at 0, 3, 4, 7


def test_denoise_below_one_keeps_the_noise_levels(model):
    positive, negative, latent = _prompts()

    def sampled(patched, denoise: float = 0.6) -> torch.Tensor:
        return nodes.KSampler().sample(patched, 5, STEPS, 3.0, "euler", "simple", positive, negative, latent,
                                       denoise=denoise)[0]["samples"]

    # denoise 0.6 starts near 30% of the noise schedule: a technique ending at 25% never applies
    early = patched_with_nodes(model, [{"technique": "cfg", "end": 0.25}, {"technique": "step", "end": 0.25}])
    assert torch.equal(sampled(early), sampled(model))
    assert not torch.equal(sampled(early, denoise=1.0), sampled(model, denoise=1.0))  # at denoise 1 it does
    chain = [{"technique": "window", "tokens": 3, "refresh_every": 2, "start": 0.4},
             {"technique": "cfg", "start": 0.5, "end": 0.9}]
    _assert_close(sampled(patched_with_nodes(model, chain)), sampled(reference_model(model, chain, ARCH)))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_custom_sigmas_through_sampler_custom_advanced(arch):
    model = build_model(arch)
    positive, negative = conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2)
    latent = empty_latent(arch, 16, 16)
    sigmas = torch.tensor([1.0, 0.97, 0.9, 0.7, 0.45, 0.2, 0.0])
    chain = [{"technique": "window", "tokens": 3, "refresh_every": 2, "start": 0.3},
             {"technique": "step", "compute_every": 2, "start": 0.6},
             {"technique": "cfg", "start": 0.5}]

    def sampled(patched) -> torch.Tensor:
        guider = nodes_custom_sampler.CFGGuider.execute(patched, positive, negative, 3.0).result[0]
        noise = nodes_custom_sampler.RandomNoise.execute(3).result[0]
        sampler = nodes_custom_sampler.KSamplerSelect.execute("euler").result[0]
        return nodes_custom_sampler.SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result[0][
            "samples"]

    # percent 0.3 is sigma 0.875 (SD3, shift 3) or 0.88 (FLUX, shift 1.15): the window acts from step 3 on,
    # where 30% of the six steps would have started it at step 2
    timeline = Timeline.of(sigmas, model.get_model_object("model_sampling"))
    assert timeline.steps_within(0.3, 1.0) == (3, 4, 5)
    patched = patched_with_nodes(model, chain)
    _assert_close(sampled(patched), sampled(reference_model(model, chain, arch)), rtol=2e-4)
    assert "window+residual + cfg sharing" in patching.patch_of(patched).last_report.flops_by_technique
