"""Branch-level sharing: shared layers skip their QKV and output projections, and compute what
call-level sharing computes (the output projection is a fixed linear map of the attention output)
and what the independent float64 reference (`harness.reference_schedule`) computes."""

from __future__ import annotations

import pytest
import torch
from harness import pack_import
from harness.chains import patched_with_nodes
from harness.models import (
    ARCHITECTURES,
    CORE_ARCHITECTURES,
    build_model,
    conditioning,
    empty_latent,
    sample,
    small_latent,
)
from harness.reference_schedule import reference_model, techniques_acted

patching = pack_import("patching")
DiTFastAttn = pack_import("patching.ditfastattn").DiTFastAttn

STEPS = 4
WAN_I2V = pytest.param("wan", {"model_type": "i2v"}, id="wan_i2v")  # two cross-attention calls per block
CALL_LEVEL_ONLY = ("cosmos",)  # its adapter maps no projections (see test_architectures_without_a_branch_map)
# every architecture the harness builds whose adapter maps the branches, and Wan's image-to-video variant
MODELS = [pytest.param(arch, {}, id=arch) for arch in ARCHITECTURES if arch not in CALL_LEVEL_ONLY] + [WAN_I2V]
CORE_MODELS = [pytest.param(arch, {}, id=arch) for arch in CORE_ARCHITECTURES] + [WAN_I2V]
STEP_AND_CFG = [{"technique": "step", "compute_every": 2}, {"technique": "cfg"}]


def _run(model, arch: str, latent: dict | None = None) -> torch.Tensor:
    latent = small_latent(arch) if latent is None else latent
    return sample(model, conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), latent, steps=STEPS)


def _call_level(model, chain: list[dict]):
    """The same schedule as the nodes build, sharing attention calls only."""
    schedule = patching.patch_of(patched_with_nodes(model, chain)).method.schedule
    return patching.install(model, DiTFastAttn(schedule, skip_branch=False))


class LinearWork:
    """Multiply-adds of every torch linear call during a block, per weight storage (= per module)."""

    def __init__(self, monkeypatch) -> None:
        self.macs: dict[int, int] = {}
        original = torch.nn.functional.linear

        def counted(x, weight, bias=None):
            key = weight.untyped_storage().data_ptr()
            self.macs[key] = self.macs.get(key, 0) + x[..., 0].numel() * weight.shape[0] * weight.shape[1]
            return original(x, weight, bias)

        monkeypatch.setattr(torch.nn.functional, "linear", counted)

    def take(self) -> dict[int, int]:
        """The work counted since the last take."""
        taken, self.macs = self.macs, {}
        return taken


def _of(macs: dict[int, int], module: torch.nn.Module) -> int:
    return macs.get(module.weight.untyped_storage().data_ptr(), 0)


@pytest.mark.parametrize(("arch", "config"), MODELS)
def test_branch_sharing_equals_call_sharing_and_skips_the_projections(arch, config, monkeypatch):
    model = build_model(arch, **config)
    work = LinearWork(monkeypatch)
    plain = _run(model, arch)
    plain_work = work.take()
    call_level = _run(_call_level(model, STEP_AND_CFG), arch)
    branch = patched_with_nodes(model, STEP_AND_CFG)
    work.take()
    out = _run(branch, arch)
    branch_work = work.take()
    reference = reference_model(model, STEP_AND_CFG, arch)  # the independent float64 implementation
    expected = _run(reference, arch)

    error = (out - expected).abs().max().item()
    assert error <= 2e-4 * expected.abs().max().item(), error
    error = (out - call_level).abs().max().item()
    assert error <= 1e-5 * call_level.abs().max().item(), error
    assert (out - plain).abs().max() > 1e-4  # sharing changed something, so the comparison means something
    assert techniques_acted(reference) == {"step", "cfg"}

    report = patching.patch_of(branch).last_report
    assert "whole attention branches" in report.summary() and report.projection_flops_saved > 0
    assert {"step sharing", "full + cfg sharing"} <= set(report.flops_by_technique)
    # only calls no technique touches: cross-attention, text-only refiners
    assert all(reason.startswith(("cross-attention", "text attention")) for reason in report.stood_aside), \
        report.stood_aside
    projections = patching.adapter_for(model.model.diffusion_model).projections(model.model.diffusion_model)
    assert projections
    mapped = {model.get_model_object(f"diffusion_model.{p.path}").weight.untyped_storage().data_ptr()
              for p in projections}
    unmapped = {key: macs for key, macs in plain_work.items() if key not in mapped}
    assert {key: branch_work.get(key) for key in unmapped} == unmapped  # MLPs, cross-attention: all computed
    for projection in projections:
        module = model.get_model_object(f"diffusion_model.{projection.path}")
        full = _of(plain_work, module)
        # 2 of 4 steps computed (step sharing), and of those, the conditional half of the batch (CFG sharing)
        if projection.branch_features is None:
            assert _of(branch_work, module) * 4 == full, projection.path
        else:  # fused: only the branch's features are skipped
            branch_share = projection.branch_features / (module.out_features if projection.role == "qkv"
                                                         else module.in_features)
            assert _of(branch_work, module) == round(full * (1 - branch_share * 3 / 4)), projection.path


@pytest.mark.parametrize(("arch", "config"), CORE_MODELS)
def test_model_is_untouched_after_branch_sharing(arch, config):
    model = build_model(arch, **config)
    _run(patched_with_nodes(model, STEP_AND_CFG), arch)
    after = _run(model, arch)
    assert torch.equal(after, _run(build_model(arch, **config), arch))
    for projection in patching.adapter_for(model.model.diffusion_model).projections(model.model.diffusion_model):
        module = model.get_model_object(f"diffusion_model.{projection.path}")
        assert not hasattr(module.forward, "fastattn_original"), projection.path


@pytest.mark.parametrize("arch", CALL_LEVEL_ONLY)
def test_architectures_without_a_branch_map_share_attention_calls_and_say_so(arch):
    model = build_model(arch)
    adapter = patching.adapter_for(model.model.diffusion_model)
    assert adapter.projections is None and adapter.call_level_only
    patched = patched_with_nodes(model, STEP_AND_CFG)
    out = _run(patched, arch)
    assert (out - _run(_call_level(model, STEP_AND_CFG), arch)).abs().max() == 0
    report = patching.patch_of(patched).last_report
    assert f"sharing skips attention calls only ({adapter.call_level_only})" in report.summary()
    assert "step sharing" in report.flops_by_technique and report.projection_flops_saved == 0


@pytest.mark.parametrize("arch", ("flux", "qwen_image"))
def test_reference_image_tokens_leave_the_layers_to_the_host(arch):
    """Edit models (Flux Kontext, Qwen-Image Edit) append reference-image tokens inside the forward: the
    projections see more tokens than the layout holds, so nothing is skipped (the attention calls, which
    cannot be placed either, run as the host runs them) instead of a failed run."""
    model = build_model(arch)
    latent = empty_latent(arch, 16, 16)
    reference = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(3))
    positive, negative = (conditioning(arch, 7, seed=seed) for seed in (1, 2))
    for cond in (positive, negative):
        cond[0][1]["reference_latents"] = [reference]
    plain = sample(model, positive, negative, latent, steps=STEPS)
    patched = patched_with_nodes(model, STEP_AND_CFG)
    out = sample(patched, positive, negative, latent, steps=STEPS)
    assert (out - plain).abs().max() <= 1e-6 * plain.abs().max()
    report = patching.patch_of(patched).last_report
    assert report.projection_flops_saved == 0
    assert any("no image grid" in reason for reason in report.stood_aside), report.stood_aside


def test_padded_image_tokens_leave_the_layers_to_the_host():
    """Z-Image pads the image tokens to a multiple of 32 inside the forward too (the adapter counts the
    padded prompt): at 8 x 9 = 72 image tokens (padded to 96) neither the image refiner nor the joint
    layers can be placed, so they run as the host runs them instead of failing or sharing wrongly."""
    arch = "zimage"
    model = build_model(arch)
    latent = empty_latent(arch, 16, 18)
    plain = _run(model, arch, latent)
    patched = patched_with_nodes(model, STEP_AND_CFG)
    assert torch.equal(_run(patched, arch, latent), plain)
    report = patching.patch_of(patched).last_report
    assert report.projection_flops_saved == 0
    assert any(reason.startswith("unknown attention call") for reason in report.stood_aside), report.stood_aside
