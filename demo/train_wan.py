"""Train demo model v2 (a Wan-class DiT, 12 layers) and its caption encoder on procedural scenes.

v2 has no weights yet: the shipped demo model is v1 (train.py, SD3-class, 4 layers), and this
recipe is prepared for a device-machine run (demo/device_train.sh). Run from the repository root. A run lives in a folder (`--run`): `state.pt` holds everything
needed to continue (networks, EMA, optimizer, step), and the ComfyUI weights (the EMA
networks) are exported beside it at every save. Each step's data (scenes, caption drops,
noise levels, noise) is a function of the seed and the step number alone, so a run cut short
(`--max-minutes`, a closed session) resumes from `state.pt` exactly where it stopped, and a
background thread can prepare the next batches while the current one trains:

    .venv/bin/python demo/train_wan.py --run demo/runs/v2 --sides 16 32 --max-minutes 120   # CPU
    python3 demo/train_wan.py --run /tmp/v2 --device cuda --batch-scale 8 --max-minutes 7.5 \
        --shards $OUT                                                                      # GPU

are the CPU recipe (bf16 autocast where the CPU multiplies bfloat16 natively: AVX512-BF16 or
AMX; float32 elsewhere) and the device-machine one (demo/device_train.sh runs it and scores
the result). `--shards` also writes the EMA networks in float32 as files of at
most 15 MiB (what the device machine can send back); `--import-shards` makes a run folder of
them here, to export or train on. `--export demo/weights` copies a run's current weights into
the pack (as WAN_FILE and WAN_TEXT_FILE, beside v1's; the demo nodes and workflows still use v1).

What ComfyUI does at inference is what training imitates:
- the network is ComfyUI's own `WanModel`, built with the config its model detection reads
  back from the saved weights (width 256 = 2 heads of 128, 12 layers, FFN 1024), so
  `UNETLoader` loads the file as Wan 2.1 text-to-video;
- latents are codec.encode(pixels) passed through Wan 2.1's `latent_format.process_in`, one
  frame ([B, 16, 1, H, W]);
- rectified flow as Wan's `ModelSamplingDiscreteFlow` (shift 8.0) + `CONST`:
  x_t = s * noise + (1 - s) * x0, timestep = 1000 * s, target velocity = noise - x0, with s
  drawn as the sampler visits it (uniform in time, then shifted) half the time and
  logit-normal (shifted) otherwise;
- 10% empty captions, the unconditional input CFG uses.
Resolutions from 256 to 4096 image tokens, so the model learns to draw at each.
Captions of the held-out set (scenes.is_held_out) are never drawn: fidelity is measured on them.
"""

if __name__ == "__main__" and not __package__:  # `python demo/train_wan.py`: enter as a pack module
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from standalone import run

    run("demo.train_wan", sys.argv[1:])
    raise SystemExit(0)

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402

from . import WAN_FILE, WAN_TEXT_FILE, codec, scenes  # noqa: E402
from .text_encoder import DemoTextEncoder  # noqa: E402
from .train import ema_update  # noqa: E402

SHIFT = 8.0  # Wan 2.1's sampling_settings["shift"]
WIDTH, LAYERS, FFN = 256, 12, 1024
TEXT_WIDTH = 4096  # what Wan's detection fixes for the text embedding's input (umT5's width)
TOKENS_PER_STEP = 8192
SIDES = {16: 0.25, 32: 0.35, 48: 0.15, 64: 0.25}  # image tokens per side -> share of the steps
UNCOND_RATE = 0.1
PEAK_LR, WARMUP, EMA_DECAY = 3e-4, 300, 0.999


def build_dit() -> nn.Module:
    """ComfyUI's WanModel with plain torch layers; adaLN-zero initialisation (every block starts
    as the identity and the output at zero), so early training is stable."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type="t2v", patch_size=(1, 2, 2), in_dim=codec.LATENT_CHANNELS, dim=WIDTH, ffn_dim=FFN,
                     freq_dim=256, text_dim=TEXT_WIDTH, out_dim=codec.LATENT_CHANNELS, num_heads=WIDTH // 128,
                     num_layers=LAYERS, qk_norm=True, cross_attn_norm=True, eps=1e-6,
                     operations=comfy.ops.disable_weight_init)
    for module in model.modules():  # ComfyUI's layers leave their parameters uninitialised
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    nn.init.zeros_(model.time_projection[1].weight)
    nn.init.zeros_(model.head.head.weight)
    for block in model.blocks:  # modulation rows: shift, scale, gate of attention, then of the FFN
        nn.init.normal_(block.modulation, std=WIDTH**-0.5)
        block.modulation.data[:, [2, 5]] = 0.0
    nn.init.normal_(model.head.modulation, std=WIDTH**-0.5)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


def build_text() -> DemoTextEncoder:
    return DemoTextEncoder(scenes.vocabulary(), pooled_width=None, context_width=TEXT_WIDTH)


@dataclass
class Batch:
    """One step's data, in model space: clean latents [B, 16, 1, H, W], captions (some emptied
    for CFG), noise levels [B] and noise."""

    latents: torch.Tensor
    captions: list[str]
    sigma: torch.Tensor
    noise: torch.Tensor


def step_batch(seed: int, step: int, *, sides: list[int], batch_scale: float) -> Batch:
    """The data of one step: a function of (seed, step) alone (the side too, drawn by its share)."""
    from comfy.latent_formats import Wan21
    from comfy.model_sampling import time_snr_shift

    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    shares = torch.tensor([SIDES[side] for side in sides])
    side = sides[int(torch.multinomial(shares, 1, generator=gen))]
    batch = max(1, round(batch_scale * TOKENS_PER_STEP / side**2))
    drawn = [scenes.random_scene(gen) for _ in range(batch)]
    latents = Wan21().process_in(codec.encode(scenes.render_batch(drawn, side * 2 * codec.FACTOR))[:, :, None])
    drop = torch.rand(batch, generator=gen) < UNCOND_RATE
    uniform, logit_normal = torch.rand(batch, generator=gen), torch.sigmoid(torch.randn(batch, generator=gen))
    sigma = time_snr_shift(SHIFT, torch.where(torch.rand(batch, generator=gen) < 0.5, uniform, logit_normal))
    return Batch(latents, ["" if d else s.caption for s, d in zip(drawn, drop.tolist(), strict=True)], sigma,
                 torch.randn(latents.shape, generator=gen))


def prefetched(make: Callable[[int], Batch], steps: range, threads: int = 1, depth: int = 2) -> Iterator[Batch]:
    """make(step) for each step, in order, computed ahead on `threads` background threads (rendering
    overlaps training; thread k makes every threads-th step from the k-th on)."""
    queues: list[queue.Queue] = [queue.Queue(depth) for _ in range(threads)]

    def work(k: int) -> None:
        for step in steps[k::threads]:
            queues[k].put(make(step))

    for k in range(threads):
        threading.Thread(target=work, args=(k,), daemon=True).start()
    for i, _ in enumerate(steps):
        yield queues[i % threads].get()


def flow_loss(dit: nn.Module, text: DemoTextEncoder, batch: Batch, device: torch.device,
              dtype: torch.dtype | None) -> torch.Tensor:
    s = batch.sigma.view(-1, 1, 1, 1, 1)
    x_t = (s * batch.noise + (1 - s) * batch.latents).to(device, non_blocking=True)
    target = (batch.noise - batch.latents).to(device, non_blocking=True)
    tokens = text.tokenize(batch.captions).to(device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        context, _ = text(tokens)
        velocity = dit(x_t, (batch.sigma * 1000).to(device), context)
    return (velocity.float() - target).pow(2).mean()


def learning_rate(step: int) -> float:
    return PEAK_LR * min(1.0, (step + 1) / WARMUP)


def export(networks: nn.ModuleList, out: Path) -> None:
    """The ComfyUI files: the DiT in float16 under WanModel's own key names, the caption encoder."""
    dit, text = networks
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in dit.state_dict().items()}
    save_file(weights, str(out / WAN_FILE), metadata={"fastattn.demo": "Wan-class DiT (demo v2), see demo/train_wan.py"})
    text.to("cpu").save(out / WAN_TEXT_FILE)
    text.to(next(dit.parameters()).device)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where it runs natively, else float32 (None): emulated bf16 is ~16x slower on a CPU."""
    if device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    print(f"This CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16 matmul: training "
          "in float32 (slower, and not bitwise the run a bfloat16 CPU or a GPU makes).", flush=True)
    return None


SHARD_BYTES = 15 * 2**20  # the device machine sends back files of at most 16 MiB


def save_shards(networks: nn.ModuleList, folder: Path, step: int) -> list[Path]:
    """The networks in float32 as `demo-state-NN.safetensors` files of at most SHARD_BYTES each."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in networks.state_dict().items():
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if shards[-1] and size + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    paths = [folder / f"demo-state-{i:02d}.safetensors" for i in range(len(shards))]
    for path, shard in zip(paths, shards, strict=True):
        save_file(shard, str(path), metadata={"step": str(step), "shards": str(len(shards))})
    return paths


def load_shards(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for path in sorted(folder.glob("demo-state-*.safetensors")) for k, v in load_file(str(path)).items()}


def train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    dtype = autocast_dtype(device)
    state_file = args.run / "state.pt"
    torch.manual_seed(args.seed)  # the initialisation
    networks = nn.ModuleList([build_dit(), build_text()]).to(device)
    ema = copy.deepcopy(networks).requires_grad_(False)
    optimizer = torch.optim.AdamW(networks.parameters(), lr=PEAK_LR, betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if state_file.exists():
        state = torch.load(state_file, map_location=device, weights_only=False)
        networks.load_state_dict(state["networks"])
        ema.load_state_dict(state["ema"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed {args.run} at step {step}", flush=True)
    print(f"{sum(p.numel() for p in networks[0].parameters()) / 1e6:.1f}M DiT parameters; sides {args.sides}; "
          f"{'bf16 autocast' if dtype else 'float32'} on {device}", flush=True)

    def save() -> None:
        args.run.mkdir(parents=True, exist_ok=True)
        torch.save({"networks": networks.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "step": step}, state_file.with_suffix(".tmp"))
        state_file.with_suffix(".tmp").replace(state_file)
        export(ema, args.run)

    start = last_save = time.time()
    running: dict[int, float] = {}
    make = functools.partial(step_batch, args.seed, sides=args.sides, batch_scale=args.batch_scale)
    for batch in prefetched(make, range(step, args.steps), args.data_threads):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        loss = flow_loss(networks[0], networks[1], batch, device, dtype)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(networks.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, networks, step, EMA_DECAY)
        step += 1
        side = round((batch.latents.shape[-1] * batch.latents.shape[-2] / 4) ** 0.5)
        running[side] = 0.95 * running.get(side, loss.item()) + 0.05 * loss.item()
        now = time.time()
        if step % args.log_every == 0:
            losses = " ".join(f"{s}:{v:.4f}" for s, v in sorted(running.items()))
            print(f"step {step}/{args.steps} {now - start:.0f}s loss by tokens per side {losses}", flush=True)
        if now - last_save > args.save_minutes * 60:
            save()
            last_save = now
        if now - start > args.max_minutes * 60:
            print(f"stopped at step {step}: past --max-minutes; run again to continue", flush=True)
            break
    save()
    if args.shards:
        save_shards(ema, args.shards, step)
    print(f"saved {args.run} at step {step} after {time.time() - start:.0f}s", flush=True)


def import_shards(folder: Path, run: Path) -> None:
    """A run folder made of a device run's shards: its EMA networks as both networks and EMA, a fresh
    optimizer (the moments stayed on the device), the step it reached."""
    from safetensors import safe_open

    first = sorted(folder.glob("demo-state-*.safetensors"))[0]
    with safe_open(str(first), "pt") as f:
        step = int(f.metadata()["step"])
    networks = nn.ModuleList([build_dit(), build_text()])
    networks.load_state_dict(load_shards(folder))
    run.mkdir(parents=True, exist_ok=True)
    torch.save({"networks": networks.state_dict(), "ema": networks.state_dict(), "optimizer": None, "step": step},
               run / "state.pt")
    export(networks, run)
    print(f"made {run} from {folder} (step {step})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the run's folder (resumed when it holds state.pt)")
    parser.add_argument("--steps", type=int, default=20000, help="train until this step")
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop (and save) after this long")
    parser.add_argument("--save-minutes", type=float, default=10.0, help="save the state this often")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-scale", type=float, default=1.0,
                        help=f"images per step relative to {TOKENS_PER_STEP} tokens (a GPU takes 8 or more)")
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES), choices=list(SIDES),
                        help="image tokens per side to train on (a first phase at 16 32 learns the captions "
                             "cheaply; the rest of the run adds 48 64)")
    parser.add_argument("--data-threads", type=int, default=1, help="threads preparing the next batches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--shards", type=Path, default=None,
                        help="at the end, also write the EMA networks here as float32 files of at most 15 MiB")
    parser.add_argument("--import-shards", type=Path, default=None,
                        help="make --run from the shards in this folder (a device run's) and stop")
    parser.add_argument("--export", type=Path, default=None,
                        help="copy the run's current ComfyUI weights here (e.g. demo/weights) and stop")
    args = parser.parse_args(argv)
    if args.import_shards:
        import_shards(args.import_shards, args.run)
        return
    if args.export:
        for name in (WAN_FILE, WAN_TEXT_FILE):
            shutil.copy(args.run / name, args.export / name)
        print(f"copied {args.run}/{{{WAN_FILE}, {WAN_TEXT_FILE}}} to {args.export}")
        return
    train(args)
