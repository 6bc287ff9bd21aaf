"""Train the demo model (SD3-class MMDiT, depth 4) and its text encoder on procedural scenes.

Run from the repository root (seeded and reproducible: --minutes fixes a step plan from a
nominal cost table, so the same flags give the same steps, data and weights; a busy machine
takes longer; a run that --max-minutes cuts short is reproduced with --stop-after-step):

    .venv/bin/python demo/train.py --seed 0 --minutes 34 --max-minutes 95 --threads 1 --out demo/weights
    .venv/bin/python demo/train.py --seed 1 --minutes 11 --max-minutes 24 --threads 1 \
        --sides 32 48 128 --resume demo/weights --out demo/weights

are the two commands that made the shipped weights: 3138 steps in 65 minutes, then 1072 more
(mostly small images, where the caption's effect was still weak) in 19 minutes, on two cores
shared with other jobs, where one torch thread ran faster than two.

What ComfyUI will do at inference is what training imitates:
- the network is ComfyUI's own `MMDiT`, built with the config ComfyUI's model detection reads
  back from the saved weights (so `UNETLoader` loads the file as SD3);
- latents are codec.encode(pixels) passed through SD3's `latent_format.process_in`, the
  space the sampler works in;
- rectified flow as `ModelSamplingDiscreteFlow` + `CONST`: x_t = s * noise + (1 - s) * x0,
  timestep = 1000 * s, target velocity = noise - x0, with s drawn logit-normally and then
  shifted by SD3's shift 3.0;
- 10% empty captions, the unconditional input CFG uses.
The forward runs under bfloat16 autocast, which needs a CPU that multiplies bfloat16 natively
(AVX512-BF16 or AMX; about 3x float32's speed there): elsewhere the script stops at once rather
than run about 16x slower than float32 (measured on an AVX2-only EPYC).
Resolutions from 256 to 4096 image tokens (pos_embed covers 64 x 64 tokens, fixed 2D
sin-cos as SD3's) so the model also generates where attention dominates the cost.
"""

if __name__ == "__main__" and not __package__:  # `python demo/train.py`: enter as a pack module
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standalone import run

    run("demo.train", sys.argv[1:])
    raise SystemExit(0)

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from . import DIT_FILE, TEXT_FILE, codec, scenes  # noqa: E402
from .text_encoder import DemoTextEncoder  # noqa: E402

SHIFT = 3.0  # SD3's sampling_settings["shift"]
POS_EMBED_GRID = 64  # tokens per side covered by pos_embed: latent 128 x 128
# latent side -> (batch size, share of the training time, seconds per step on 2 idle cores)
RESOLUTIONS = {32: (16, 0.45, 0.5), 48: (8, 0.12, 0.55), 64: (4, 0.13, 0.65), 96: (2, 0.12, 1.0),
               128: (1, 0.18, 1.8)}
UNCOND_RATE = 0.1
PEAK_LR, WARMUP, EMA_DECAY = 4e-4, 200, 0.998


def dit_config(text: DemoTextEncoder) -> dict:
    """The MMDiT kwargs ComfyUI's detect_unet_config derives from the saved weights."""
    width = 64 * 4  # depth 4: ComfyUI reads depth as x_embedder width / 64, heads = depth
    return {
        "patch_size": 2, "in_channels": codec.LATENT_CHANNELS, "out_channels": codec.LATENT_CHANNELS,
        "depth": 4, "input_size": None, "adm_in_channels": text.config["pooled_width"],
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": text.config["width"], "out_features": width}},
        "num_patches": POS_EMBED_GRID**2, "pos_embed_max_size": POS_EMBED_GRID,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    }


def build_dit(text: DemoTextEncoder) -> nn.Module:
    """ComfyUI's MMDiT with trainable torch layers, DiT initialisation (zeroed adaLN and
    output, so each block starts as the identity) and SD3's fixed sin-cos pos_embed."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, get_2d_sincos_pos_embed

    ops = types.SimpleNamespace(Linear=nn.Linear, Conv2d=nn.Conv2d, Conv3d=nn.Conv3d, LayerNorm=nn.LayerNorm)
    model = MMDiT(**dit_config(text), operations=ops)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    for name, module in model.named_modules():
        if name.endswith("adaLN_modulation") or name == "final_layer":
            for p in module.parameters():
                nn.init.zeros_(p)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    grid = get_2d_sincos_pos_embed(model.hidden_size, POS_EMBED_GRID)
    model.pos_embed.copy_(torch.from_numpy(grid).float()[None])
    return model


def step_plan(minutes: float, sides: list[int], gen: torch.Generator) -> list[int]:
    """Latent side per step: each resolution gets its share of the nominal time, in seeded order."""
    total_share = sum(RESOLUTIONS[side][1] for side in sides)
    plan = []
    for side in sides:
        _, share, seconds = RESOLUTIONS[side]
        plan += [side] * max(1, round(minutes * 60 * share / total_share / seconds))
    order = torch.randperm(len(plan), generator=gen).tolist()
    return [plan[i] for i in order]


def make_batch(side: int, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str]]:
    """Model-space latents (after SD3's process_in) and captions, some emptied for CFG."""
    from comfy.latent_formats import SD3

    drawn = [scenes.random_scene(gen) for _ in range(batch)]
    latents = SD3().process_in(codec.encode(scenes.render_batch(drawn, side * codec.FACTOR)))
    drop = torch.rand(batch, generator=gen) < UNCOND_RATE
    return latents, ["" if d else s.caption for s, d in zip(drawn, drop.tolist(), strict=True)]


def flow_loss(dit: nn.Module, text: DemoTextEncoder, x0: torch.Tensor, captions: list[str],
              gen: torch.Generator) -> torch.Tensor:
    from comfy.model_sampling import time_snr_shift

    sigma = time_snr_shift(SHIFT, torch.sigmoid(torch.randn(x0.shape[0], generator=gen)))
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma[:, None, None, None]
    x_t = s * noise + (1 - s) * x0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context, pooled = text.encode(captions)
        velocity = dit(x_t, sigma * 1000, y=pooled, context=context)
    return (velocity.float() - (noise - x0)).pow(2).mean()


def learning_rate(step: int, total: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, total - WARMUP)
    return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, step: int, final_decay: float = EMA_DECAY) -> None:
    """Move the EMA networks toward the live ones (the decay ramps up to final_decay over the first steps)."""
    decay = min(final_decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), live.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


def save(dit: nn.Module, text: DemoTextEncoder, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in dit.state_dict().items()}
    save_file(weights, str(out / DIT_FILE), metadata={"fastattn.demo": "SD3-class MMDiT, see demo/train.py"})
    text.save(out / TEXT_FILE)


def require_native_bfloat16() -> None:
    """Stop before training if bfloat16 matmuls would be emulated (hours instead of minutes)."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise SystemExit(
            f"This CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 matmul, which the "
            "recipe's autocast needs: emulated, a step takes about 16x longer than in float32. Train on a CPU "
            "with AVX512-BF16 or AMX to reproduce the shipped weights.")


def train(seed: int, minutes: float, max_minutes: float, threads: int, sides: list[int], resume: Path | None,
          out: Path, stop_after: int | None = None, log_every: int = 50) -> None:
    require_native_bfloat16()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    text = DemoTextEncoder.load(resume / TEXT_FILE).train() if resume else DemoTextEncoder(scenes.vocabulary())
    dit = build_dit(text)
    if resume:
        dit.load_state_dict({k: v.float() for k, v in load_file(str(resume / DIT_FILE)).items()})
    networks = nn.ModuleList([dit, text])
    ema = copy.deepcopy(networks).requires_grad_(False)
    optimizer = torch.optim.AdamW(networks.parameters(), lr=PEAK_LR, betas=(0.9, 0.99), weight_decay=0.0)
    plan = step_plan(minutes, sides, gen)
    print(f"{len(plan)} steps; {sum(p.numel() for p in dit.parameters()) / 1e6:.1f}M DiT parameters", flush=True)
    start, deadline = time.time(), time.time() + max_minutes * 60
    running: dict[int, float] = {}
    for step, side in enumerate(plan):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, len(plan))
        latents, captions = make_batch(side, RESOLUTIONS[side][0], gen)
        loss = flow_loss(dit, text, latents, captions, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(networks.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, networks, step)
        running[side] = 0.9 * running.get(side, loss.item()) + 0.1 * loss.item()
        if step % log_every == 0 or step == len(plan) - 1:
            losses = " ".join(f"{s}:{v:.3f}" for s, v in sorted(running.items()))
            print(f"step {step}/{len(plan)} {time.time() - start:.0f}s loss by latent side {losses}", flush=True)
        if step == stop_after:
            print(f"stopped after step {step} (--stop-after-step)", flush=True)
            break
        if time.time() > deadline:
            print(f"stopped at step {step}: past --max-minutes (to reproduce, add --stop-after-step {step})",
                  flush=True)
            break
    save(ema[0], ema[1], out)
    print(f"saved to {out} after {time.time() - start:.0f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=45.0,
                        help="training length as time on 2 idle CPU cores (fixes the step plan)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock safety stop for busy machines (default 3x --minutes)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; 1 is faster when other jobs share the two cores")
    parser.add_argument("--sides", type=int, nargs="+", default=list(RESOLUTIONS), choices=list(RESOLUTIONS),
                        help="latent sides to train on (their time shares are renormalised)")
    parser.add_argument("--resume", type=Path, default=None,
                        help="continue from the weights in this folder instead of a fresh initialisation")
    parser.add_argument("--stop-after-step", type=int, default=None,
                        help="end after this step of the plan (the learning rate still follows the whole "
                             "plan): reproduces a run that --max-minutes cut short")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    args = parser.parse_args(argv)
    train(args.seed, args.minutes, args.max_minutes or 3 * args.minutes, args.threads, args.sides, args.resume,
          args.out, args.stop_after_step)
