"""The Attention Inspector: architecture, layers, layout and attention's FLOP share, traced on
fake tensors through ComfyUI's sampling path."""

from __future__ import annotations

import pytest
import torch
from harness import pack_import
from harness.models import ARCHITECTURES, SPECS, build_model, conditioning, empty_latent, expected_layers

probe = pack_import("patching.probe")
inspector = pack_import("nodes.inspector")
patching = pack_import("patching")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_profile_reports_layers_layout_and_flops(arch):
    model = build_model(arch)
    spec = SPECS[arch]
    latent = empty_latent(arch, *spec.size, frames=3 if spec.video else 1)
    profile = probe.profile_attention(model, conditioning(arch, 9), latent)

    assert profile.fake, "every supported architecture traces on fake tensors"
    layers = profile.report.layers
    assert len(layers) == sum(expected_layers(arch).values())
    expected_flops = sum(4 * r.heads * r.q_len * r.k_len * r.head_dim for r in layers)
    assert profile.attention_flops == expected_flops
    assert 0.0 < profile.attention_share < 1.0
    text = profile.to_text()
    assert profile.report.architecture in text and f"Attention layers per forward: {len(layers)}" in text
    joint = [r for r in layers if r.kind == "joint"]
    if joint and spec.joint_text is None:  # the joint text is the prompt (others: see test_runtime)
        assert joint[0].layout.text_len == 9 and "text tokens: 9" in text


def test_attention_share_grows_with_resolution():
    model = build_model("sd3")
    positive = conditioning("sd3", 9)
    small = probe.profile_attention(model, positive, empty_latent("sd3", 16, 16))
    large = probe.profile_attention(model, positive, empty_latent("sd3", 96, 96))
    assert large.attention_share > small.attention_share
    assert large.report.layers[0].layout.grid == (48, 48)


def test_inspector_node_returns_and_shows_the_report():
    model = build_model("flux")
    output = inspector.AttentionInspector.execute(model, conditioning("flux", 5), empty_latent("flux", 16, 16))
    report = output.result[0]
    assert report.startswith("Architecture: Flux")
    assert "grid 8 x 8" in report and "text tokens: 5 (before the image)" in report
    assert output.ui is not None
    assert patching.patch_of(model) is None  # the inspected model was not patched


def test_inspector_rejects_an_unsupported_model_by_name():
    model = build_model("sd3")
    unknown = model.clone()
    unknown.model = type("Holder", (), {"diffusion_model": torch.nn.Linear(2, 2)})()
    with pytest.raises(patching.UnsupportedArchitectureError, match="torch.nn.modules.linear.Linear"):
        probe.profile_attention(unknown, conditioning("sd3", 5), empty_latent("sd3", 16, 16))
