"""The shipped demo U-Net (SD 1.5 layout, for DeepCache) works through ComfyUI's own paths.

Loaded by the demo loader as the stock UNETLoader loads a file (detected as SD 1.5: latent format, discrete epsilon
sampling), conditioned with the pack's U-Net text-encode node and decoded with the demo decode
node; DeepCache on it samples through the stock KSampler path.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_sampling
import comfy.supported_models
import nodes
import pytest
import torch
from harness import pack_import
from safetensors.torch import load_file

demo = pack_import("demo")
codec = pack_import("demo.codec")
train_unet = pack_import("demo.train_unet")
demo_nodes = pack_import("nodes.demo")
deepcache_nodes = pack_import("nodes.deepcache")
deepcache = pack_import("patching.deepcache")


@pytest.fixture(scope="module")
def model():
    return demo_nodes.load_demo_model(demo.UNET_FILE)


def encode(caption: str) -> list:
    return demo_nodes.FastAttnDemoUNetTextEncode.execute(caption).result[0]


def test_loads_as_sd15_with_every_weight_used(model):
    base = model.model
    assert isinstance(base.model_config, comfy.supported_models.SD15)
    assert isinstance(base.latent_format, comfy.latent_formats.SD15)
    assert base.model_type == comfy.model_base.ModelType.EPS
    assert isinstance(base.model_sampling, comfy.model_sampling.ModelSamplingDiscrete)
    net = base.diffusion_model
    assert (len(net.input_blocks), net.middle_block, len(net.output_blocks)) == (2, None, 2)
    assert {k: v for k, v in base.model_config.unet_config.items() if k != "dtype"} == train_unet.UNET_CONFIG
    shipped = load_file(str(demo.WEIGHTS_DIR / demo.UNET_FILE))
    assert set(shipped) == set(net.state_dict())


def test_weights_are_the_smallest_sd15_file():
    size = sum((demo.WEIGHTS_DIR / name).stat().st_size for name in (demo.UNET_FILE, demo.UNET_TEXT_FILE))
    assert size <= 28 * 2**20  # 13.6 M float16 parameters: the floor for a file detected as SD 1.5


def test_text_encode_node_pads_to_sd15_context():
    ((context, extra),) = encode("A red circle, and a blue square on a striped green background.")
    assert context.shape == (1, 16, 768) and extra == {}
    assert context[..., 128:].abs().max() == 0 and context[..., :128].abs().max() > 0
    with pytest.raises(ValueError, match=r"dog.*vocabulary is: .*circle"):
        encode("a red dog on a blue background")


def test_cell_codec_round_trips_block_constant_images_and_decode_serves_both_latents():
    cells = torch.rand(2, 3, 5, 7)
    image = cells.repeat_interleave(codec.CELL_FACTOR, 2).repeat_interleave(codec.CELL_FACTOR, 3)
    latent = codec.encode_cells(image)
    assert latent.shape == (2, codec.CELL_CHANNELS, 5, 7)
    assert torch.allclose(latent[:, :3] * codec.SD15_SCALE, cells * 2 - 1, atol=1e-6)
    (decoded,) = demo_nodes.FastAttnDemoDecode.execute({"samples": latent}).result
    assert decoded.shape == (2, 20, 28, 3) and decoded.min() >= 0 and decoded.max() <= 1
    (dit,) = demo_nodes.FastAttnDemoDecode.execute({"samples": torch.randn(1, 16, 4, 4)}).result
    assert dit.shape == (1, 8, 8, 3)
    with pytest.raises(ValueError, match=r"\[batch, 4, height, width\].*got shape \[1, 8, 4, 4\]"):
        demo_nodes.FastAttnDemoDecode.execute({"samples": torch.randn(1, 8, 4, 4)})


def test_deepcache_on_the_demo_unet_skips_the_deep_blocks(model):
    patched = deepcache_nodes.DeepCache.execute(model, 3, 0, 0.0, 1.0, "uniform").result[0]
    latent = {"samples": torch.zeros(1, codec.CELL_CHANNELS, 16, 16)}
    (out,) = nodes.common_ksampler(patched, 0, 6, 4.0, "euler", "simple", encode("a blue square on a white background"),
                                   encode(""), latent)
    assert out["samples"].shape == (1, 4, 16, 16) and torch.isfinite(out["samples"]).all()
    report = deepcache.holder_of(patched).last_report
    assert (report.full_calls, report.shallow_calls) == (2, 4)
    assert report.blocks_skipped == 4 * 2  # input block 1 and output block 0 on each shallow call
