"""Attention Inspector: what attention costs in this model at this size, before compressing it."""

from __future__ import annotations

from comfy_api.latest import io, ui

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
        report = profile_attention(model, positive, latent).to_text()
        return io.NodeOutput(report, ui=ui.PreviewText(report))
