"""Nodes for the shipped demo model (an SD3-class MMDiT trained on procedural scenes).

The model itself loads with ComfyUI's own UNETLoader: importing this module only adds the
pack's weights folder to the "diffusion_models" search path (no model work at import).
These nodes are the two pieces SD3's stock nodes cannot provide for it: its caption encoder
and its latent -> image codec (the model's latent is a 2x2 space-to-depth of the pixels, so
an EmptySD3LatentImage of 1024 x 1024 gives a 256 x 256 image with 64 x 64 = 4096 tokens).
The demo U-Net (SD 1.5 layout, for DeepCache; demo/train_unet.py) has its own text-encode node
(its own caption encoder, context zero-padded to SD 1.5's 768) and shares the decode node (its
4-channel latent holds 4 x 4 pixel cells: an EmptyLatentImage of 128 x 128 gives a 16 x 16
latent and a 64 x 64 image).
"""

from __future__ import annotations

import functools

import folder_paths
import torch
from comfy_api.latest import io

from ..demo import TEXT_FILE, UNET_FILE, UNET_TEXT_FILE, WEIGHTS_DIR, codec, scenes
from ..demo.text_encoder import DemoTextEncoder
from ..demo.train_unet import pad_context

folder_paths.add_model_folder_path("diffusion_models", str(WEIGHTS_DIR))


@functools.cache
def _text_encoder(file: str = TEXT_FILE) -> DemoTextEncoder:
    """Loaded once on first use: 1 MB, CPU."""
    return DemoTextEncoder.load(WEIGHTS_DIR / file)


class FastAttnDemoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        vocabulary = " ".join(scenes.vocabulary())
        return io.Schema(
            node_id="FastAttnDemoTextEncode",
            display_name="FastAttn Demo Text Encode",
            description="Encodes a caption for the FastAttn demo model (load it with UNETLoader: "
                        "fastattn_demo_sd3.safetensors).",
            category="FastAttn/demo",
            inputs=[
                io.String.Input(
                    "caption", multiline=True, default="a red circle and a blue square on a striped green background",
                    tooltip="A scene in the demo model's words: one or two shapes (the first named is on the "
                            "left) on a background. Leave empty for the negative prompt: the empty caption is "
                            f"the unconditional input the model was trained with. Vocabulary: {vocabulary}. "
                            "Any other word is an error.",
                ),
            ],
            outputs=[io.Conditioning.Output(tooltip="Context tokens and pooled vector, as SD3's model expects.")],
        )

    @classmethod
    def execute(cls, caption: str) -> io.NodeOutput:
        with torch.no_grad():
            context, pooled = _text_encoder().encode([caption])
        return io.NodeOutput([[context, {"pooled_output": pooled}]])


class FastAttnDemoUNetTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        schema = FastAttnDemoTextEncode.define_schema()
        schema.node_id = "FastAttnDemoUNetTextEncode"
        schema.display_name = "FastAttn Demo Text Encode (U-Net)"
        schema.description = ("Encodes a caption for the FastAttn demo U-Net (load it with UNETLoader: "
                              f"{UNET_FILE}), with its own caption encoder, as SD 1.5's cross-attention context.")
        schema.outputs = [io.Conditioning.Output(tooltip="Context tokens (zero-padded to SD 1.5's 768 features).")]
        return schema

    @classmethod
    def execute(cls, caption: str) -> io.NodeOutput:
        with torch.no_grad():
            context, _ = _text_encoder(UNET_TEXT_FILE).encode([caption])
        return io.NodeOutput([[pad_context(context), {}]])


class FastAttnDemoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnDemoDecode",
            display_name="FastAttn Demo Decode",
            description="Turns a FastAttn demo model latent into an image (the exact inverse of its "
                        "pixel-to-latent rearrangement; no VAE involved).",
            category="FastAttn/demo",
            inputs=[io.Latent.Input("samples", tooltip="A latent sampled with a demo model: 16 channels (the DiT) or "
                                                       "4 (the U-Net).")],
            outputs=[io.Image.Output(tooltip="The image: twice the latent's width and height (the DiT), four times "
                                             "(the U-Net).")],
        )

    @classmethod
    def execute(cls, samples: io.Latent.Type) -> io.NodeOutput:
        latents = samples["samples"]
        decoders = {codec.LATENT_CHANNELS: codec.decode, codec.CELL_CHANNELS: codec.decode_cells}
        if latents.ndim != 4 or latents.shape[1] not in decoders:
            raise ValueError(
                f"FastAttnDemoDecode expects a [batch, {codec.LATENT_CHANNELS}, height, width] latent from the "
                f"demo model (or [batch, {codec.CELL_CHANNELS}, height, width] from the demo U-Net), got shape "
                f"{list(latents.shape)}."
            )
        return io.NodeOutput(decoders[latents.shape[1]](latents.float().cpu()).movedim(1, -1))


DEMO_NODES: list[type[io.ComfyNode]] = [FastAttnDemoTextEncode, FastAttnDemoUNetTextEncode, FastAttnDemoDecode]
