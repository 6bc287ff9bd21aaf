"""Nodes for the shipped demo model (a Wan-class DiT trained on procedural scenes).

The model itself loads with ComfyUI's own UNETLoader: importing this module only adds the
pack's weights folder to the "diffusion_models" search path (no model work at import).
These nodes are the two pieces the stock nodes cannot provide for it: its caption encoder
and its latent -> image codec (the model's latent is a 2x2 space-to-depth of the pixels, so
an EmptyHunyuanLatentVideo of 1024 x 1024 x 1 frame gives a 256 x 256 image with 64 x 64 =
4096 tokens).
"""

from __future__ import annotations

import functools

import folder_paths
from comfy_api.latest import io

from ..demo import DIT_FILE, TEXT_FILE, WEIGHTS_DIR, codec, scenes
from ..demo.text_encoder import DemoTextEncoder

folder_paths.add_model_folder_path("diffusion_models", str(WEIGHTS_DIR))


@functools.cache
def _text_encoder() -> DemoTextEncoder:
    """Loaded once on first use: 1 MB, CPU."""
    return DemoTextEncoder.load(WEIGHTS_DIR / TEXT_FILE)


class FastAttnDemoTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        vocabulary = " ".join(scenes.vocabulary())
        return io.Schema(
            node_id="FastAttnDemoTextEncode",
            display_name="FastAttn Demo Text Encode",
            description=f"Encodes a caption for the FastAttn demo model (load it with UNETLoader: {DIT_FILE}).",
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
            outputs=[io.Conditioning.Output(tooltip="Context tokens, as Wan's model expects them.")],
        )

    @classmethod
    def execute(cls, caption: str) -> io.NodeOutput:
        return io.NodeOutput(_text_encoder().conditioning(caption))


class FastAttnDemoDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnDemoDecode",
            display_name="FastAttn Demo Decode",
            description="Turns a FastAttn demo model latent into an image (the exact inverse of its "
                        "pixel-to-latent rearrangement; no VAE involved).",
            category="FastAttn/demo",
            inputs=[io.Latent.Input("samples", tooltip="A 16-channel latent sampled with the demo model.")],
            outputs=[io.Image.Output(tooltip="The image, twice the latent's width and height (one per frame).")],
        )

    @classmethod
    def execute(cls, samples: io.Latent.Type) -> io.NodeOutput:
        latents = samples["samples"]
        if latents.ndim not in (4, 5) or latents.shape[1] != codec.LATENT_CHANNELS:
            raise ValueError(
                f"FastAttnDemoDecode expects a [batch, {codec.LATENT_CHANNELS}, (frames,) height, width] latent "
                f"from the demo model, got shape {list(latents.shape)}."
            )
        return io.NodeOutput(codec.decode(latents.float().cpu()).movedim(1, -1))


DEMO_NODES: list[type[io.ComfyNode]] = [FastAttnDemoTextEncode, FastAttnDemoDecode]
