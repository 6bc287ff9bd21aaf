"""Small random-weight diffusion transformers built from the host's own model classes.

Each architecture is built exactly as ComfyUI builds a checkpoint's model (its
`comfy.supported_models` config class, `get_model`), only with a tiny `unet_config`
and seeded random weights instead of a state dict, so the host's real forward code,
conditioning path and attention calls run through the normal sampling path in a
fraction of a second on CPU. Tests and benchmarks share these builders.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.supported_models
import comfy.supported_models_base
import torch

from .host import pack_import

ARCHITECTURES: tuple[str, ...] = ("flux", "sd3", "wan", "hunyuan_video", "qwen_image", "lumina2", "pixart")

CPU = torch.device("cpu")


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: the host's config class, a tiny unet_config and what its conditioning holds."""

    config_class: type[comfy.supported_models_base.BASE]
    unet_config: dict
    context_dim: int  # width of the text-encoder output the model takes
    attention: dict[str, int]  # attention calls of one forward, by kind (see expected_layers)
    pooled_dim: int | None = None  # pooled text vector ("pooled_output"), for models that need one
    guidance: float | None = None  # distilled-guidance value, for models with a guidance embedder
    video: bool = False  # latent has a frame axis that may hold more than one frame
    min_latent_size: int = 1  # smallest (height + width) // 2 of a latent the host's forward accepts


# Every model: hidden size 128, 2 heads of dim 64, text width 64, pooled width 32, about 2 blocks.
# Rope axes always sum to the head dim (64).
SPECS: dict[str, ModelSpec] = {
    "flux": ModelSpec(
        comfy.supported_models.Flux,
        dict(image_model="flux", guidance_embed=True, in_channels=16, out_channels=16, vec_in_dim=32,
             context_in_dim=64, hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
             axes_dim=[16, 24, 24], theta=10000, patch_size=2, qkv_bias=True),
        context_dim=64, pooled_dim=32, guidance=3.5,
        attention={"joint": 2},  # 1 double block + 1 single block, both over [text, image]
    ),
    "sd3": ModelSpec(
        comfy.supported_models.SD3,
        # depth fixes hidden = 64 * depth and heads = depth; layer 0 is an MMDiT-X block (SD3.5 Medium)
        # with an extra image-only self attention; the last block's context stream is pre-only.
        dict(in_channels=16, out_channels=16, pos_embed_scaling_factor=None, patch_size=2, depth=2,
             input_size=None, adm_in_channels=32, qk_norm="rms", x_block_self_attn_layers=[0],
             context_embedder_config={"target": "torch.nn.Linear",
                                      "params": {"in_features": 64, "out_features": 128}},
             num_patches=64 * 64, pos_embed_max_size=64),
        context_dim=64, pooled_dim=32,
        attention={"joint": 2, "image": 1},
    ),
    "wan": ModelSpec(
        comfy.supported_models.WAN21_T2V,
        dict(image_model="wan2.1", model_type="t2v", dim=128, ffn_dim=256, num_heads=2, num_layers=2,
             in_dim=16, out_dim=16, text_dim=64, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1),
             qk_norm=True, cross_attn_norm=True, eps=1e-6),
        context_dim=64, video=True,
        attention={"image": 2, "cross": 2},  # per block: self attention over frames x h x w, then cross
    ),
    "hunyuan_video": ModelSpec(
        comfy.supported_models.HunyuanVideo,
        # The token refiner always has 2 blocks (hard-coded in the host), each a text self attention.
        dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
             hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
             axes_dim=[16, 24, 24], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
             byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None),
        context_dim=64, pooled_dim=32, guidance=6.0, video=True,
        attention={"text": 2, "joint": 2},  # joint sequences are [image, text] (flipped vs Flux)
    ),
    "qwen_image": ModelSpec(
        comfy.supported_models.QwenImage,
        dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2, attention_head_dim=64,
             num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(16, 24, 24), patch_size=2),
        context_dim=64,
        attention={"joint": 2},
    ),
    "lumina2": ModelSpec(
        comfy.supported_models.Lumina2,
        # n_kv_heads=1: grouped-query attention as in Lumina 2 (the host repeats k/v before attention).
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=128, cap_feat_dim=64, n_layers=2,
             n_refiner_layers=1, n_heads=2, n_kv_heads=1, qk_norm=True, axes_dims=[16, 24, 24],
             axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0, multiple_of=16),
        context_dim=64,
        attention={"text": 1, "image": 1, "joint": 2},  # context refiner, noise refiner, main layers
    ),
    "pixart": ModelSpec(
        comfy.supported_models.PixArtSigma,
        dict(image_model="pixart_sigma", num_heads=2, patch_size=2, hidden_size=128, in_channels=4, depth=2,
             micro_condition=False, caption_channels=64, model_max_length=300),
        context_dim=64,
        attention={"image": 2, "cross": 2},  # per block: self attention, then cross attention to text
        # The host derives the sin-cos position table's base size as round(((h + w) // 2) / 64) * 64,
        # which is 0 (then a ZeroDivisionError) up to a mean latent size of 32 (256 px) included.
        min_latent_size=33,
    ),
}


def _spec(arch: str) -> ModelSpec:
    if arch not in SPECS:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    return SPECS[arch]


@torch.no_grad()
def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and buffer of the diffusion model deterministically.

    The host allocates weights with torch.empty (comfy.ops skips init) and a few with the
    global RNG, so all are overwritten. Matrix weights get std 1/sqrt(fan_in): activations
    keep unit scale and attention logits are O(1), so attention maps are neither uniform
    (as a fixed std 0.02 would make them, hiding attention errors) nor one-hot.
    Norm scales are 1 and norm biases 0; everything else (biases, modulation tables,
    learned position tables) is small noise.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = {id(m) for m in module.modules() if "Norm" in type(m).__name__}
    for owner in module.modules():
        tensors = [*owner.named_parameters(recurse=False), *owner.named_buffers(recurse=False)]
        for name, tensor in tensors:
            if not tensor.is_floating_point():
                continue
            if id(owner) in norms:
                tensor.fill_(1.0 if name in ("weight", "scale") else 0.0)
            elif name == "weight" and tensor.ndim >= 2:
                std = tensor[0].numel() ** -0.5
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.02)


def build_model(arch: str, seed: int = 0, **unet_overrides) -> comfy.model_patcher.ModelPatcher:
    """A small float32 model of `arch` on CPU, built the way the host builds a checkpoint's model.
    `unet_overrides` replace entries of its unet_config (benchmarks use bigger models)."""
    spec = _spec(arch)
    model_config = spec.config_class({**spec.unet_config, **unet_overrides})
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=CPU)
    _init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def conditioning(arch: str, text_len: int, seed: int = 0) -> list:
    """A CONDITIONING as the text-encode node would give it: random text features plus the extra keys."""
    spec = _spec(arch)
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn((1, text_len, spec.context_dim), generator=gen)
    extra: dict = {}
    if spec.pooled_dim is not None:
        extra["pooled_output"] = torch.randn((1, spec.pooled_dim), generator=gen)
    if spec.guidance is not None:
        extra["guidance"] = spec.guidance
    return [[context, extra]]


def empty_latent(arch: str, height: int, width: int, batch: int = 1, frames: int = 1) -> dict:
    """A LATENT of zeros in the model's latent format; height/width/frames are latent sizes."""
    spec = _spec(arch)
    if frames != 1 and not spec.video:
        raise ValueError(f"{arch} is an image model: frames must be 1")
    if (height + width) // 2 < spec.min_latent_size:
        raise ValueError(f"{arch} needs a latent of mean size >= {spec.min_latent_size}, got {height}x{width}")
    latent_format = spec.config_class.latent_format
    shape = [batch, latent_format.latent_channels, height, width]
    if latent_format.latent_dimensions == 3:  # video latent formats (Qwen-Image uses Wan's, with 1 frame)
        shape.insert(2, frames)
    return {"samples": torch.zeros(shape)}


def expected_layers(arch: str) -> dict[str, int]:
    """Attention calls of ONE forward of the built model, by kind.

    "joint": text and image tokens in one sequence; "image": image tokens only; "text": text
    tokens only; "cross": image queries attending to text keys.
    """
    return dict(_spec(arch).attention)


def sample(model: comfy.model_patcher.ModelPatcher, positive: list, negative: list, latent: dict,
           steps: int = 3, cfg: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Sample as the KSampler node does (euler, simple schedule) and return the output latent."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent_image,
                               disable_pbar=True, seed=seed)


@functools.cache
def _flow_sampling() -> comfy.model_sampling.ModelSamplingDiscreteFlow:
    return comfy.model_sampling.ModelSamplingDiscreteFlow()  # shift 1: percent p is sigma 1 - p


def linear_timeline(steps: int, sigmas: list[float] | None = None):
    """A run's timeline on the host's flow noise schedule with shift 1, where percent p is sigma 1 - p:
    by default `steps` evenly spaced steps, so step i starts at noise level i / steps."""
    timeline = pack_import("patching.timeline")
    schedule = torch.linspace(1.0, 0.0, steps + 1) if sigmas is None else torch.tensor(sigmas)
    return timeline.Timeline.of(schedule, _flow_sampling())
