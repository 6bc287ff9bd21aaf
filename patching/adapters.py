"""Token-layout adapters: the only per-architecture code of the pack.

An adapter says, for one diffusion-model class and one input, how many text tokens the
joint sequence holds, on which side of the image tokens they sit, and the image grid
(frames, height, width) of the rest. It also says whether the architecture routes its
attention through ComfyUI's attention override (PixArt does not: it is hooked by routing
its module-level attention function for the duration of one forward), and which linear layers
form each self-attention branch (for branch-level sharing, see branch.py).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch


class UnsupportedArchitectureError(ValueError):
    """Raised at patch time for a diffusion model no adapter knows."""


@dataclass(frozen=True)
class Projection:
    """A linear layer of a self-attention branch, by module path under the diffusion model."""

    path: str
    layer: int  # the attention call it belongs to, numbered as the runtime numbers a forward's calls
    kind: str  # that call's kind: "joint" or "image"
    role: str  # "qkv": its output holds q, k or v; "out": it takes the attention output
    branch_features: int | None = None  # fused layer: its leading outputs (qkv) / inputs (out) are the branch's


def _flux_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

    blocks = (*model.double_blocks, *model.single_blocks)
    if any(type(block) not in (DoubleStreamBlock, SingleStreamBlock) for block in blocks):
        return []
    found = []
    for i, _ in enumerate(model.double_blocks):
        found += [Projection(f"double_blocks.{i}.{stream}_attn.{name}", i, "joint", role)
                  for stream in ("img", "txt") for name, role in (("qkv", "qkv"), ("proj", "out"))]
    for j, block in enumerate(model.single_blocks):
        layer = len(model.double_blocks) + j
        found += [Projection(f"single_blocks.{j}.linear1", layer, "joint", "qkv", 3 * block.hidden_size),
                  Projection(f"single_blocks.{j}.linear2", layer, "joint", "out", block.hidden_size)]
    return found


def _mmdit_projections(model: torch.nn.Module) -> list[Projection]:
    if getattr(model, "context_processor", None) is not None:  # its attention calls come first
        return []
    found, layer = [], 0
    for i, block in enumerate(model.joint_blocks):
        streams = ("context_block", "x_block")
        found += [Projection(f"joint_blocks.{i}.{stream}.attn.qkv", layer, "joint", "qkv") for stream in streams]
        found += [Projection(f"joint_blocks.{i}.{stream}.attn.proj", layer, "joint", "out") for stream in streams
                  if not getattr(block, stream).pre_only]
        layer += 1
        if block.x_block.x_block_self_attn:  # MMDiT-X: an image-only self attention after the joint one
            found += [Projection(f"joint_blocks.{i}.x_block.attn2.qkv", layer, "image", "qkv"),
                      Projection(f"joint_blocks.{i}.x_block.attn2.proj", layer, "image", "out")]
            layer += 1
    return found


def _wan_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.wan.model import WanAttentionBlock, WanModel, WanT2VCrossAttention

    if type(model) is not WanModel or any(type(block) is not WanAttentionBlock
                                          or type(block.cross_attn) is not WanT2VCrossAttention
                                          for block in model.blocks):
        return []  # other Wan variants add attention calls (image cross-attention, VACE blocks)
    return [Projection(f"blocks.{i}.self_attn.{name}", 2 * i, "image", "out" if name == "o" else "qkv")
            for i, _ in enumerate(model.blocks) for name in ("q", "k", "v", "o")]


@dataclass(frozen=True)
class Adapter:
    """How one architecture lays out the tokens of its attention calls."""

    name: str
    model_class: str  # "module:Class" of the diffusion model (subclasses match too)
    patch_size: tuple[int, ...]  # per latent axis: (p, p) for images, (pt, p, p) for video
    text_first: bool
    routes_attention: bool = True
    unrouted_attention_module: str = ""  # module whose `optimized_attention` is routed instead
    # the model's attention-branch projections (branch-level sharing); None: sharing skips attention calls only
    projections: Callable[[torch.nn.Module], list[Projection]] | None = None

    def image_grid(self, latent_shape: torch.Size) -> tuple[int, ...]:
        """Token grid of a latent [B, C, (F,) H, W]: the model pads each axis to its patch."""
        axes = tuple(latent_shape[-len(self.patch_size):])
        return tuple(math.ceil(size / patch) for size, patch in zip(axes, self.patch_size, strict=False))

    def text_len(self, context: torch.Tensor | None) -> int:
        """Text tokens in the joint sequence: the conditioning's length (0 without one)."""
        return 0 if context is None else int(context.shape[1])

    @contextlib.contextmanager
    def routed(self, transformer_options: dict) -> Iterator[None]:
        """For architectures whose attention bypasses the override, route it for one forward."""
        if self.routes_attention:
            yield
            return
        module = importlib.import_module(self.unrouted_attention_module)
        original = module.optimized_attention
        module.optimized_attention = _with_transformer_options(original, transformer_options)
        try:
            yield
        finally:
            module.optimized_attention = original


def _with_transformer_options(attention: Callable, transformer_options: dict) -> Callable:
    def attention_with_options(*args, **kwargs):
        kwargs.setdefault("transformer_options", transformer_options)
        return attention(*args, **kwargs)

    return attention_with_options


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("Flux", "comfy.ldm.flux.model:Flux", (2, 2), text_first=True, projections=_flux_projections),
    Adapter("SD3 (MMDiT)", "comfy.ldm.modules.diffusionmodules.mmdit:MMDiT", (2, 2), text_first=True,
            projections=_mmdit_projections),
    Adapter("Wan", "comfy.ldm.wan.model:WanModel", (1, 2, 2), text_first=True, projections=_wan_projections),
    Adapter("HunyuanVideo", "comfy.ldm.hunyuan_video.model:HunyuanVideo", (1, 2, 2), text_first=False),
    Adapter("Qwen-Image", "comfy.ldm.qwen_image.model:QwenImageTransformer2DModel", (2, 2), text_first=True),
    Adapter("Lumina2", "comfy.ldm.lumina.model:NextDiT", (2, 2), text_first=True),
    Adapter(
        "PixArt",
        "comfy.ldm.pixart.pixartms:PixArtMS",
        (2, 2),
        text_first=True,
        routes_attention=False,
        unrouted_attention_module="comfy.ldm.pixart.blocks",
    ),
)


def _resolve(model_class: str) -> type | None:
    module_name, class_name = model_class.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None  # an older or newer host without this architecture


def adapter_for(diffusion_model: torch.nn.Module) -> Adapter:
    """The adapter of a diffusion model, or a clear error naming the unsupported class."""
    for adapter in ADAPTERS:
        cls = _resolve(adapter.model_class)
        if cls is not None and isinstance(diffusion_model, cls):
            return _with_model_patch_size(adapter, diffusion_model)
    known = ", ".join(adapter.name for adapter in ADAPTERS)
    raise UnsupportedArchitectureError(
        f"FastAttn has no token-layout adapter for {type(diffusion_model).__module__}."
        f"{type(diffusion_model).__name__}; supported architectures: {known}. "
        "Remove the FastAttn node for this model, or open an issue asking for this architecture."
    )


def _with_model_patch_size(adapter: Adapter, diffusion_model: torch.nn.Module) -> Adapter:
    """Read the patch size from the model itself when it has one (configs can change it)."""
    patch = getattr(diffusion_model, "patch_size", None)
    if patch is None:
        return adapter
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (int(patch),) * len(adapter.patch_size)
    if len(patch) != len(adapter.patch_size):
        return adapter
    return replace(adapter, patch_size=patch)
