"""Small random-weight diffusion transformers built from the host's own model classes.

Each architecture is built exactly as ComfyUI builds a checkpoint's model (its
`comfy.supported_models` config class, `get_model`), only with a tiny `unet_config`
and seeded random weights instead of a state dict, so the host's real forward code,
conditioning path and attention calls run through the normal sampling path in a
fraction of a second on CPU. Tests and benchmarks share these builders.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_patcher
import comfy.model_sampling
import comfy.sample
import comfy.supported_models
import comfy.supported_models_base
import torch

from .host import pack_import

# The seven architectures served first: the randomized and host-path tests run on all of them.
CORE_ARCHITECTURES: tuple[str, ...] = ("flux", "sd3", "wan", "hunyuan_video", "qwen_image", "lumina2", "pixart")
# Every architecture of the bundled host the pack serves (the core seven, then the rest).
ARCHITECTURES: tuple[str, ...] = CORE_ARCHITECTURES + (
    "flux2", "chroma", "chroma_radiance", "hidream", "auraflow", "omnigen2", "zimage", "hunyuan_image21",
    "hunyuan_video15", "hunyuan_dit", "cosmos", "cosmos_predict2", "ltxv", "mochi")
UNET_ARCHITECTURES: tuple[str, ...] = ("sd15", "sdxl")  # U-Nets (DeepCache), kept out of the attention tests

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
    # the other conditioning keys its text encoders give (masks, second encoders), for a prompt of n tokens
    extras: Callable[[int, torch.Generator], dict] | None = None
    patch: tuple[int, ...] = (2, 2)  # latent cells per token, per latent axis
    text_first: bool = True  # text before the image in its joint attention calls
    # text tokens in a joint call, from one model call's conditioning (c_crossattn and what `extras` gives
    # become), when they are not the prompt's tokens
    joint_text: Callable[[dict], int] | None = None
    size: tuple[int, int] = (16, 16)  # latent height and width the tests sample at (2 frames for video)


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
        context_dim=64, video=True, patch=(1, 2, 2), size=(8, 12),
        attention={"image": 2, "cross": 2},  # per block: self attention over frames x h x w, then cross
    ),
    "hunyuan_video": ModelSpec(
        comfy.supported_models.HunyuanVideo,
        # The token refiner always has 2 blocks (hard-coded in the host), each a text self attention.
        dict(image_model="hunyuan_video", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
             hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1,
             axes_dim=[16, 24, 24], theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True,
             byt5=False, meanflow=False, use_cond_type_embedding=False, vision_in_dim=None),
        context_dim=64, pooled_dim=32, guidance=6.0, video=True, patch=(1, 2, 2), text_first=False, size=(8, 12),
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
        min_latent_size=33, size=(34, 34),
    ),
    "flux2": ModelSpec(
        comfy.supported_models.Flux2,  # Flux's class: 1x1 patches of a 128-channel latent, 4 rope axes
        dict(image_model="flux2", guidance_embed=True, in_channels=128, out_channels=128, vec_in_dim=None,
             context_in_dim=64, hidden_size=128, mlp_ratio=3.0, num_heads=2, depth=1, depth_single_blocks=1,
             axes_dim=[16, 16, 16, 16], theta=2000, patch_size=1, qkv_bias=False, global_modulation=True,
             mlp_silu_act=True, ops_bias=False, default_ref_method="index", ref_index_scale=10.0),
        context_dim=64, pooled_dim=32, guidance=4.0, patch=(1, 1), size=(8, 8),
        joint_text=lambda c: c["c_crossattn"].shape[1],  # the host pads every prompt to 512 tokens (at the front)
        attention={"joint": 2},
    ),
    "chroma": ModelSpec(
        comfy.supported_models.Chroma,  # Flux's blocks, modulations from a distilled approximator
        dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=128,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24], theta=10000,
             patch_size=2, qkv_bias=True, in_dim=64, out_dim=128, hidden_dim=64, n_layers=1),
        context_dim=64, pooled_dim=32,
        attention={"joint": 2},
    ),
    "chroma_radiance": ModelSpec(
        comfy.supported_models.ChromaRadiance,  # pixel space: a latent of RGB pixels in 4x4 patches
        dict(image_model="chroma_radiance", in_channels=3, out_channels=3, context_in_dim=64, hidden_size=128,
             mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24], theta=10000,
             patch_size=4, qkv_bias=True, in_dim=64, out_dim=128, hidden_dim=64, n_layers=1, nerf_hidden_size=32,
             nerf_mlp_ratio=2, nerf_depth=1, nerf_max_freqs=4, nerf_tile_size=0, nerf_final_head_type="linear",
             nerf_embedder_dtype=None),
        context_dim=64, pooled_dim=32, patch=(4, 4), size=(32, 32),
        attention={"joint": 2},
    ),
    "hidream": ModelSpec(
        comfy.supported_models.HiDream,
        # one double and one single block, each taking one layer of the llama stack; no MoE experts
        # (their routing is data-dependent, which the inspector's fake-tensor trace cannot follow)
        dict(image_model="hidream", patch_size=2, in_channels=16, out_channels=16, num_layers=1,
             num_single_layers=1, attention_head_dim=64, num_attention_heads=2, caption_channels=[64, 64],
             text_emb_dim=32, num_routed_experts=0, num_activated_experts=0, axes_dims_rope=[32, 16, 16],
             max_resolution=[32, 32], llama_layers=[0, 1]),
        context_dim=64, pooled_dim=32, text_first=False,
        extras=lambda n, gen: {"conditioning_llama3": torch.randn((1, 2, n, 64), generator=gen)},
        # [image, T5, last llama layer, this block's llama layer]
        joint_text=lambda c: c["c_crossattn"].shape[1] + 2 * c["encoder_hidden_states_llama3"].shape[2],
        attention={"joint": 2},
    ),
    "auraflow": ModelSpec(
        comfy.supported_models.AuraFlow,
        dict(in_channels=4, out_channels=4, patch_size=2, dim=128, n_layers=2, n_double_layers=1, n_heads=2,
             global_conddim=128, cond_seq_dim=64, max_seq=16 * 16),
        context_dim=64,
        joint_text=lambda c: 8 + c["c_crossattn"].shape[1],  # 8 register tokens before the prompt
        attention={"joint": 2},
    ),
    "omnigen2": ModelSpec(
        comfy.supported_models.Omnigen2,  # Lumina 2's layout: text refiner, image refiner, joint layers
        dict(image_model="omnigen2", patch_size=2, in_channels=16, out_channels=None, hidden_size=128, num_layers=1,
             num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None,
             norm_eps=1e-5, axes_dim_rope=[16, 24, 24], axes_lens=[300, 512, 512], text_feat_dim=64,
             timestep_scale=1000.0),
        context_dim=64,
        extras=lambda n, gen: {"attention_mask": torch.ones((1, n), dtype=torch.long)},  # gives num_tokens
        attention={"text": 1, "image": 1, "joint": 1},
    ),
    "zimage": ModelSpec(
        # Lumina 2's class; text (and image) tokens padded to a multiple of 32. Width 256: its modulation
        # is 256 wide whatever the model's width.
        comfy.supported_models.ZImage,
        dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=1,
             n_refiner_layers=1, n_heads=4, n_kv_heads=4, qk_norm=True, axes_dims=[16, 24, 24],
             axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, multiple_of=16,
             z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
        context_dim=64,
        joint_text=lambda c: -(-c["c_crossattn"].shape[1] // 32) * 32,
        attention={"text": 1, "image": 1, "joint": 1},
    ),
    "hunyuan_image21": ModelSpec(
        comfy.supported_models.HunyuanImage21,  # HunyuanVideo's class on a 2D latent, with a glyph (byT5) encoder
        dict(image_model="hunyuan_video", in_channels=64, out_channels=64, vec_in_dim=None, context_in_dim=64,
             hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[32, 32],
             theta=256, patch_size=[1, 1], qkv_bias=True, guidance_embed=False, byt5=True, meanflow=False,
             use_cond_type_embedding=False, vision_in_dim=None),
        context_dim=64, patch=(1, 1), text_first=False, size=(8, 8),
        extras=lambda n, gen: {"conditioning_byt5small": torch.randn((1, 4, 1472), generator=gen)},
        joint_text=lambda c: c["c_crossattn"].shape[1] + c["txt_byt5"].shape[1],
        attention={"text": 2, "joint": 2},
    ),
    "hunyuan_video15": ModelSpec(
        comfy.supported_models.HunyuanVideo15,  # HunyuanVideo's class with vision tokens joining the text
        dict(image_model="hunyuan_video", in_channels=65, out_channels=32, vec_in_dim=None, context_in_dim=64,
             hidden_size=128, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[16, 24, 24],
             theta=256, patch_size=[1, 1, 1], qkv_bias=True, guidance_embed=False, byt5=False, meanflow=False,
             use_cond_type_embedding=True, vision_in_dim=32),
        context_dim=64, pooled_dim=32, video=True, patch=(1, 1, 1), text_first=False, size=(6, 8),
        extras=lambda n, gen: {"clip_vision_output": types.SimpleNamespace(
            last_hidden_state=torch.randn((1, 3, 32), generator=gen))},
        joint_text=lambda c: c["c_crossattn"].shape[1] + c["clip_fea"].shape[1],
        attention={"text": 2, "joint": 2},
    ),
    "hunyuan_dit": ModelSpec(
        comfy.supported_models.HunyuanDiT,  # CLIP and mT5 prompts, both through cross attention
        dict(image_model="hydit", input_size=32, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=2,
             mlp_ratio=4.0, text_states_dim=64, text_states_dim_t5=32, text_len=2, text_len_t5=8),
        context_dim=64,
        extras=lambda n, gen: {"attention_mask": torch.ones((1, n)),
                               "conditioning_mt5xl": torch.randn((1, 8, 32), generator=gen),
                               "attention_mask_mt5xl": torch.ones((1, 8))},
        attention={"image": 2, "cross": 2},  # per block: self attention, then cross attention
    ),
    "cosmos": ModelSpec(
        comfy.supported_models.CosmosT2V,  # Cosmos 1.0: sequence-first blocks, self then cross attention
        dict(image_model="cosmos", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
             patch_spatial=2, patch_temporal=1, concat_padding_mask=True, block_config="FA-CA-MLP",
             model_channels=128, num_blocks=1, num_heads=2, mlp_ratio=4.0, block_x_format="THWBD",
             crossattn_emb_channels=64, pos_emb_cls="rope3d", pos_emb_learnable=False, pos_emb_interpolation="crop",
             affline_emb_norm=True, use_adaln_lora=True, adaln_lora_dim=32, extra_per_block_abs_pos_emb=True,
             extra_per_block_abs_pos_emb_type="learnable"),
        context_dim=64, video=True, patch=(1, 2, 2), size=(8, 12),
        attention={"image": 1, "cross": 1},
    ),
    "cosmos_predict2": ModelSpec(
        comfy.supported_models.CosmosT2IPredict2,
        dict(image_model="cosmos_predict2", max_img_h=64, max_img_w=64, max_frames=8, in_channels=16, out_channels=16,
             patch_spatial=2, patch_temporal=1, concat_padding_mask=True, model_channels=128, num_blocks=1,
             num_heads=2, crossattn_emb_channels=64, pos_emb_cls="rope3d", pos_emb_learnable=True,
             pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True, adaln_lora_dim=32),
        context_dim=64, video=True, patch=(1, 2, 2), size=(8, 12),
        attention={"image": 1, "cross": 1},
    ),
    "ltxv": ModelSpec(
        comfy.supported_models.LTXV,  # every latent cell is a token (the VAE does the patching)
        dict(image_model="ltxv", in_channels=128, cross_attention_dim=128, attention_head_dim=64,
             num_attention_heads=2, caption_channels=64, num_layers=1),
        context_dim=64, video=True, patch=(1, 1, 1), size=(4, 6),
        extras=lambda n, gen: {"attention_mask": torch.ones((1, n), dtype=torch.long)},
        attention={"image": 1, "cross": 1},
    ),
    "mochi": ModelSpec(
        comfy.supported_models.GenmoMochi,
        # the host asserts the image MLP is 12288 wide (hidden x ratio); the last block keeps no text output.
        # The mask hides the prompt's last 2 tokens: Mochi crops them from its joint attention.
        dict(image_model="mochi_preview", depth=2, patch_size=2, num_heads=2, hidden_size_x=64, hidden_size_y=32,
             mlp_ratio_x=192.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False,
             out_bias=True, attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True, timestep_mlp_bias=True,
             attend_to_padding=False, timestep_scale=1000.0, use_t5=True, t5_feat_dim=64, t5_token_length=256,
             rope_theta=10000.0),
        context_dim=64, video=True, patch=(1, 2, 2), text_first=False, size=(8, 8),
        extras=lambda n, gen: {"attention_mask": torch.arange(n).unsqueeze(0).lt(n - 2).long()},
        joint_text=lambda c: min(c["c_crossattn"].shape[1], c["num_tokens"]),
        attention={"joint": 2},
    ),
    # U-Nets in the released layouts with fewer channels and levels (GroupNorm needs multiples of 32).
    # SD 1.5: 2 res blocks per level, a transformer (8 heads) after each but at the deepest level.
    "sd15": ModelSpec(
        comfy.supported_models.SD15,
        dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
             in_channels=4, out_channels=4, model_channels=32, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 2],
             transformer_depth=[1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0],
             transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=64,
             use_temporal_resblock=False, use_temporal_attention=False),
        context_dim=64,
        attention={"image": 11, "cross": 11},  # transformers of depth 1: 4 input, 1 middle, 6 output
    ),
    # SDXL: no transformers at the first level, deeper ones further down, pooled text + size as `y`.
    "sdxl": ModelSpec(
        comfy.supported_models.SDXL,
        dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
             num_classes="sequential", adm_in_channels=32 + 6 * 256, in_channels=4, out_channels=4,
             model_channels=64, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 2],
             transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
             transformer_depth_middle=2, use_linear_in_transformer=True, context_dim=64,
             use_temporal_resblock=False, use_temporal_attention=False),
        context_dim=64, pooled_dim=32,
        attention={"image": 15, "cross": 15},  # transformer blocks: 2 + 4 input, 2 middle, 3 + 6 output
    ),
}


def _spec(arch: str) -> ModelSpec:
    if arch not in SPECS:
        raise ValueError(f"Unknown architecture {arch!r}; expected one of {ARCHITECTURES + UNET_ARCHITECTURES}")
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


def build_controlnet(arch: str, seed: int = 1):
    """A ControlNet (the host's cldm ControlNet, 3-channel image hint) for the U-Net `arch`, random
    weights (zero convolutions included, so its residuals are not zero), as ControlNetLoader wraps one."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = spec_config(arch)
    config.pop("out_channels")
    network = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init,
                                         dtype=torch.float32, device=CPU)
    _init_weights(network, seed)
    return comfy.controlnet.ControlNet(network, load_device=CPU)


def spec_config(arch: str) -> dict:
    """The unet_config the host builds `arch` from (the config class's fixed entries included)."""
    spec = _spec(arch)
    return dict(spec.config_class(spec.unet_config).unet_config)


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
    if spec.extras is not None:
        extra.update(spec.extras(text_len, gen))
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


def small_latent(arch: str, batch: int = 1) -> dict:
    """The latent the tests sample `arch` at: its spec's size, 2 frames for video."""
    spec = _spec(arch)
    return empty_latent(arch, *spec.size, batch=batch, frames=2 if spec.video else 1)


def token_grid(arch: str, latent: dict) -> tuple[int, ...]:
    """The image tokens of `latent` as the model patches them: (frames,) height, width."""
    patch = _spec(arch).patch
    return tuple(-(-size // p) for size, p in zip(latent["samples"].shape[-len(patch):], patch, strict=True))


def joint_text_tokens(arch: str, c: dict) -> int:
    """Text tokens of the joint calls of one model call, from its conditioning (`c` as the model gets it)."""
    joint_text = _spec(arch).joint_text
    return c["c_crossattn"].shape[1] if joint_text is None else joint_text(c)


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
