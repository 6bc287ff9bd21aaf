"""Is the demo model's attention learned? Per layer, the share of attention mass that image
queries put on image keys inside a local window, against the share a uniform map would put
there, at the trained resolution (16 x 16 tokens) and at 64 x 64 = 4096 tokens. Measured
while ComfyUI's KSampler samples (CFG, both batch halves, every step), through the attention
override the pack itself hooks. The same samples make the README's grid.

    .venv/bin/python tests/benchmarks/run_all.py demo_attention
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `harness`, also when run directly

from harness import pack_import  # noqa: E402  (loads the host first)
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

# isort: split
import nodes  # noqa: E402  (ComfyUI's, importable once the harness has loaded the host)

demo = pack_import("demo")
codec = pack_import("demo.codec")
demo_nodes = pack_import("nodes.demo")

RADIUS = 3  # window = (2 * RADIUS + 1)^2 tokens around the query, as a window-attention method would use
TEXT_TOKENS = 16  # SD3 joint attention: the caption's tokens come first
STEPS, CFG, SEED = 20, 4.0, 1
SIDES = {"trained (16x16 tokens)": 32, "4096 tokens (64x64)": 128}  # latent side
CAPTIONS = [
    "a red circle and a blue square on a striped green background",
    "a big yellow triangle on a purple background",
    "a white cross and an orange circle on a checkered black background",
    "a small green square on a dotted blue background",
]
GRID_PATH = HERE.parents[1] / "docs" / "demo_samples.png"


class LocalityMeter:
    """Attention override that measures window mass per layer and calls the real attention."""

    def __init__(self, side: int) -> None:
        self.grid = side // 2  # tokens per side (patch size 2)
        self.layer = 0
        self.mass: dict[int, list[float]] = {}
        self.uniform: dict[int, float] = {}

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        layer = self.layer % 4  # one joint attention per block, four blocks per forward
        self.layer += 1
        mass, uniform = self._measure(q, k, heads)
        self.mass.setdefault(layer, []).append(mass)
        self.uniform[layer] = uniform
        return func(q, k, v, heads, *args, **kwargs)

    @torch.no_grad()
    def _measure(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> tuple[float, float]:
        b, n, width = q.shape
        q = q.float().view(b, n, heads, -1).transpose(1, 2)
        k = k.float().view(b, n, heads, -1).transpose(1, 2)
        rows = torch.arange(self.grid * self.grid)
        y, x = rows // self.grid, rows % self.grid
        inside_sum = share_sum = 0.0
        for start in range(0, len(rows), 1024):
            chunk = rows[start:start + 1024]
            probs = torch.softmax(q[:, :, TEXT_TOKENS + chunk] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
            window = ((y[chunk, None] - y).abs() <= RADIUS) & ((x[chunk, None] - x).abs() <= RADIUS)
            inside_sum += (probs[..., TEXT_TOKENS:] * window).sum(-1).mean((0, 1)).sum().item()
            share_sum += (window.sum(-1) / n).sum().item()
        return inside_sum / len(rows), share_sum / len(rows)


def sample(model, caption: str, side: int, meter: LocalityMeter) -> torch.Tensor:
    patched = model.clone()
    patched.model_options["transformer_options"]["optimized_attention_override"] = meter
    encode = demo_nodes.FastAttnDemoTextEncode.execute
    latent = {"samples": torch.zeros(1, codec.LATENT_CHANNELS, side, side)}
    (out,) = nodes.common_ksampler(patched, SEED, STEPS, CFG, "euler", "simple",
                                   encode(caption).result[0], encode("").result[0], latent)
    return demo_nodes.FastAttnDemoDecode.execute(out).result[0][0]


def save_grid(rows: dict[str, list[torch.Tensor]], path: Path, cell: int = 256) -> None:
    """Captions across, resolutions down; small samples shown enlarged with nearest pixels."""
    label_h, caption_h = 150, 60
    sheet = Image.new("RGB", (label_h + cell * len(CAPTIONS), caption_h + cell * len(rows)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=13)
    for c, caption in enumerate(CAPTIONS):
        words, lines = caption.split(), []
        while words:
            lines.append(" ".join(words[:5]))
            words = words[5:]
        draw.multiline_text((label_h + c * cell + 6, 4), "\n".join(lines), fill="black", font=font)
    for r, (label, images) in enumerate(rows.items()):
        draw.multiline_text((6, caption_h + r * cell + cell // 2 - 10), label.replace(" (", "\n("), fill="black", font=font)
        for c, image in enumerate(images):
            tile = Image.fromarray((image.numpy() * 255).round().astype("uint8")).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_h + c * cell, caption_h + r * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    torch.set_num_threads(2)
    model = demo_nodes.load_demo_model()
    window = (2 * RADIUS + 1) ** 2
    print(f"Share of image-query attention on image keys within a {2 * RADIUS + 1}x{2 * RADIUS + 1} token "
          f"window; {len(CAPTIONS)} captions x {STEPS} euler steps, CFG {CFG}, both batch halves.\n")
    print("| resolution | layer | learned share | uniform share | learned / uniform |")
    print("|---|---|---|---|---|")
    rows: dict[str, list[torch.Tensor]] = {}
    for label, side in SIDES.items():
        meters = [LocalityMeter(side) for _ in CAPTIONS]
        rows[label] = [sample(model, caption, side, meter) for caption, meter in zip(CAPTIONS, meters, strict=True)]
        for layer in range(4):
            learned = sum(sum(m.mass[layer]) / len(m.mass[layer]) for m in meters) / len(meters)
            uniform = meters[0].uniform[layer]
            print(f"| {label} | {layer} | {learned:.3f} | {uniform:.3f} | {learned / uniform:.1f}x |")
    save_grid(rows, GRID_PATH)
    print(f"\n{window}-token window. Samples: {GRID_PATH.relative_to(HERE.parents[1])}")


if __name__ == "__main__":
    main()
