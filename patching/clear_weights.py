"""CLEAR's fine-tuned FLUX weights: read a file in diffusers naming, check it against a ComfyUI
FLUX model, and turn it into model patches on ComfyUI's fused layout.

The released files (clear_local_{32,16,8}, clear_local_{16,8}_down_4) hold the image-stream
to_q/to_k/to_v/to_out.0 of the double blocks, to_q/to_k/to_v of the single blocks and, for
pooled variants, each block's `...attn.processor.spatial_weight` ([1, 1, 1, d, 1, d, 1]).
ComfyUI fuses q, k, v into one matrix (double_blocks.N.img_attn.qkv, and the first 3 x hidden
rows of single_blocks.N.linear1); the host's own diffusers key map gives the rows of each.
Patches are "set" patches on those rows: unpatching restores the model, and LoRAs added after
apply on top of the CLEAR weights.

Files from the pack's distillation (SD3-class and FLUX) are in ComfyUI's own names instead:
tensors by state-dict key (whole, or the leading rows of a fused layer: FLUX single blocks' q, k, v
rows of linear1), pooling weights by attention layer, and metadata saying so (clear_format =
"comfyui") and which radius, pooling and architecture they are for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import comfy.utils
import safetensors
import torch

from .schedule import PoolWeights

PROJECTIONS = ("attn.to_q.", "attn.to_k.", "attn.to_v.", "attn.to_out.0.")
BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
RELEASED_NAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?")
# metadata and pooling-weight names of the files this pack writes
FORMAT_KEY, RADIUS_KEY, POOL_KEY, ARCHITECTURE_KEY = "clear_format", "clear_radius", "clear_pool", "clear_architecture"
NATIVE_FORMAT = "comfyui"
LAYER_POOL_WEIGHT = "fastattn.pool_weight."  # + attention layer index


class ClearWeightsError(ValueError):
    """A CLEAR weights file that does not fit the model or the requested settings."""


@dataclass(frozen=True)
class ClearWeights:
    projections: dict[str, torch.Tensor]  # diffusers name (or state-dict key if native) -> tensor
    pool_weights: dict[str, torch.Tensor]  # block prefix ("transformer_blocks.3.", or layer if native) -> [d * d]
    radius: int | None  # from the file's metadata or released name; None if neither says
    pool: int  # 0: no pooled keys
    metadata: dict[str, str]

    @property
    def native(self) -> bool:
        return self.metadata.get(FORMAT_KEY) == NATIVE_FORMAT


def read_clear_file(path: str | Path) -> ClearWeights:
    """Load a CLEAR safetensors file; raise ClearWeightsError on keys that are not CLEAR's."""
    path = Path(path)
    projections: dict[str, torch.Tensor] = {}
    pool_weights: dict[str, torch.Tensor] = {}
    with safetensors.safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        native = metadata.get(FORMAT_KEY) == NATIVE_FORMAT
        for name in file.keys():  # noqa: SIM118  (safe_open has no __iter__)
            block = BLOCK.match(name)
            if native and name.startswith(LAYER_POOL_WEIGHT):
                pool_weights[name.removeprefix(LAYER_POOL_WEIGHT)] = file.get_tensor(name).flatten()
            elif native:
                projections[name] = file.get_tensor(name)
            elif block and name.endswith("spatial_weight"):
                pool_weights[block.group(0)] = file.get_tensor(name).flatten()
            elif block and any(name[block.end():].startswith(p) for p in PROJECTIONS):
                projections[name] = file.get_tensor(name)
            else:
                raise ClearWeightsError(
                    f"{path.name}: {name!r} is not a CLEAR weight (expected diffusers FLUX names like "
                    "'transformer_blocks.0.attn.to_q.weight' or '...attn.processor.spatial_weight')")
    if not projections:
        raise ClearWeightsError(f"{path.name} holds no attention projections; is it a CLEAR weights file?")
    return ClearWeights(projections, pool_weights, *_settings(path, metadata, pool_weights), metadata)


def _settings(path: Path, metadata: dict, pool_weights: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    """The radius and pool factor the file was made for, cross-checked between its parts."""
    sizes = {int(w.numel()) for w in pool_weights.values()}
    if len(sizes) > 1 or any(math.isqrt(s) ** 2 != s or s < 4 for s in sizes):
        raise ClearWeightsError(f"{path.name}: spatial_weight must be d x d (d >= 2) in every block, got sizes {sizes}")
    pool = math.isqrt(sizes.pop()) if sizes else 0
    released = RELEASED_NAME.search(path.stem)
    radius = int(metadata[RADIUS_KEY]) if RADIUS_KEY in metadata else (int(released.group(1)) if released else None)
    named_pool = metadata.get(POOL_KEY) or (released.group(2) if released else None)
    if named_pool is not None and int(named_pool) != pool:
        raise ClearWeightsError(f"{path.name} says pooling {named_pool} but holds spatial weights for {pool or 'none'}")
    return radius, pool


def resolve_radius(weights: ClearWeights, requested: int, file_name: str) -> int:
    """The radius to run with: the file's, or `requested` (> 0) if the file does not say or agrees."""
    if weights.radius is None:
        if requested <= 0:
            raise ClearWeightsError(f"{file_name} does not say which radius it was trained for; set the radius input")
        return requested
    if requested > 0 and requested != weights.radius:
        raise ClearWeightsError(
            f"{file_name} was trained for radius {weights.radius}, not {requested}; set radius to 0 (use the "
            f"file's) or {weights.radius}, or load a file made for radius {requested}")
    return weights.radius


def model_patches(model, weights: ClearWeights) -> tuple[dict, PoolWeights | None]:
    """ModelPatcher patches putting `weights` on `model`, and the pooling weights by attention layer."""
    if not weights.native:
        return flux_patches(model, weights)
    architecture = type(model.model.diffusion_model).__name__
    if weights.metadata.get(ARCHITECTURE_KEY, architecture) != architecture:
        raise ClearWeightsError(f"these CLEAR weights were distilled for a {weights.metadata[ARCHITECTURE_KEY]} model, "
                                f"not this {architecture}")
    state = model.model_state_dict()
    patches = {}
    for key, tensor in weights.projections.items():
        fits = key in state and tensor.shape[1:] == state[key].shape[1:] and tensor.shape[0] <= state[key].shape[0]
        if not fits:
            found = "missing" if key not in state else f"of shape {tuple(state[key].shape)}"
            raise ClearWeightsError(f"{key} ({tuple(tensor.shape)}) in the CLEAR file is {found} in this model: the "
                                    "file was distilled for another model of this architecture")
        rows = tensor.shape[0]
        patches[key if rows == state[key].shape[0] else (key, (0, 0, rows))] = ("set", (tensor,))
    by_layer = {int(layer): tensor.float() for layer, tensor in weights.pool_weights.items()}
    return patches, PoolWeights(by_layer) if by_layer else None


def flux_patches(model, weights: ClearWeights) -> tuple[dict, PoolWeights | None]:
    """ModelPatcher patches putting released (diffusers-named) `weights` on the FLUX `model`, and
    the pooling weights by attention layer (double block N is layer N, single block N is layer
    depth + N)."""
    config = model.model.model_config.unet_config
    if config.get("image_model") != "flux" or "depth_single_blocks" not in config:
        raise ClearWeightsError(f"CLEAR weights are for FLUX models; this model is {type(model.model).__name__}")
    key_map = comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.")
    expected = {name for name in key_map if BLOCK.match(name) and _is_projection(name)}
    unknown = sorted(set(weights.projections) - expected)
    missing = sorted(expected - set(weights.projections))
    if unknown or missing:
        raise ClearWeightsError(
            f"CLEAR weights do not fit this FLUX ({config['depth']} double, {config['depth_single_blocks']} single "
            f"blocks): {len(unknown)} names it lacks (e.g. {unknown[:2]}), {len(missing)} of its projections "
            f"missing from the file (e.g. {missing[:2]}); the file is for another FLUX variant")
    state = model.model_state_dict()
    patches = {}
    for name, tensor in weights.projections.items():
        target = key_map[name]
        key, offset = (target, None) if isinstance(target, str) else target
        shape = state[key].shape if offset is None else state[key].narrow(*offset).shape
        if tensor.shape != shape:
            raise ClearWeightsError(f"{name} has shape {tuple(tensor.shape)}, the model's {key} needs {tuple(shape)}")
        patches[key if offset is None else (key, offset)] = ("set", (tensor,))
    return patches, _pool_weights_by_layer(weights, config["depth"], config["depth_single_blocks"])


def _is_projection(name: str) -> bool:
    rest = name[BLOCK.match(name).end():]
    return any(rest.startswith(p) for p in PROJECTIONS)


def _pool_weights_by_layer(weights: ClearWeights, depth: int, depth_single: int) -> PoolWeights | None:
    if not weights.pool_weights:
        return None
    by_layer = {}
    for prefix, tensor in weights.pool_weights.items():
        kind, index = BLOCK.match(prefix).groups()
        single = kind == "single_transformer_blocks"
        if int(index) >= (depth_single if single else depth):
            raise ClearWeightsError(f"{prefix}spatial_weight names a block this FLUX does not have")
        by_layer[int(index) + (depth if single else 0)] = tensor.float()
    return PoolWeights(by_layer)
