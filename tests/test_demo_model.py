"""The shipped demo model works through ComfyUI's own paths and has learned its captions.

Loaded with the stock UNETLoader (it must be detected as SD3: latent format, flow sampling
with shift 3.0), sampled with the stock KSampler path under CFG, conditioned and decoded
with the pack's demo nodes.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_sampling
import comfy.supported_models
import folder_paths
import nodes
import pytest
import torch
from harness import pack_import
from safetensors.torch import load_file

demo = pack_import("demo")
codec = pack_import("demo.codec")
scenes = pack_import("demo.scenes")
demo_nodes = pack_import("nodes.demo")


@pytest.fixture(scope="module")
def model():
    (patcher,) = nodes.UNETLoader().load_unet(demo.DIT_FILE, "default")
    return patcher


def encode(caption: str) -> list:
    return demo_nodes.FastAttnDemoTextEncode.execute(caption).result[0]


def generate(model, caption: str, side: int, steps: int = 12, seed: int = 0) -> torch.Tensor:
    """One image [H, W, 3] from the stock KSampler path with CFG and an empty negative."""
    latent = {"samples": torch.zeros(1, codec.LATENT_CHANNELS, side, side)}
    (out,) = nodes.common_ksampler(model, seed, steps, 4.0, "euler", "simple", encode(caption), encode(""), latent)
    return demo_nodes.FastAttnDemoDecode.execute(out).result[0][0]


def test_nodes_are_registered():
    for node_id in ("FastAttnDemoTextEncode", "FastAttnDemoDecode"):
        assert nodes.NODE_CLASS_MAPPINGS[node_id].define_schema().category == "FastAttn/demo"


def test_weights_are_small_and_visible_to_unet_loader():
    assert demo.DIT_FILE in folder_paths.get_filename_list("diffusion_models")
    size = sum((demo.WEIGHTS_DIR / name).stat().st_size for name in (demo.DIT_FILE, demo.TEXT_FILE))
    assert size <= 25 * 2**20


def test_loads_as_sd3_with_every_weight_used(model):
    base = model.model
    assert isinstance(base.model_config, comfy.supported_models.SD3)
    assert isinstance(base.latent_format, comfy.latent_formats.SD3)
    assert isinstance(base.model_sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert base.model_sampling.shift == 3.0
    net = base.diffusion_model
    assert (net.depth, net.num_heads, net.hidden_size, net.pos_embed_max_size) == (4, 4, 256, 64)
    shipped = load_file(str(demo.WEIGHTS_DIR / demo.DIT_FILE))
    assert set(shipped) == set(net.state_dict())


def test_text_encode_node_gives_sd3_conditioning():
    ((context, extra),) = encode("A red circle, and a blue square on a striped green background.")
    assert context.shape == (1, 16, 128) and extra["pooled_output"].shape == (1, 128)
    ((empty, _),) = encode("")
    assert not torch.equal(context, empty)


def test_unknown_word_names_the_vocabulary():
    with pytest.raises(ValueError, match=r"dog.*vocabulary is: .*circle"):
        encode("a red dog on a blue background")


def test_decode_node_shape_and_range():
    (image,) = demo_nodes.FastAttnDemoDecode.execute({"samples": torch.randn(2, 16, 8, 12) * 3}).result
    assert image.shape == (2, 16, 24, 3) and image.min() >= 0 and image.max() <= 1
    with pytest.raises(ValueError, match="16"):
        demo_nodes.FastAttnDemoDecode.execute({"samples": torch.zeros(1, 8, 8, 8)})  # 4 is the demo U-Net's


def test_codec_round_trips_exactly():
    eight_bit = torch.randint(0, 256, (2, 3, 32, 48)) / 255
    assert torch.equal((codec.decode(codec.encode(eight_bit)) * 255).round(), eight_bit * 255)
    rendered = scenes.render_batch([scenes.random_scene(torch.Generator().manual_seed(3))], 64)
    assert (codec.decode(codec.encode(rendered)) - rendered).abs().max() < 1e-6


def redness(image: torch.Tensor) -> torch.Tensor:
    return image[..., 0] - image[..., 2]


def test_samples_follow_colour_and_layout(model):
    red = generate(model, "a big red circle on a black background", 32)
    blue = generate(model, "a big blue circle on a black background", 32)
    assert redness(red).mean() > 0.05 > -0.05 > redness(blue).mean()
    pair = generate(model, "a red circle and a blue square on a black background", 32)
    half = pair.shape[1] // 2
    assert redness(pair[:, :half]).mean() > 0.03 > -0.03 > redness(pair[:, half:]).mean()


def test_samples_at_4096_tokens(model):
    """At 4096 tokens (no coherent scenes yet, see docs/demo.md) the caption still steers the colours."""
    yellow = generate(model, "a big yellow square on a striped yellow background", 128, steps=4)
    blue = generate(model, "a big blue square on a striped blue background", 128, steps=4)
    assert yellow.shape == blue.shape == (256, 256, 3)
    yellowness = lambda image: (image[..., 0] + image[..., 1] - 2 * image[..., 2]).mean()  # noqa: E731
    assert yellowness(yellow) > yellowness(blue) + 0.1


def test_training_stops_at_once_without_native_bfloat16(monkeypatch):
    """Emulated bfloat16 would turn the 80-minute recipe into a day: the script must say so."""
    train = pack_import("demo.train")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(SystemExit, match="no native bfloat16 matmul"):
        train.train(0, 1.0, 1.0, 1, [32], None, None)
