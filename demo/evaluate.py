"""Caption fidelity of a demo model on held-out captions (never trained on), at several sizes.

    .venv/bin/python demo/evaluate.py --tokens 1024 4096 --captions 32 --grid output/grid.png

samples each held-out caption of the shipped demo model (v1) through ComfyUI's own loader and
sampler (20 steps, euler, CFG 5, an empty negative, seed = the caption's index), decodes it and
scores it against the scene's ground truth (fidelity.py). `--model` / `--text` score other
weights (v2's from a train_wan.py run folder); the latent is made for whichever architecture
the loader detects. `--standalone` samples the Wan-class v2 model with the same sampler written
out here (standalone_sample), for a machine without ComfyUI's sampling dependencies (the device
machine); a test checks it against KSampler.
"""

if __name__ == "__main__" and not __package__:  # `python demo/evaluate.py`: enter as a pack module
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standalone import run

    run("demo.evaluate", sys.argv[1:])
    raise SystemExit(0)

import argparse  # noqa: E402
import json  # noqa: E402
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
    return codec.decode(codec.flatten_frames(out["samples"].float()))[0].permute(1, 2, 0)


def standalone_sample(dit: torch.nn.Module, text: DemoTextEncoder, caption: str, tokens_per_side: int, seed: int,
                      sampler: dict = SAMPLER) -> torch.Tensor:
    """What `generate` computes for the Wan-class demo model v2 (ComfyUI's euler, simple schedule, CFG on
    Wan's flow sampling with shift 8), without ComfyUI's sampling stack: one image [H, W, 3]."""
    from comfy.latent_formats import Wan21
    from comfy.model_sampling import time_snr_shift

    from .train_wan import SHIFT

    table = time_snr_shift(SHIFT, torch.arange(1, 1001) / 1000)  # ModelSamplingDiscreteFlow's sigmas
    steps = sampler["steps"]
    sigmas = [float(table[-(1 + int(x * len(table) / steps))]) for x in range(steps)] + [0.0]
    side = 2 * tokens_per_side
    clean = Wan21().process_in(torch.zeros(1, codec.LATENT_CHANNELS, 1, side, side))
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    device = next(dit.parameters()).device
    x = (sigmas[0] * noise + (1 - sigmas[0]) * clean).to(device)
    context = torch.cat([text.conditioning(caption)[0][0], text.conditioning("")[0][0]]).to(device)
    with torch.no_grad():
        for sigma, following in zip(sigmas, sigmas[1:], strict=False):
            velocity = dit(x.repeat(2, 1, 1, 1, 1), torch.full((2,), sigma * 1000, device=device), context).float()
            cond, uncond = (x - velocity * sigma).chunk(2)
            denoised = uncond + sampler["cfg"] * (cond - uncond)
            x = x + (x - denoised) / sigma * (following - sigma)
    return codec.decode(codec.flatten_frames(Wan21().process_out(x.cpu())))[0].permute(1, 2, 0)


def load_standalone(model_file: Path, device: str) -> torch.nn.Module:
    """The v2 demo DiT as train_wan.py builds it, with these weights, in float32 on `device`."""
    from safetensors.torch import load_file

    from .train_wan import build_dit

    dit = build_dit()
    weights = load_file(str(model_file))
    if set(weights) != set(dit.state_dict()):
        raise ValueError(f"--standalone samples demo v2 (a Wan-class DiT from demo/train_wan.py) only; {model_file} "
                         "holds other weights. Score it without --standalone (ComfyUI's loader and sampler).")
    dit.load_state_dict({k: v.float() for k, v in weights.items()})
    return dit.to(device).eval()


def evaluate(model_file: Path, text_file: Path, tokens: list[int], captions: int,
             grid: Path | None = None, standalone_device: str | None = None) -> dict[int, float]:
    """Mean caption fidelity per image-token count; optionally a grid (rows: sizes, columns: captions)."""
    text = DemoTextEncoder.load(text_file)
    if standalone_device:
        dit = load_standalone(model_file, standalone_device)
        text = text.to(standalone_device)

        def draw(caption: str, side: int, seed: int) -> torch.Tensor:
            return standalone_sample(dit, text, caption, side, seed)
    else:
        import comfy.sd
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        model = comfy.sd.load_diffusion_model(str(model_file))

        def draw(caption: str, side: int, seed: int) -> torch.Tensor:
            return generate(model, text, caption, side, seed)
    held_out = scenes.held_out_scenes(captions)
    means, rows = {}, []
    for count in tokens:
        side = math.isqrt(count)
        start, values, images = time.time(), [], []
        for index, scene in enumerate(held_out):
            image = draw(scene.caption, side, index)
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
    parser.add_argument("--standalone", metavar="DEVICE", default=None,
                        help="sample without ComfyUI's sampling stack on this torch device (e.g. cuda)")
    parser.add_argument("--json", type=Path, default=None, help="also write the means here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    means = evaluate(args.model, args.text, args.tokens, args.captions, args.grid, args.standalone)
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "captions": args.captions,
                                         "fidelity": {str(k): v for k, v in means.items()}}, indent=1))
