"""Token-layout adapters: the only per-architecture code of the pack.

An adapter says, for one diffusion-model class and one input, how many text tokens the
joint sequence holds, on which side of the image tokens they sit, and the image grid
(frames, height, width) of the rest. It also says whether the architecture routes its
attention through ComfyUI's attention override (PixArt and Hunyuan-DiT do not: they are hooked
by routing their module-level attention function for the duration of one forward), and which
linear layers form each self-attention branch (for branch-level sharing, see branch.py) and,
where block caching knows them, its transformer blocks (block_cache.py).

A diffusion transformer no adapter knows gets a generic one built from its own description (its
patch size; the grid and the text length then come from each call's latent and conditioning): step
and CFG sharing apply to the self-attention calls it can place, windows only once the runtime has
proven the token order (layout_proof.py). A U-Net, or a model without a patch size, is refused with
a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch


class UnsupportedArchitectureError(ValueError):
    """Raised at patch time for a diffusion model the pack cannot serve."""


@dataclass(frozen=True)
class Projection:
    """A linear layer of a self-attention branch, by module path under the diffusion model."""

    path: str
    layer: int  # the attention call it belongs to, numbered as the runtime numbers a forward's calls
    kind: str  # that call's kind: "joint" or "image"
    role: str  # "qkv": its output holds q, k or v; "out": it takes the attention output
    # what its input sequence holds: "image", "text" (the text of the joint call), "joint" (both), or
    # "context" (the whole prompt the model was given, when the joint call keeps only part of it);
    # the runtime checks the length
    tokens: str
    branch_features: int | None = None  # fused layer: its leading outputs (qkv) / inputs (out) are the branch's


@dataclass(frozen=True)
class Block:
    """A transformer block whose outputs are its input streams plus what the block adds to them
    (block caching reuses that change, block_cache.py), by module path under the diffusion model."""

    path: str
    # the inputs it changes, in the order it returns them: (keyword, position) of each in its call
    streams: tuple[tuple[str, int], ...]


def _stream(path: str, layer: int, kind: str, tokens: str, qkv: tuple[str, ...], out: tuple[str, ...]) -> list[Projection]:
    """The projections of one stream of a branch: its q/k/v layers and its output layers, under `path`."""
    return ([Projection(f"{path}.{name}", layer, kind, "qkv", tokens) for name in qkv]
            + [Projection(f"{path}.{name}", layer, kind, "out", tokens) for name in out])


def _all_of(modules, cls: type) -> bool:
    return all(type(module) is cls for module in modules)


def _has_flux_blocks(model: torch.nn.Module) -> bool:
    """Whether the model's double and single blocks are Flux's own classes (HunyuanVideo and Chroma use them)."""
    from comfy.ldm.flux.layers import DoubleStreamBlock, SingleStreamBlock

    return _all_of(model.double_blocks, DoubleStreamBlock) and _all_of(model.single_blocks, SingleStreamBlock)


def _flux_blocks(model: torch.nn.Module, first_layer: int) -> list[Projection]:
    """Flux's double blocks (image and text streams, one joint call) and fused single blocks, whose
    attention calls come in that order from `first_layer` on; HunyuanVideo and Chroma use the same blocks."""
    if not _has_flux_blocks(model):
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


def _flux_block_list(model: torch.nn.Module) -> list[Block]:
    """Flux's double blocks (img, txt in, img, txt out) and single blocks (x), where they are Flux's own
    classes (HunyuanVideo and Chroma call them the same way)."""
    if not _has_flux_blocks(model):
        return []
    return ([Block(f"double_blocks.{i}", (("img", 0), ("txt", 1))) for i, _ in enumerate(model.double_blocks)]
            + [Block(f"single_blocks.{j}", (("x", 0),)) for j, _ in enumerate(model.single_blocks)])


def _flux_projections(model: torch.nn.Module) -> list[Projection]:
    return _flux_blocks(model, first_layer=0)


def _chroma_projections(model: torch.nn.Module) -> list[Projection]:
    if model.skip_mmdit or model.skip_dit:  # blocks left out of the forward: the calls are numbered otherwise
        return []
    return _flux_blocks(model, first_layer=0)


def _hunyuan_video_projections(model: torch.nn.Module) -> list[Projection]:
    """Two text-only token-refiner calls, then Flux's blocks over [image, text]. The text stream holds the
    glyph (byT5) and vision tokens of HunyuanImage 2.1 and HunyuanVideo 1.5 too, as the adapter counts them."""
    refiner_calls = len(model.txt_in.individual_token_refiner.blocks)
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


def _mmdit_blocks(model: torch.nn.Module) -> list[Block]:
    """SD3's joint blocks: (context, x) in and out (the last block's context out is None)."""
    if getattr(model, "context_processor", None) is not None:
        return []
    return [Block(f"joint_blocks.{i}", (("context", 0), ("x", 1))) for i, _ in enumerate(model.joint_blocks)]


def _wan_blocks(model: torch.nn.Module) -> list[Block]:
    return [Block(f"blocks.{i}", (("x", 0),)) for i, _ in enumerate(model.blocks)] if _wan_projections(model) else []


def _wan_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.wan.model import WanAttentionBlock, WanI2VCrossAttention, WanModel, WanT2VCrossAttention

    calls_per_block = {WanT2VCrossAttention: 2, WanI2VCrossAttention: 3}  # self attention, then 1 or 2 cross
    cross_attentions = {type(block.cross_attn) for block in model.blocks}
    stride = calls_per_block.get(cross_attentions.pop()) if len(cross_attentions) == 1 else None
    if type(model) is not WanModel or stride is None or not _all_of(model.blocks, WanAttentionBlock):
        return []  # other Wan variants add attention calls (VACE blocks, audio, camera...)
    return [projection for i, _ in enumerate(model.blocks)
            for projection in _stream(f"blocks.{i}.self_attn", stride * i, "image", "image", ("q", "k", "v"), ("o",))]


def _qwen_image_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.qwen_image.model import Attention, QwenImageTransformerBlock

    if not _all_of(model.transformer_blocks, QwenImageTransformerBlock) or not _all_of(
            (block.attn for block in model.transformer_blocks), Attention):
        return []
    found = []
    for i, _ in enumerate(model.transformer_blocks):
        attention = f"transformer_blocks.{i}.attn"
        found += _stream(attention, i, "joint", "image", ("to_q", "to_k", "to_v"), ("to_out.0",))
        found += _stream(attention, i, "joint", "text", ("add_q_proj", "add_k_proj", "add_v_proj"), ("to_add_out",))
    return found


def _qwen_image_blocks(model: torch.nn.Module) -> list[Block]:
    """Qwen-Image's blocks: image and text in (hidden_states, encoder_hidden_states), text and image out."""
    if not _qwen_image_projections(model):
        return []
    return [Block(f"transformer_blocks.{i}", (("encoder_hidden_states", 1), ("hidden_states", 0)))
            for i, _ in enumerate(model.transformer_blocks)]


def _refined_joint_layers(model: torch.nn.Module, attention: str, attention_class: type, qkv: tuple[str, ...],
                          out: tuple[str, ...]) -> list[Projection]:
    """Lumina 2's layout (OmniGen2's too): a text refiner (text only, not shared), an image refiner
    (image only), then the joint layers; `attention` names each block's attention module."""
    groups = (("context_refiner", None), ("noise_refiner", "image"), ("layers", "joint"))
    blocks = [(f"{name}.{i}.{attention}", kind, block) for name, kind in groups
              for i, block in enumerate(getattr(model, name))]
    if not _all_of((getattr(block, attention) for _, _, block in blocks), attention_class):
        return []
    return [projection for layer, (path, kind, _) in enumerate(blocks) if kind is not None
            for projection in _stream(path, layer, kind, kind, qkv, out)]


def _lumina_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.lumina.model import JointAttention

    return _refined_joint_layers(model, "attention", JointAttention, ("qkv",), ("out",))


def _lumina_blocks(model: torch.nn.Module) -> list[Block]:
    """Lumina 2's joint layers (x in and out); the refiners before them are not cached."""
    return [Block(f"layers.{i}", (("x", 0),)) for i, _ in enumerate(model.layers)] if _lumina_projections(model) else []


def _omnigen2_projections(model: torch.nn.Module) -> list[Projection]:
    """With reference images, a reference-image refiner runs between the image refiner and the joint
    layers: the runtime then leaves the joint layers to the host (their projections see more tokens)."""
    from comfy.ldm.omnigen.omnigen2 import Attention

    return _refined_joint_layers(model, "attn", Attention, ("to_q", "to_k", "to_v"), ("to_out.0",))


def _pixart_projections(model: torch.nn.Module) -> list[Projection]:
    """Each PixArt block: self attention, then cross attention. Blocks that compress keys and values
    (sr_ratio > 1) have keys shorter than queries: their attention is not shared, so not mapped."""
    from comfy.ldm.pixart.blocks import AttentionKVCompress

    if not _all_of((block.attn for block in model.blocks), AttentionKVCompress):
        return []
    return [projection for i, block in enumerate(model.blocks) if block.attn.sr_ratio == 1
            for projection in _stream(f"blocks.{i}.attn", 2 * i, "image", "image", ("qkv",), ("proj",))]


def _pixart_blocks(model: torch.nn.Module) -> list[Block]:
    """PixArt's blocks (self attention, cross attention, MLP): x in and out."""
    from comfy.ldm.pixart.pixartms import PixArtMSBlock

    return [Block(f"blocks.{i}", (("x", 0),)) for i, _ in enumerate(model.blocks)] if _all_of(
        model.blocks, PixArtMSBlock) else []


def _self_then_cross(blocks: torch.nn.ModuleList, prefix: str, attention: str, qkv: tuple[str, ...],
                     out: tuple[str, ...]) -> list[Projection]:
    """Blocks of one image self attention then one cross attention each (Hunyuan-DiT, Cosmos Predict2,
    LTX-Video): the self attention of block i is call 2i."""
    return [projection for i, _ in enumerate(blocks)
            for projection in _stream(f"{prefix}.{i}.{attention}", 2 * i, "image", "image", qkv, out)]


def _hunyuan_dit_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.hydit.attn_layers import Attention, CrossAttention

    if not _all_of((block.attn1 for block in model.blocks), Attention) or not _all_of(
            (block.attn2 for block in model.blocks), CrossAttention):
        return []
    return _self_then_cross(model.blocks, "blocks", "attn1", ("Wqkv",), ("out_proj",))


def _cosmos_predict2_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.cosmos.predict2 import Block

    if not _all_of(model.blocks, Block):
        return []
    return _self_then_cross(model.blocks, "blocks", "self_attn", ("q_proj", "k_proj", "v_proj"), ("output_proj",))


def _ltxv_projections(model: torch.nn.Module) -> list[Projection]:
    from comfy.ldm.lightricks.model import BasicTransformerBlock

    if not _all_of(model.transformer_blocks, BasicTransformerBlock):
        return []
    return _self_then_cross(model.transformer_blocks, "transformer_blocks", "attn1", ("to_q", "to_k", "to_v"),
                            ("to_out.0",))


def _hidream_projections(model: torch.nn.Module) -> list[Projection]:
    """Double blocks: image and text streams of one joint [image, text] call; single blocks: one stream
    over the joint sequence."""
    from comfy.ldm.hidream.model import HiDreamImageSingleTransformerBlock, HiDreamImageTransformerBlock

    double = [block.block for block in model.double_stream_blocks]
    single = [block.block for block in model.single_stream_blocks]
    if not _all_of(double, HiDreamImageTransformerBlock) or not _all_of(single, HiDreamImageSingleTransformerBlock):
        return []
    found = []
    for i, _ in enumerate(double):
        attention = f"double_stream_blocks.{i}.block.attn1"
        found += _stream(attention, i, "joint", "image", ("to_q", "to_k", "to_v"), ("to_out",))
        found += _stream(attention, i, "joint", "text", ("to_q_t", "to_k_t", "to_v_t"), ("to_out_t",))
    for j, _ in enumerate(single):
        found += _stream(f"single_stream_blocks.{j}.block.attn1", len(double) + j, "joint", "joint",
                         ("to_q", "to_k", "to_v"), ("to_out",))
    return found


def _auraflow_projections(model: torch.nn.Module) -> list[Projection]:
    """Double layers: text (registers + prompt, `w1*`) and image (`w2*`) streams of one joint call;
    single layers: the `w1*` stream over the joint sequence."""
    from comfy.ldm.aura.mmdit import DiTBlock, MMDiTBlock

    if not _all_of(model.double_layers, MMDiTBlock) or not _all_of(model.single_layers, DiTBlock):
        return []
    found = []
    for i, _ in enumerate(model.double_layers):
        found += _stream(f"double_layers.{i}.attn", i, "joint", "text", ("w1q", "w1k", "w1v"), ("w1o",))
        found += _stream(f"double_layers.{i}.attn", i, "joint", "image", ("w2q", "w2k", "w2v"), ("w2o",))
    for j, _ in enumerate(model.single_layers):
        found += _stream(f"single_layers.{j}.attn", len(model.double_layers) + j, "joint", "joint",
                         ("w1q", "w1k", "w1v"), ("w1o",))
    return found


def _auraflow_blocks(model: torch.nn.Module) -> list[Block]:
    """AuraFlow's double layers ((c, x) in and out) and single layers (the joint cx)."""
    if not _auraflow_projections(model):
        return []
    return ([Block(f"double_layers.{i}", (("c", 0), ("x", 1))) for i, _ in enumerate(model.double_layers)]
            + [Block(f"single_layers.{j}", (("cx", 0),)) for j, _ in enumerate(model.single_layers)])


def _mochi_projections(model: torch.nn.Module) -> list[Projection]:
    """Each block: one joint [image, text] call. The text stream projects the whole (padded) prompt, of
    which the call keeps the first `num_tokens`; the last block keeps no text output (no `proj_y`)."""
    from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmetricJointBlock

    if not _all_of(model.blocks, AsymmetricJointBlock):
        return []
    found = []
    for i, block in enumerate(model.blocks):
        attention = f"blocks.{i}.attn"
        found += _stream(attention, i, "joint", "context", ("qkv_y",), ("proj_y",) if block.update_y else ())
        found += _stream(attention, i, "joint", "image", ("qkv_x",), ("proj_x",))
    return found


TextTokens = Callable[[torch.Tensor | None, dict], int]


def prompt_tokens(context: torch.Tensor | None, conds: dict, *, fixed: int = 0, multiple: int = 1,
                  joined: tuple[tuple[str, int], ...] = ()) -> int:
    """Text tokens of a joint sequence: the prompt's (`context`), `fixed` more (register tokens), the
    tokens of other conditioning streams (`conds` key, copies) the model joins to the text, all padded
    up to `multiple`."""
    tokens = fixed + (0 if context is None else int(context.shape[1]))
    for key, copies in joined:
        stream = conds.get(key)
        if stream is not None:
            tokens += copies * int(stream.shape[-2])
    return -(-tokens // multiple) * multiple


def _cropped_prompt_tokens(context: torch.Tensor | None, conds: dict, *, default_crop: int) -> int:
    """Mochi's joint calls keep the first `num_tokens` of the prompt (the unpadded ones)."""
    return min(prompt_tokens(context, conds), int(conds.get("num_tokens", default_crop)))


@dataclass(frozen=True)
class Adapter:
    """How one architecture lays out the tokens of its attention calls."""

    name: str
    model_class: str  # "module:Class" of the diffusion model (subclasses match too)
    # latent cells per token on the last len(patch_size) latent axes: (p, p) for images, (pt, p, p) for
    # video; the model's own value wins (a square patch `p` keeps the length given here)
    patch_size: tuple[int, ...]
    text_first: bool
    routes_attention: bool = True
    unrouted_attention_module: str = ""  # module whose `optimized_attention` is routed instead
    # the model's attention-branch projections (branch-level sharing); None: sharing skips attention calls only
    projections: Callable[[torch.nn.Module], list[Projection]] | None = None
    call_level_only: str = ""  # why the projections are not mapped, when `projections` is None
    # the model's transformer blocks (block caching); None: block caching does not know this architecture
    blocks: Callable[[torch.nn.Module], list[Block]] | None = None
    # text tokens in the joint sequence, from one model call's prompt and other conditioning
    text_tokens: TextTokens = prompt_tokens
    # facts of one model instance that change the fields above (registers, padding, extra text streams)
    specialise: Callable[[torch.nn.Module], dict[str, Any]] | None = None
    layout_proven: bool = True  # False: a generic adapter, whose token order the runtime must prove

    def image_grid(self, latent_shape: torch.Size) -> tuple[int, ...]:
        """Token grid of a latent [B, C, (F,) H, W]: the model pads each axis to its patch."""
        axes = tuple(latent_shape[-len(self.patch_size):])
        return tuple(math.ceil(size / patch) for size, patch in zip(axes, self.patch_size, strict=True))

    def text_len(self, context: torch.Tensor | None, conds: dict | None = None) -> int:
        """Text tokens in the joint sequence of a model call with this prompt and other conditioning."""
        return self.text_tokens(context, conds or {})

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


def _auraflow_facts(model: torch.nn.Module) -> dict[str, Any]:
    return {"text_tokens": functools.partial(prompt_tokens, fixed=int(model.register_tokens.shape[1]))}


def _lumina_facts(model: torch.nn.Module) -> dict[str, Any]:
    """Z-Image pads the prompt (and the image) to a multiple of `pad_tokens_multiple` tokens; the image
    padding makes its calls longer than the grid, so the runtime leaves them to the host."""
    multiple = getattr(model, "pad_tokens_multiple", None)
    return {"text_tokens": functools.partial(prompt_tokens, multiple=multiple)} if multiple else {}


def _hunyuan_video_facts(model: torch.nn.Module) -> dict[str, Any]:
    """HunyuanImage 2.1 and HunyuanVideo 1.5 join glyph (byT5) and vision tokens to the text stream."""
    joined = []
    if model.byt5_in is not None:
        joined.append(("txt_byt5", 1))
    if model.vision_in is not None:
        joined.append(("clip_fea", 1))
    return {"text_tokens": functools.partial(prompt_tokens, joined=tuple(joined))}


def _mochi_facts(model: torch.nn.Module) -> dict[str, Any]:
    crop = inspect.signature(type(model).forward).parameters["num_tokens"].default  # without a mask: 256
    return {"text_tokens": functools.partial(_cropped_prompt_tokens, default_crop=int(crop))}


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("Flux", "comfy.ldm.flux.model:Flux", (2, 2), text_first=True, projections=_flux_projections,
            blocks=_flux_block_list),
    Adapter("SD3 (MMDiT)", "comfy.ldm.modules.diffusionmodules.mmdit:MMDiT", (2, 2), text_first=True,
            projections=_mmdit_projections, blocks=_mmdit_blocks),
    Adapter("Wan", "comfy.ldm.wan.model:WanModel", (1, 2, 2), text_first=True, projections=_wan_projections,
            blocks=_wan_blocks),
    Adapter("HunyuanVideo", "comfy.ldm.hunyuan_video.model:HunyuanVideo", (1, 2, 2), text_first=False,
            projections=_hunyuan_video_projections, specialise=_hunyuan_video_facts, blocks=_flux_block_list),
    Adapter("Qwen-Image", "comfy.ldm.qwen_image.model:QwenImageTransformer2DModel", (2, 2), text_first=True,
            projections=_qwen_image_projections, blocks=_qwen_image_blocks),
    Adapter("Lumina2", "comfy.ldm.lumina.model:NextDiT", (2, 2), text_first=True, projections=_lumina_projections,
            specialise=_lumina_facts, blocks=_lumina_blocks),
    Adapter("PixArt", "comfy.ldm.pixart.pixartms:PixArtMS", (2, 2), text_first=True, routes_attention=False,
            unrouted_attention_module="comfy.ldm.pixart.blocks", projections=_pixart_projections,
            blocks=_pixart_blocks),
    # Chroma Radiance subclasses Chroma: listed first so that it keeps its own name
    Adapter("Chroma Radiance", "comfy.ldm.chroma_radiance.model:ChromaRadiance", (16, 16), text_first=True,
            projections=_chroma_projections),
    Adapter("Chroma", "comfy.ldm.chroma.model:Chroma", (2, 2), text_first=True, projections=_chroma_projections,
            blocks=_flux_block_list),
    # the text of HiDream's joint calls: the T5 prompt, the last llama layer, and one llama layer per block
    Adapter("HiDream", "comfy.ldm.hidream.model:HiDreamImageTransformer2DModel", (2, 2), text_first=False,
            projections=_hidream_projections,
            text_tokens=functools.partial(prompt_tokens, joined=(("encoder_hidden_states_llama3", 2),))),
    Adapter("AuraFlow", "comfy.ldm.aura.mmdit:MMDiT", (2, 2), text_first=True, projections=_auraflow_projections,
            specialise=_auraflow_facts, blocks=_auraflow_blocks),
    Adapter("OmniGen2", "comfy.ldm.omnigen.omnigen2:OmniGen2Transformer2DModel", (2, 2), text_first=True,
            projections=_omnigen2_projections),
    Adapter("Hunyuan-DiT", "comfy.ldm.hydit.models:HunYuanDiT", (2, 2), text_first=True, routes_attention=False,
            unrouted_attention_module="comfy.ldm.hydit.attn_layers", projections=_hunyuan_dit_projections),
    Adapter("Cosmos", "comfy.ldm.cosmos.model:GeneralDIT", (1, 2, 2), text_first=True,
            call_level_only="Cosmos 1.0's blocks run sequence-first, which the branch map does not follow"),
    Adapter("Cosmos Predict2", "comfy.ldm.cosmos.predict2:MiniTrainDIT", (1, 2, 2), text_first=True,
            projections=_cosmos_predict2_projections),
    Adapter("LTX-Video", "comfy.ldm.lightricks.model:LTXVModel", (1, 1, 1), text_first=True,
            projections=_ltxv_projections),
    Adapter("Mochi", "comfy.ldm.genmo.joint_model.asymm_models_joint:AsymmDiTJoint", (1, 2, 2), text_first=False,
            projections=_mochi_projections, specialise=_mochi_facts),
)

# U-Nets: attention sits in a few resolution levels between convolutions; DeepCache is their method.
UNET_CLASSES = ("comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel", "comfy.ldm.cascade.stage_c:StageC",
                "comfy.ldm.cascade.stage_b:StageB")


def _resolve(model_class: str) -> type | None:
    module_name, class_name = model_class.split(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return None  # an older or newer host without this architecture


def _is_instance(diffusion_model: torch.nn.Module, model_class: str) -> bool:
    cls = _resolve(model_class)
    return cls is not None and isinstance(diffusion_model, cls)


def adapter_for(diffusion_model: torch.nn.Module) -> Adapter:
    """The adapter of a diffusion model: its architecture's, else a generic one from its own description;
    a clear error naming the model when neither can serve it."""
    for adapter in ADAPTERS:
        if _is_instance(diffusion_model, adapter.model_class):
            return _for_model(adapter, diffusion_model)
    name = f"{type(diffusion_model).__module__}.{type(diffusion_model).__name__}"
    if any(_is_instance(diffusion_model, model_class) for model_class in UNET_CLASSES):
        raise UnsupportedArchitectureError(
            f"{name} is a U-Net: FastAttn's attention techniques are for diffusion transformers. DeepCache is the "
            "method for U-Nets (the FastAttn DeepCache node); remove the attention node for this model.")
    patch = model_patch_size(diffusion_model)
    if patch is None:
        known = ", ".join(adapter.name for adapter in ADAPTERS)
        raise UnsupportedArchitectureError(
            f"FastAttn has no token-layout adapter for {name}, and the model does not say its patch size, so the "
            f"token layout cannot be derived; supported architectures: {known}. Remove the FastAttn node for this "
            "model, or open an issue asking for this architecture.")
    return Adapter(f"{type(diffusion_model).__name__} (generic)", name, patch, text_first=True,
                   call_level_only="a generic layout has no branch map", layout_proven=False)


def _for_model(adapter: Adapter, diffusion_model: torch.nn.Module) -> Adapter:
    """The adapter with the facts of this model instance: its patch size and what `specialise` reads."""
    patch = model_patch_size(diffusion_model, axes=len(adapter.patch_size)) or adapter.patch_size
    facts = adapter.specialise(diffusion_model) if adapter.specialise else {}
    return replace(adapter, patch_size=patch, **facts)


def model_patch_size(diffusion_model: torch.nn.Module, axes: int = 2) -> tuple[int, ...] | None:
    """Latent cells per token on the model's last latent axes, as the model describes itself: `patch_size`
    (a number: square spatial patches, one frame per token over `axes` axes), Cosmos's `patch_spatial` /
    `patch_temporal`, or LTX-Video's patchifier; None if it says none."""
    if hasattr(diffusion_model, "patch_spatial"):
        spatial = int(diffusion_model.patch_spatial)
        return int(getattr(diffusion_model, "patch_temporal", 1)), spatial, spatial
    patch = getattr(diffusion_model, "patch_size", None)
    if patch is None:
        patch = getattr(getattr(diffusion_model, "patchifier", None), "patch_size", None)
    if isinstance(patch, int) and patch > 0:
        return (1,) * max(axes - 2, 0) + (patch, patch)
    if isinstance(patch, (list, tuple)) and 1 <= len(patch) <= 3 and all(isinstance(p, int) and p > 0 for p in patch):
        return tuple(patch)
    return None
