"""Compare Images: what a technique cost in quality, in the graph. The unpatched model's image
and the patched one's -> a side-by-side (and / or difference) picture and PSNR / SSIM."""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io, ui

from ..metrics import Scores, difference, score_batch

VIEWS = ("side by side", "difference", "side by side + difference")


def _db(value: float) -> str:
    return "inf dB (identical)" if math.isinf(value) else f"{value:.2f} dB"


def report_text(scores: list[Scores], width: int, height: int) -> str:
    """PSNR / SSIM of each image against its reference (and the batch mean when several)."""
    lines = [f"image {index + 1}: PSNR {_db(s.psnr)}, SSIM {s.ssim:.4f}" for index, s in enumerate(scores)]
    if len(scores) > 1:
        lines.append(f"mean: PSNR {_db(sum(s.psnr for s in scores) / len(scores))}, "
                     f"SSIM {sum(s.ssim for s in scores) / len(scores):.4f}")
    return f"image vs. reference, {width} x {height} px\n" + "\n".join(lines)


class CompareImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnCompare",
            display_name="Compare Images (PSNR / SSIM)",
            category="FastAttn",
            description="What a technique cost in quality: the patched model's images against the unpatched "
                        "model's (same seed, prompt and size), image by image. Shows PSNR (dB; inf when identical) "
                        "and SSIM (1 when identical) on the node and returns a side-by-side and / or difference "
                        "picture.",
            inputs=[
                io.Image.Input("reference", tooltip="The reference images: the unpatched model's output."),
                io.Image.Input("image", tooltip="The images to score: the patched model's output, same size and "
                                                "batch size as the reference."),
                io.Combo.Input("view", options=list(VIEWS), default=VIEWS[0],
                               tooltip="The picture returned: reference | image side by side, the difference "
                                       "|image - reference| x difference_gain, or all three in a row."),
                io.Float.Input("difference_gain", default=4.0, min=1.0, max=100.0, step=0.5,
                               tooltip="The difference picture is |image - reference| times this (clipped to "
                                       "white), so small errors show."),
            ],
            outputs=[
                io.Image.Output(display_name="comparison", tooltip="The picture chosen by view, one per image."),
                io.String.Output(display_name="report", tooltip="PSNR and SSIM as text (also shown on the node)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reference: torch.Tensor, image: torch.Tensor, view: str, difference_gain: float) -> io.NodeOutput:
        scores = score_batch(image, reference)
        panels = {"side by side": [reference, image], "difference": [difference(image, reference, difference_gain)]}
        panels["side by side + difference"] = panels["side by side"] + panels["difference"]
        comparison = torch.cat([panel.float() for panel in panels[view]], dim=2)
        text = report_text(scores, image.shape[2], image.shape[1])
        shown = {**ui.PreviewImage(comparison, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
        return io.NodeOutput(comparison, text, ui=shown)


COMPARE_NODES: list[type[io.ComfyNode]] = [CompareImages]
