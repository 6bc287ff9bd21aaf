"""Models no adapter knows: a generic layout from the model's own description, windows only where the
runtime proved the token order, and a clear refusal for the models the pack cannot serve.

"Without an adapter" is made real by taking the architecture's adapter out of the registry for the test:
the model then goes through exactly the path an unknown DiT takes, and its true layout (which the
float64 reference in harness/reference_schedule.py knows) checks the proof.
"""

from __future__ import annotations

import pytest
import torch
from harness import pack_import
from harness.chains import patched_with_nodes
from harness.models import build_model, conditioning, sample, small_latent
from harness.reference_schedule import reference_model

patching = pack_import("patching")
adapters = pack_import("patching.adapters")
probe = pack_import("patching.probe")
nodes = pack_import("nodes.ditfastattn")

STEPS = 4
WINDOW = {"technique": "window", "tokens": 2}
SHARING = [{"technique": "step", "compute_every": 2, "start": 0.5}, {"technique": "cfg"}]
NOT_PROVEN = "windows need a proven token order and this model has no adapter"


def _without_adapter(monkeypatch, name: str) -> None:
    monkeypatch.setattr(adapters, "ADAPTERS", tuple(a for a in adapters.ADAPTERS if a.name != name))


def _sample(model, arch: str) -> torch.Tensor:
    return sample(model, conditioning(arch, 7, seed=1), conditioning(arch, 7, seed=2), small_latent(arch), steps=STEPS)


def _assert_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert (out - expected).abs().max() <= 2e-4 * expected.abs().max()


@pytest.mark.parametrize(("arch", "adapter"), [("flux", "Flux"), ("hunyuan_video", "HunyuanVideo")])
def test_a_model_without_an_adapter_is_served_once_its_order_is_proven(monkeypatch, arch, adapter):
    """Flux (text before the image) and HunyuanVideo (text after it, a video grid, text-only refiner calls
    before the first joint call): the proof finds each order, and windows, step and CFG sharing then
    compute what the reference computes on the true layout."""
    _without_adapter(monkeypatch, adapter)
    model = build_model(arch)
    generic = patching.adapter_for(model.model.diffusion_model)
    assert generic.name.endswith("(generic)") and not generic.layout_proven
    chain = [WINDOW, *SHARING]
    patched = patched_with_nodes(model, chain)
    _assert_close(_sample(patched, arch), _sample(reference_model(model, chain, arch), arch))
    report = patching.patch_of(patched).last_report
    assert any(technique.startswith("window") for technique in report.flops_by_technique)
    assert "step sharing" in report.flops_by_technique
    assert not any(NOT_PROVEN in reason for reason in report.stood_aside), report.stood_aside
    assert "sharing skips attention calls only (a generic layout has no branch map)" in report.summary()
    inspected = probe.profile_attention(model, conditioning(arch, 7), small_latent(arch)).to_text()
    assert f"Architecture: {generic.name}" in inspected and "text tokens: 7 (no adapter: side not proven)" in inspected


def test_windows_stand_aside_where_the_order_is_not_proven(monkeypatch):
    """Lumina 2's first self attention is its image refiner (layer 1): that order is proven, the joint
    layers' is not (attention has mixed every token by then), so only layer 1 is windowed; sharing
    applies everywhere, and the report says why the joint layers kept full attention."""
    _without_adapter(monkeypatch, "Lumina2")
    arch = "lumina2"
    model = build_model(arch)
    patched = patched_with_nodes(model, [WINDOW, *SHARING])
    out = _sample(patched, arch)
    _assert_close(out, _sample(reference_model(model, [{**WINDOW, "layers": "1"}, *SHARING], arch), arch))
    reasons = patching.patch_of(patched).last_report.stood_aside
    assert any(NOT_PROVEN in reason and "only its image calls' order was proven" in reason for reason in reasons)


def test_a_stem_that_mixes_tokens_leaves_every_window_unproven(monkeypatch):
    """A model whose patch embedding adds each token to the next moves two query rows per probed position
    (one, at the last): nothing is proven, every window stands aside (visibly), and step and CFG sharing
    still apply."""
    _without_adapter(monkeypatch, "Flux")
    arch = "flux"
    model = build_model(arch)
    embed = model.get_model_object("diffusion_model.img_in").forward
    model.add_object_patch("diffusion_model.img_in.forward",
                           lambda x: embed(x + torch.nn.functional.pad(x[:, :-1], (0, 0, 1, 0))))
    patched = patched_with_nodes(model, [WINDOW, *SHARING])
    _assert_close(_sample(patched, arch), _sample(reference_model(model, SHARING, arch), arch))
    report = patching.patch_of(patched).last_report
    assert not any(technique.startswith("window") for technique in report.flops_by_technique)
    assert any(NOT_PROVEN in reason and "moved query rows" in reason for reason in report.stood_aside)


def test_an_unrouted_model_without_an_adapter_says_nothing_was_compressed(monkeypatch):
    """Hunyuan-DiT's attention bypasses ComfyUI's override: without its adapter (which routes it) no call
    reaches the pack, and the run says so instead of pretending."""
    _without_adapter(monkeypatch, "Hunyuan-DiT")
    arch = "hunyuan_dit"
    model = build_model(arch)
    patched = patched_with_nodes(model, [WINDOW, *SHARING])
    assert torch.equal(_sample(patched, arch), _sample(model, arch))
    assert any("no attention call" in warning for warning in patching.patch_of(patched).last_report.warnings)


def test_unets_are_refused_with_deepcache_named():
    unet = build_model("sd15")
    with pytest.raises(patching.UnsupportedArchitectureError, match="UNetModel is a U-Net.*DeepCache"):
        nodes.StepSharingAttention.execute(unet, 2, 0.0, 1.0, "")
