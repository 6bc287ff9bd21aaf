"""Train the demo U-Net (SD 1.5 layout) and its own caption encoder on procedural scenes.

The U-Net judges DeepCache: the demo DiT has no skip branches to cache. Run from the repository
root; seeded and resumable (each step draws its data from (seed, step), and a checkpoint with the
optimiser and EMA is written every --save-every steps, so a run stopped by --max-minutes or
killed continues where it stopped with the same data):

    nice -n 15 .venv/bin/python demo/train_unet.py --steps 2500 --max-minutes 85 \\
        --checkpoint output/train_unet.pt --out demo/weights

is the command that made the shipped weights, in two invocations: the first's --max-minutes
stopped it after step 472 of 2500 (on two cores shared with another training run it got about
17% of one core), and the same command again (with --max-minutes 70 --threads 1, nice 10) resumed
from its checkpoint and finished the 2500 steps in 70 minutes. The result is still under-trained
for its job: it scores
caption fidelity 0.14 on 8 held-out captions (demo/fidelity.py; true renders through its 4 x 4
cell codec score 0.60 - 0.80; the 472-step model scored 0.00). Running the command again resumes
from the checkpoint; with --device cuda a GPU trains the whole plan in minutes.

The layout is the smallest the stock loader accepts as SD 1.5: ComfyUI's supported-model match
needs `model_channels` 320 and `context_dim` 768 (read from the weights), and the model detection
needs a transformer in an input block, so what can shrink is the number of levels, res blocks and
transformers. One level with one res block + transformer (8 heads of 40) and no middle block:
input blocks [conv_in, res + transformer], output blocks [res, res], 13.6 M parameters, 27 MB in
float16 (two levels, the next size up, need about 24.4 M). DeepCache's default branch (the
shallowest skip, conv_in -> last output block) then caches the output of output block 0.

What ComfyUI does at inference is what training imitates:
- the network is ComfyUI's own `UNetModel` with the config its detection reads back from the
  saved weights (so `UNETLoader` loads the file as SD 1.5);
- latents are codec.encode_cells(pixels) through SD 1.5's `latent_format.process_in`;
- epsilon prediction on SD 1.5's discrete schedule (`ModelSamplingDiscrete`, linear betas
  0.00085 to 0.012): input x0 + sigma * noise scaled by 1 / sqrt(sigma^2 + 1), timestep t,
  loss weighted by min(SNR, 5) / SNR (min-SNR, for a short run);
- the caption encoder's context (width 128) zero-padded to 768 as the text-encode node does;
- 10% empty captions, the unconditional input CFG uses.
Float32 (this recipe runs on any CPU); latent 16 x 16 (a 64 x 64 image).
"""

if __name__ == "__main__" and not __package__:  # `python demo/train_unet.py`: enter as a pack module
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standalone import run

    run("demo.train_unet", sys.argv[1:])
    raise SystemExit(0)

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from . import UNET_FILE, UNET_TEXT_FILE, codec, scenes  # noqa: E402
from .text_encoder import DemoTextEncoder  # noqa: E402
from .train import ema_update  # noqa: E402

CONTEXT_DIM = 768  # SD 1.5's cross-attention width; the caption encoder's 128 are zero-padded
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": codec.CELL_CHANNELS, "out_channels": codec.CELL_CHANNELS,
    "model_channels": 320, "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [0, 0],
    "channel_mult": [1], "transformer_depth_middle": -2, "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM, "use_temporal_resblock": False, "use_temporal_attention": False,
    "num_heads": 8, "num_head_channels": -1,
}
SIDE, BATCH = 16, 8  # latent side (a 64 x 64 image) and batch size
UNCOND_RATE, MIN_SNR = 0.1, 5.0
PEAK_LR, WARMUP, EMA_DECAY = 2e-4, 100, 0.995


def pad_context(context: torch.Tensor) -> torch.Tensor:
    """Caption encoder output [B, T, 128] -> the U-Net's cross-attention input [B, T, 768]."""
    return F.pad(context, (0, CONTEXT_DIM - context.shape[-1]))


def build_unet() -> nn.Module:
    """ComfyUI's UNetModel with trainable layers: torch's default init, and the last layer of every
    residual branch (res blocks, transformers) and of the output zeroed, so each starts as identity."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

    model = UNetModel(**UNET_CONFIG, dtype=torch.float32)
    for module in model.modules():  # comfy.ops layers skip their init: run torch's
        for kind in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
            if isinstance(module, kind):
                kind.reset_parameters(module)
    zeroed = [model.out[-1]]
    zeroed += [m.out_layers[-1] for m in model.modules() if isinstance(m, ResBlock)]
    zeroed += [m.proj_out for m in model.modules() if isinstance(m, SpatialTransformer)]
    for module in zeroed:
        for p in module.parameters():
            nn.init.zeros_(p)
    return model


def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Model-space latents (after SD 1.5's process_in) and captions, some emptied for CFG."""
    from comfy.latent_formats import SD15

    drawn = [scenes.random_scene(gen) for _ in range(BATCH)]
    latents = SD15().process_in(codec.encode_cells(scenes.render_batch(drawn, SIDE * codec.CELL_FACTOR)))
    drop = torch.rand(BATCH, generator=gen) < UNCOND_RATE
    return latents, ["" if d else s.caption for s, d in zip(drawn, drop.tolist(), strict=True)]


def eps_loss(unet: nn.Module, text: DemoTextEncoder, sigmas: torch.Tensor, x0: torch.Tensor, captions: list[str],
             gen: torch.Generator, device: torch.device) -> torch.Tensor:
    t = torch.randint(len(sigmas), (x0.shape[0],), generator=gen)
    sigma = sigmas[t][:, None, None, None]
    noise = torch.randn(x0.shape, generator=gen)  # drawn on the CPU: the same data on any device
    x_in = (x0 + sigma * noise) / torch.sqrt(sigma**2 + 1)
    context, _ = text(text.tokenize(captions).to(device))
    predicted = unet(x_in.to(device), t.float().to(device), context=pad_context(context))
    noise, sigma = noise.to(device), sigma.to(device)
    snr = sigma.flatten() ** -2
    weight = torch.clamp(snr, max=MIN_SNR) / snr
    return ((predicted - noise).pow(2).mean(dim=(1, 2, 3)) * weight).mean()


def learning_rate(step: int, total: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_weights(unet: nn.Module, text: DemoTextEncoder, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in unet.state_dict().items()}
    save_file(weights, str(out / UNET_FILE), metadata={"fastattn.demo": "SD 1.5-layout U-Net, see demo/train_unet.py"})
    copy.deepcopy(text).cpu().save(out / UNET_TEXT_FILE)


def train(seed: int, steps: int, max_minutes: float, threads: int, checkpoint: Path, out: Path,
          save_every: int = 50, stop_after: int | None = None, log_every: int = 10, device: str = "cpu") -> None:
    from comfy.model_sampling import ModelSamplingDiscrete

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text = DemoTextEncoder(scenes.vocabulary())
    unet = build_unet()
    networks = nn.ModuleList([unet, text]).to(device)
    ema = copy.deepcopy(networks).requires_grad_(False)
    optimizer = torch.optim.AdamW(networks.parameters(), lr=PEAK_LR, betas=(0.9, 0.99), weight_decay=0.0)
    first = 0
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True, map_location=device)
        networks.load_state_dict(state["live"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        first = state["step"] + 1
        print(f"resumed from {checkpoint} at step {first}", flush=True)
    sigmas = ModelSamplingDiscrete().sigmas.float()
    print(f"{steps} steps; {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M U-Net parameters", flush=True)
    start, deadline = time.time(), time.time() + max_minutes * 60
    running = None
    for step in range(first, steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        latents, captions = make_batch(gen)
        loss = eps_loss(unet, text, sigmas, latents, captions, gen, torch.device(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(networks.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, networks, step, EMA_DECAY)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        last = step == steps - 1 or step == stop_after or time.time() > deadline
        if step % log_every == 0 or last:
            print(f"step {step}/{steps} {time.time() - start:.0f}s loss {running:.4f}", flush=True)
        if step % save_every == 0 or last:
            torch.save({"live": networks.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step}, checkpoint)
            save_weights(ema[0], ema[1], out)
        if last:
            break
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="length of the run (fixes the learning-rate schedule)")
    parser.add_argument("--max-minutes", type=float, default=90.0, help="wall-clock stop for this invocation")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is faster when other jobs share the machine's two cores")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="training state (live and EMA weights, optimiser, step): resumed from when it exists")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--stop-after-step", type=int, default=None,
                        help="end after this step (the learning rate still follows --steps)")
    parser.add_argument("--device", default="cpu", help="torch device to train on (e.g. cuda); the data is the same")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    args = parser.parse_args(argv)
    train(args.seed, args.steps, args.max_minutes, args.threads, args.checkpoint, args.out, args.save_every,
          args.stop_after_step, device=args.device)
