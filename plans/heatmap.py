"""A plan as a picture: technique per layer (rows) x step (columns), a legend with each
technique's share of the cells, the attention FLOPs the plan keeps and, for a budget plan, its check
(schema.Plan.check_summary). A per-head cell is filled in its window colour up to the share of the
layer's heads it windows, grey above. Steps skipped by step reuse are marked in a strip above their
column (the whole model skipped)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .schema import TECHNIQUE_LABELS, TECHNIQUES, Plan

COLOURS = {
    "full": (90, 90, 90),
    "full+asc": (70, 130, 220),
    "wars": (60, 170, 90),
    "wars+asc": (30, 200, 200),
    "ast": (240, 150, 40),
    "block": (200, 60, 60),
}
STEP_REUSE_COLOURS = {"reuse": (150, 60, 200), "forecast": (220, 80, 160)}
BACKGROUND, INK = (255, 255, 255), (20, 20, 20)
MARGIN, LABEL_WIDTH, FONT_SIZE = 16, 70, 14


def render_heatmap(plan: Plan) -> Image.Image:
    steps, layers = plan.steps, len(plan.fingerprint.layers)
    cell = int(max(6, min(36, 640 / max(steps, layers))))
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 6
    grid_width, grid_height = cell * steps, cell * layers
    check = plan.check_summary()
    width = max(MARGIN * 2 + LABEL_WIDTH + grid_width, 520, MARGIN * 2 + math.ceil(font.getlength(check or "")))
    strip = cell // 2 + 2 if plan.reuses_steps else 0  # the step reuse strip above the grid
    title_height = (3 if check else 2) * line + MARGIN + strip
    legend_top = title_height + grid_height + line + MARGIN
    legend_lines = len(TECHNIQUES) + (1 if plan.per_head else 0) + (len(STEP_REUSE_COLOURS) if strip else 0)
    height = legend_top + line * legend_lines + MARGIN
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    info = plan.calibration
    draw.text((MARGIN, MARGIN // 2), f"{plan.fingerprint.architecture}: {steps} steps x {layers} attention layers, "
              f"{info.mode or 'plan'}{' per head' if plan.per_head else ''} delta {info.delta:g}", fill=INK, font=font)
    draw.text((MARGIN, MARGIN // 2 + line), f"attention FLOPs kept: {plan.flops_kept:.1%} of full", fill=INK, font=font)
    if check:
        draw.text((MARGIN, MARGIN // 2 + 2 * line), check, fill=INK, font=font)
    left, top = MARGIN + LABEL_WIDTH, title_height
    for step, row in enumerate(plan.methods):
        for layer, name in enumerate(row):
            x, y = left + step * cell, top + layer * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=COLOURS[name], outline=BACKGROUND)
            unwindowed = round((cell - 2) * (1 - plan.windowed_share(step, layer)))
            if plan.heads_of(step, layer) is not None and unwindowed > 0:  # some heads windowed: grey above
                draw.rectangle((x + 1, y + 1, x + cell - 2, y + unwindowed), fill=COLOURS["full"])
    for step, how in enumerate(plan.step_reuse):
        if how is not None:
            x = left + step * cell
            draw.rectangle((x, top - strip, x + cell - 1, top - 3), fill=STEP_REUSE_COLOURS[how])
    label_every = max(1, round(FONT_SIZE / cell))
    for layer in range(0, layers, label_every):
        kind = plan.fingerprint.layers[layer].kind
        draw.text((MARGIN, top + layer * cell + max(0, (cell - FONT_SIZE) // 2)), f"{layer} {kind}", fill=INK, font=font)
    draw.text((left, top + grid_height + 2), "step 0  ->  last step (rows: attention layers)", fill=INK, font=font)
    counts = plan.counts()
    total = max(1, sum(counts.values()))
    for index, name in enumerate(TECHNIQUES):
        y = legend_top + index * line
        draw.rectangle((MARGIN, y + 2, MARGIN + FONT_SIZE, y + 2 + FONT_SIZE), fill=COLOURS[name])
        draw.text((MARGIN + FONT_SIZE + 8, y), f"{TECHNIQUE_LABELS[name]}: {counts[name] / total:.0%} of cells", fill=INK, font=font)
    y = legend_top + len(TECHNIQUES) * line
    if plan.per_head:
        draw.text((MARGIN, y), "part-filled cell: window on that share of heads, full on the rest", fill=INK,
                  font=font)
        y += line
    for how, colour in STEP_REUSE_COLOURS.items() if strip else ():
        draw.rectangle((MARGIN, y + 2, MARGIN + FONT_SIZE, y + 2 + FONT_SIZE // 2), fill=colour)
        shown = "prediction reused" if how == "reuse" else "prediction forecast"
        draw.text((MARGIN + FONT_SIZE + 8, y), f"step skipped, {shown} (strip above the column): "
                  f"{plan.step_reuse.count(how)} of {steps} steps", fill=INK, font=font)
        y += line
    return image


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE: [1, H, W, 3] floats in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
