"""Nodes for the shipped demo model (an SD3-class MMDiT trained on procedural scenes).

They sit in their own category, marked as the demo's, and the model's weights are loaded by the
demo's own loader from the pack's folder, so that neither appears in the model lists of a user who
came for another model. Besides its loader, these are the two pieces SD3's stock nodes cannot
provide for it: its caption encoder and its latent -> image codec (the model's latent is a 2x2
space-to-depth of the pixels, so an EmptySD3LatentImage of 1024 x 1024 gives a 256 x 256 image
with 64 x 64 = 4096 tokens).
"""

from __future__ import annotations

import functools

import comfy.sd
import torch
from comfy_api.latest import io

from ..demo import DIT_FILE, TEXT_FILE, WEIGHTS_DIR, codec, scenes
from ..demo.text_encoder import DemoTextEncoder

CATEGORY = "FastAttn/demo (example models)"


def load_demo_model() -> io.Model.Type:
    """The demo model as ComfyUI's UNETLoader loads a diffusion model file (detected as SD3)."""
    return comfy.sd.load_diffusion_model(str(WEIGHTS_DIR / DIT_FILE))


@functools.cache
def _text_encoder() -> DemoTextEncoder:
    """Loaded once on first use: 1 MB, CPU."""
    return DemoTextEncoder.load(WEIGHTS_DIR / TEXT_FILE)


class FastAttnDemoLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnDemoLoader",
            display_name="FastAttn Demo Model Loader",
            description="Loads the small demo model shipped with the pack (an SD3-class diffusion transformer "
                        "trained on procedural scenes), for trying the FastAttn nodes without downloading a model.",
            category=CATEGORY,
            inputs=[],
            outputs=[io.Model.Output(tooltip="The demo model, sampled by the stock KSampler like SD3.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(load_demo_model())


class FastAttnDemoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        vocabulary = " ".join(scenes.vocabulary())
        return io.Schema(
            node_id="FastAttnDemoTextEncode",
            display_name="FastAttn Demo Text Encode",
            description="Encodes a caption for the FastAttn demo model (loaded by FastAttn Demo Model Loader).",
            category=CATEGORY,
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


class FastAttnDemoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnDemoDecode",
            display_name="FastAttn Demo Decode",
            description="Turns a FastAttn demo model latent into an image (the exact inverse of its "
                        "pixel-to-latent rearrangement; no VAE involved).",
            category=CATEGORY,
            inputs=[io.Latent.Input("samples", tooltip="A 16-channel latent sampled with the demo model.")],
            outputs=[io.Image.Output(tooltip="The image, twice the latent's width and height.")],
        )

    @classmethod
    def execute(cls, samples: io.Latent.Type) -> io.NodeOutput:
        latents = samples["samples"]
        if latents.ndim != 4 or latents.shape[1] != codec.LATENT_CHANNELS:
            raise ValueError(
                f"FastAttnDemoDecode expects a [batch, {codec.LATENT_CHANNELS}, height, width] latent from the "
                f"demo model, got shape {list(latents.shape)}."
            )
        return io.NodeOutput(codec.decode(latents.float().cpu()).movedim(1, -1))


DEMO_NODES: list[type[io.ComfyNode]] = [FastAttnDemoLoader, FastAttnDemoTextEncode, FastAttnDemoDecode]
