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
    tokens: str  # what its input sequence holds: "image", "text" or "joint" (both); the runtime checks the length
    branch_features: int | None = None  # fused layer: its leading outputs (qkv) / inputs (out) are the branch's


def _stream(path: str, layer: int, kind: str, tokens: str, qkv: tuple[str, ...], out: tuple[str, ...]) -> list[Projection]:
    """The projections of one stream of a branch: its q/k/v layers and its output layers, under `path`."""
    return ([Projection(f"{path}.{name}", layer, kind, "qkv", tokens) for name in qkv]
            + [Projection(f"{path}.{name}", layer, kind, "out", tokens) for name in out])


def _flux_blocks(model: torch.nn.Module, first_layer: int) -> list[Projection]:
    """Flux's double blocks (image and text streams, one joint call) and fused single blocks, whose
    attention calls come in that order from `first_layer` on; HunyuanVideo uses the same blocks."""
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

    if any(type(block) is not DoubleStreamBlock for block in model.double_blocks) or any(
            type(block) is not SingleStreamBlock for block in model.single_blocks):
        return []
    found = []
    for i, _ in enumerate(model.double_blocks):
        for stream, tokens in (("img", "image"), ("txt", "text")):
            found += _stream(f"double_blocks.{i}.{stream}_attn", first_layer + i, "joint", tokens, ("qkv",), ("proj",))
    for j, block in enumerate(model.single_blocks):
        layer = first_layer + len(model.double_blocks) + j
        found += [Projection(f"single_blocks.{j}.linear1", layer, "joint", "qkv", "joint", 3 * block.hidden_size),
                  Projection(f"single_blocks.{j}.linear2", layer, "joint", "out", "joint", block.hidden_size)]
    return found


def _flux_projections(model: torch.nn.Module) -> list[Projection]:
    return _flux_blocks(model, first_layer=0)


def _hunyuan_video_projections(model: torch.nn.Module) -> list[Projection]:
    if model.byt5_in is not None or model.vision_in is not None:
        return []  # HunyuanVideo 1.5: glyph or image tokens join the text stream inside the forward, after
        # the image stream's projections ran (their length check would come too late)
    refiner_calls = len(model.txt_in.individual_token_refiner.blocks)  # text-only self attentions come first
    return _flux_blocks(model, first_layer=refiner_calls)


def _mmdit_projections(model: torch.nn.Module) -> list[Projection]:
    if getattr(model, "context_processor", None) is not None:  # its attention calls come first
        return []
    found, layer = [], 0
    for i, block in enumerate(model.joint_blocks):
        for stream, tokens in (("context_block", "text"), ("x_block", "image")):
            pre_only = getattr(block, stream).pre_only  # the last block's text stream ends at its attention
            found += _stream(f"joint_blocks.{i}.{stream}.attn", layer, "joint", tokens, ("qkv",),
                             () if pre_only else ("proj",))
        layer += 1
        if block.x_block.x_block_self_attn:  # MMDiT-X: an image-only self attention after the joint one
            found += _stream(f"joint_blocks.{i}.x_block.attn2", layer, "image", "image", ("qkv",), ("proj",))
            layer += 1
    return found


def _wan_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.wan.model import WanAttentionBlock, WanI2VCrossAttention, WanModel, WanT2VCrossAttention

    calls_per_block = {WanT2VCrossAttention: 2, WanI2VCrossAttention: 3}  # self attention, then 1 or 2 cross
    cross_attentions = {type(block.cross_attn) for block in model.blocks}
    stride = calls_per_block.get(cross_attentions.pop()) if len(cross_attentions) == 1 else None
    if type(model) is not WanModel or stride is None or any(type(block) is not WanAttentionBlock
                                                            for block in model.blocks):
        return []  # other Wan variants add attention calls (VACE blocks, audio, camera...)
    return [projection for i, _ in enumerate(model.blocks)
            for projection in _stream(f"blocks.{i}.self_attn", stride * i, "image", "image", ("q", "k", "v"), ("o",))]


def _qwen_image_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.qwen_image.model import Attention, QwenImageTransformerBlock

    if any(type(block) is not QwenImageTransformerBlock or type(block.attn) is not Attention
           for block in model.transformer_blocks):
        return []
    found = []
    for i, _ in enumerate(model.transformer_blocks):
        attention = f"transformer_blocks.{i}.attn"
        found += _stream(attention, i, "joint", "image", ("to_q", "to_k", "to_v"), ("to_out.0",))
        found += _stream(attention, i, "joint", "text", ("add_q_proj", "add_k_proj", "add_v_proj"), ("to_add_out",))
    return found


def _lumina_projections(model: torch.nn.Module) -> list[Projection]:
    """Lumina 2's context refiner (text only, not shared), noise refiner (image only), then joint layers."""
    from comfy.ldm.lumina.model import JointAttention

    groups = (("context_refiner", None), ("noise_refiner", "image"), ("layers", "joint"))
    if any(type(block.attention) is not JointAttention for name, _ in groups for block in getattr(model, name)):
        return []
    found, layer = [], 0
    for name, kind in groups:
        for i, _ in enumerate(getattr(model, name)):
            if kind is not None:
                found += _stream(f"{name}.{i}.attention", layer, kind, kind, ("qkv",), ("out",))
            layer += 1
    return found


def _pixart_projections(model: torch.nn.Module) -> list[Projection]:
    """Each PixArt block: self attention, then cross attention. Blocks that compress keys and values
    (sr_ratio > 1) have keys shorter than queries: their attention is not shared, so not mapped."""
    from comfy.ldm.pixart.blocks import AttentionKVCompress

    if any(type(block.attn) is not AttentionKVCompress for block in model.blocks):
        return []
    return [projection for i, block in enumerate(model.blocks) if block.attn.sr_ratio == 1
            for projection in _stream(f"blocks.{i}.attn", 2 * i, "image", "image", ("qkv",), ("proj",))]


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
    Adapter("HunyuanVideo", "comfy.ldm.hunyuan_video.model:HunyuanVideo", (1, 2, 2), text_first=False,
            projections=_hunyuan_video_projections),
    Adapter("Qwen-Image", "comfy.ldm.qwen_image.model:QwenImageTransformer2DModel", (2, 2), text_first=True,
            projections=_qwen_image_projections),
    Adapter("Lumina2", "comfy.ldm.lumina.model:NextDiT", (2, 2), text_first=True, projections=_lumina_projections),
    Adapter(
        "PixArt",
        "comfy.ldm.pixart.pixartms:PixArtMS",
        (2, 2),
        text_first=True,
        routes_attention=False,
        unrouted_attention_module="comfy.ldm.pixart.blocks",
        projections=_pixart_projections,
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
