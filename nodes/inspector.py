"""Attention Inspector: what attention costs in this model at this size, before compressing it."""

from __future__ import annotations

import comfy.sample
from comfy_api.latest import io, ui

from ..patching import patch_of
from ..patching.deepcache import holder_of
from ..patching.probe import profile_attention


class AttentionInspector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnInspector",
            display_name="Attention Inspector",
            category="FastAttn",
            description=(
                "Reports the architecture detected, every attention layer (kind, heads, head dim, tokens), "
                "the token layout (text tokens, image grid) and attention's share of the model's FLOPs at "
                "this latent size. Traces one step on fake tensors: nothing heavy is computed."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to inspect (from a model loader)."),
                io.Conditioning.Input(
                    "positive", tooltip="Conditioning as you would give the sampler: sets the number of text tokens."
                ),
                io.Latent.Input("latent", tooltip="A latent of the size you will sample (e.g. an empty latent image)."),
            ],
            outputs=[io.String.Output("report", tooltip="The report as text (also shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: io.Model.Type, positive: io.Conditioning.Type, latent: io.Latent.Type) -> io.NodeOutput:
        _check_latent(model, latent["samples"])
        report = profile_attention(model, positive, latent).to_text()
        return io.NodeOutput(report, ui=ui.PreviewText(report))


def _check_latent(model: io.Model.Type, samples) -> None:
    """The shape the sampler would accept, checked up front: a wrong latent is named here rather
    than failing as a tensor-shape error deep inside the traced forward."""
    if samples.is_nested:
        return
    samples = comfy.sample.fix_empty_latent_channels(model, samples)  # as the sampler does: empty latents adapt
    latent_format = model.get_model_object("latent_format")
    channels, dimensions = latent_format.latent_channels, latent_format.latent_dimensions
    if samples.ndim != 2 + dimensions or samples.shape[1] != channels:
        raise ValueError(
            f"Attention Inspector: this model samples latents of shape [batch, {channels}, "
            f"{', '.join(['frames', 'height', 'width'][-dimensions:])}], got {list(samples.shape)}. Connect "
            f"the empty latent node made for this model (e.g. EmptySD3LatentImage for SD3 and FLUX, "
            f"EmptyHunyuanLatentVideo for Wan).")


class AttentionReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnReport",
            display_name="Attention Report",
            category="FastAttn",
            description="What a FastAttn-patched model did in its last sampling run: the run's sampling wall "
                        "time (sampling start to end, loading the model onto the device included), attention FLOPs "
                        "computed vs. full, per technique, and for DeepCache the U-Net blocks skipped. Connect the "
                        "sampler's output so it runs after sampling.",
            inputs=[
                io.Model.Input("model", tooltip="The patched model given to the sampler."),
                io.Latent.Input("samples", tooltip="The sampler's output (only orders this node after sampling)."),
            ],
            outputs=[io.String.Output("report", tooltip="The report as text (also shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model: io.Model.Type, samples: io.Latent.Type) -> io.NodeOutput:
        holders = [holder for holder in (patch_of(model), holder_of(model)) if holder is not None]
        if not holders:
            raise ValueError("Attention Report: this model has no FastAttn patch; connect the model that a FastAttn "
                             "node returned (the one given to the sampler).")
        if any(holder.last_report is None for holder in holders):
            raise ValueError("Attention Report: the patched model has not been sampled yet; connect the sampler's "
                             "output to `samples` so this node runs after it.")
        text = "\n".join(holder.last_report.summary() for holder in holders)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


INSPECTOR_NODES: list[type[io.ComfyNode]] = [AttentionInspector, AttentionReport]
