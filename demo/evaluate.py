"""Caption fidelity of a demo model on held-out captions (never trained on), at several sizes.

    .venv/bin/python demo/evaluate.py --tokens 1024 4096 --captions 32 --grid output/grid.png

samples each held-out caption through ComfyUI's own loader and sampler (20 steps, euler,
CFG 5, an empty negative, seed = the caption's index), decodes it and scores it against the
scene's ground truth (fidelity.py). `--model` / `--text` score other weights (a training run's
folder, or the v1 SD3-class files of an older commit); the latent is made for whichever
architecture the loader detects.
"""

if __name__ == "__main__" and not __package__:  # `python demo/evaluate.py`: enter as a pack module
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standalone import run

    run("demo.evaluate", sys.argv[1:])
    raise SystemExit(0)

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from . import DIT_FILE, TEXT_FILE, WEIGHTS_DIR, codec, fidelity, scenes  # noqa: E402
from .text_encoder import DemoTextEncoder  # noqa: E402

SAMPLER = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple"}


def empty_latent(model, tokens_per_side: int, batch: int = 1) -> dict:
    """The empty latent the demo model's workflows make (one frame for a video model)."""
    side = tokens_per_side * 2  # patch 2 x 2
    frames = (1,) if model.model.latent_format.latent_dimensions == 3 else ()
    return {"samples": torch.zeros(batch, codec.LATENT_CHANNELS, *frames, side, side)}


def generate(model, text: DemoTextEncoder, caption: str, tokens_per_side: int, seed: int,
             sampler: dict = SAMPLER) -> torch.Tensor:
    """One image [H, W, 3] in [0, 1] through ComfyUI's KSampler path with CFG and an empty negative."""
    import nodes

    (out,) = nodes.common_ksampler(model, seed, sampler["steps"], sampler["cfg"], sampler["sampler_name"],
                                   sampler["scheduler"], text.conditioning(caption), text.conditioning(""),
                                   empty_latent(model, tokens_per_side))
    return codec.decode(out["samples"].float())[0].permute(1, 2, 0)


def evaluate(model_file: Path, text_file: Path, tokens: list[int], captions: int,
             grid: Path | None = None) -> dict[int, float]:
    """Mean caption fidelity per image-token count; optionally a grid (rows: sizes, columns: captions)."""
    import comfy.sd

    model = comfy.sd.load_diffusion_model(str(model_file))
    text = DemoTextEncoder.load(text_file)
    held_out = scenes.held_out_scenes(captions)
    means, rows = {}, []
    for count in tokens:
        side = math.isqrt(count)
        start, values, images = time.time(), [], []
        for index, scene in enumerate(held_out):
            image = generate(model, text, scene.caption, side, seed=index)
            values.append(fidelity.score(image, scene))
            images.append(image)
        means[count] = sum(values) / len(values)
        print(f"{count} image tokens: caption fidelity {means[count]:.3f} over {len(values)} held-out captions "
              f"(min {min(values):.2f}; {time.time() - start:.0f} s)", flush=True)
        rows.append(images)
    if grid is not None:
        save_grid(rows, grid)
    return means


def save_grid(rows: list[list[torch.Tensor]], path: Path, columns: int = 8) -> None:
    """Images [H, W, 3] (rows of different sizes) resized to the largest and tiled, 8 per row."""
    import torch.nn.functional as F
    from PIL import Image

    size = max(image.shape[0] for row in rows for image in row)
    tiles = [F.interpolate(image.permute(2, 0, 1)[None], size=(size, size), mode="nearest")[0]
             for row in rows for image in row[:columns]]
    per_row = min(columns, len(rows[0]))
    lines = [torch.cat(tiles[i:i + per_row], dim=2) for i in range(0, len(tiles), per_row)]
    picture = torch.cat(lines, dim=1).permute(1, 2, 0).mul(255).round().byte().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR / DIT_FILE)
    parser.add_argument("--text", type=Path, default=WEIGHTS_DIR / TEXT_FILE)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="image tokens (square grids)")
    parser.add_argument("--captions", type=int, default=32, help="held-out captions to sample")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=Path, default=None, help="save the first 8 images of each size here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluate(args.model, args.text, args.tokens, args.captions, args.grid)
