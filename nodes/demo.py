"""Nodes for the shipped demo model (an SD3-class MMDiT trained on procedural scenes).

They sit in their own category, marked as the demo's, and their weights are loaded by the demo's
own loader from the pack's folder, so that neither appears in the model lists of a user who came
for another model. The loader offers the demo DiT (SD3-class) and the demo U-Net (SD 1.5 layout,
for DeepCache; demo/train_unet.py), each loaded as ComfyUI's UNETLoader loads a diffusion model
file. The other nodes are the pieces SD3's and SD 1.5's stock nodes cannot provide: the caption
encoders (the U-Net's context zero-padded to SD 1.5's 768) and the latent -> image codec (the DiT's
latent is a 2x2 space-to-depth of the pixels, so an EmptySD3LatentImage of 1024 x 1024 gives a
256 x 256 image with 64 x 64 = 4096 tokens; the U-Net's 4-channel latent holds 4 x 4 pixel cells).
"""

from __future__ import annotations

import functools

import comfy.sd
import torch
from comfy_api.latest import io

from ..demo import DEMO_MODELS, DIT_FILE, TEXT_FILE, UNET_TEXT_FILE, WEIGHTS_DIR, codec, scenes
from ..demo.text_encoder import DemoTextEncoder
from ..demo.train_unet import pad_context

CATEGORY = "FastAttn/demo (example models)"


def load_demo_model(file: str = DIT_FILE) -> io.Model.Type:
    """A demo model as ComfyUI's UNETLoader loads a diffusion model file (detected as SD3 or SD 1.5)."""
    return comfy.sd.load_diffusion_model(str(WEIGHTS_DIR / file))


@functools.cache
def _text_encoder(file: str = TEXT_FILE) -> DemoTextEncoder:
    """Loaded once on first use: 1 MB, CPU."""
    return DemoTextEncoder.load(WEIGHTS_DIR / file)


class FastAttnDemoLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnDemoLoader",
            display_name="FastAttn Demo Model Loader",
            description="Loads a small demo model shipped with the pack (an SD3-class diffusion transformer, or an "
                        "SD 1.5-layout U-Net for DeepCache, trained on procedural scenes), for trying the FastAttn "
                        "nodes without downloading a model.",
            category=CATEGORY,
            inputs=[io.Combo.Input("model", options=list(DEMO_MODELS), default=next(iter(DEMO_MODELS)),
                                   tooltip="The demo DiT (for the attention nodes) or the demo U-Net (for DeepCache).")],
            outputs=[io.Model.Output(tooltip="The demo model, sampled by the stock KSampler like SD3 or SD 1.5.")],
        )

    @classmethod
    def execute(cls, model: str) -> io.NodeOutput:
        if model not in DEMO_MODELS:
            raise ValueError(f"FastAttn Demo Model Loader: no demo model {model!r}; choose one of {', '.join(DEMO_MODELS)}.")
        return io.NodeOutput(load_demo_model(DEMO_MODELS[model]))


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
        return io.NodeOutput(_text_encoder().conditioning(caption))


class FastAttnDemoUNetTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        schema = FastAttnDemoTextEncode.define_schema()
        schema.node_id = "FastAttnDemoUNetTextEncode"
        schema.display_name = "FastAttn Demo Text Encode (U-Net)"
        schema.description = ("Encodes a caption for the FastAttn demo U-Net (loaded by FastAttn Demo Model Loader), "
                              "with its own caption encoder, as SD 1.5's cross-attention context.")
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
            category=CATEGORY,
            inputs=[io.Latent.Input("samples", tooltip="A latent sampled with a demo model: 16 channels (the DiT) or "
                                                       "4 (the U-Net).")],
            outputs=[io.Image.Output(tooltip="The image: twice the latent's width and height (the DiT), four times "
                                             "(the U-Net); one per frame of a video latent.")],
        )

    @classmethod
    def execute(cls, samples: io.Latent.Type) -> io.NodeOutput:
        latents = codec.flatten_frames(samples["samples"])
        decoders = {codec.LATENT_CHANNELS: codec.decode, codec.CELL_CHANNELS: codec.decode_cells}
        if latents.ndim != 4 or latents.shape[1] not in decoders:
            raise ValueError(
                f"FastAttnDemoDecode expects a [batch, {codec.LATENT_CHANNELS}, height, width] latent from the "
                f"demo model (or [batch, {codec.CELL_CHANNELS}, height, width] from the demo U-Net; a video latent "
                f"with frames after the channels), got shape {list(samples['samples'].shape)}."
            )
        return io.NodeOutput(decoders[latents.shape[1]](latents.float().cpu()).movedim(1, -1))


DEMO_NODES: list[type[io.ComfyNode]] = [FastAttnDemoLoader, FastAttnDemoTextEncode, FastAttnDemoUNetTextEncode,
                                         FastAttnDemoDecode]
