"""CLEAR's local attention as nodes: zero-shot on any supported DiT with an image grid, with
CLEAR's fine-tuned FLUX weights from models/clear/, or distilled here for the model at hand.

Both add a LocalAttention technique to the model's schedule, so they chain with the
DiTFastAttn nodes (e.g. CLEAR, then CFG sharing) and a plan can name the same technique.
"""

from __future__ import annotations

import logging
import os

import comfy.sample
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..patching.clear_distill import DISTILLED_MODELS, DistillSettings, distill
from ..patching.clear_weights import LAYER_POOL_WEIGHT, model_patches, read_clear_file, resolve_radius
from ..patching.schedule import LocalAttention, NoiseRange, PoolWeights, Scope, WindowSize, parse_layers
from .ditfastattn import with_technique

CATEGORY = "FastAttn/CLEAR"
CLEAR_FOLDER = "clear"
POOLING = {"off": 0, "2 x 2": 2, "4 x 4 (CLEAR's pooled variants)": 4}

folder_paths.add_model_folder_path(CLEAR_FOLDER, os.path.join(folder_paths.models_dir, CLEAR_FOLDER), is_default=True)
folder_paths.folder_names_and_paths[CLEAR_FOLDER] = (folder_paths.get_folder_paths(CLEAR_FOLDER), {".safetensors"})


def _common_inputs() -> list:
    """Inputs shared by both nodes: temporal radius, step range and the layers kept full."""
    return [
        io.Int.Input("temporal_radius", default=1, min=0, max=1024,
                     tooltip="Video models: an image token also sees the frames within this many frames "
                             "(0: its own frame only). Ignored by image models."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise level where local attention starts, as a percent of the model's noise "
                               "schedule (0: pure noise; full attention at higher noise), as ComfyUI's own nodes "
                               "read it."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Noise level where local attention stops (full attention below it; 1: the end of "
                               "sampling)."),
        io.String.Input("layers_kept_full", default="",
                        tooltip="Attention layers that keep full attention, as the Attention Inspector numbers "
                                "them, e.g. '0-1, 20'. Empty: every layer is local."),
    ]


def _local_attention(window: WindowSize, start_percent: float, end_percent: float, layers_kept_full: str,
                     pool_weights: PoolWeights | None = None) -> LocalAttention:
    kept_full = parse_layers(layers_kept_full) or frozenset()
    return LocalAttention(window, Scope(NoiseRange(start_percent, end_percent), kept_full=kept_full), pool_weights)


class ClearAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnClearAttention",
            display_name="CLEAR Local Attention",
            category=CATEGORY,
            description="Each image token attends only to the image tokens within a circle of the given radius on "
                        "the token grid, plus every text token (and optionally pooled keys); text tokens still see "
                        "everything. Cost grows linearly with resolution. Zero-shot on the original weights; use "
                        "the CLEAR weights loader for FLUX's fine-tuned weights.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion transformer (from the model loader or another "
                                                "FastAttn node)."),
                io.Int.Input("radius", default=16, min=0, max=4096,
                             tooltip="Radius of the circle in tokens (grid cells; FLUX at 1024 px has a 64 x 64 "
                                     "grid). CLEAR released 8, 16 and 32. 0 uses radius_fraction."),
                io.Float.Input("radius_fraction", default=0.25, min=0.01, max=1.0, step=0.005,
                               tooltip="Used when radius is 0: the radius as a fraction of the larger grid side, "
                                       "so one workflow keeps the same look at several resolutions."),
                io.Combo.Input("pooling", options=list(POOLING), default="off",
                               tooltip="Also attend to the image keys averaged over d x d patches (one softmax "
                                       "with the local keys); helps small radii avoid repeated patterns. The grid "
                                       "sides must be multiples of d, else those calls run full attention."),
                *_common_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, radius: int, radius_fraction: float, pooling: str, temporal_radius: int,
                start_percent: float, end_percent: float, layers_kept_full: str) -> io.NodeOutput:
        window = WindowSize("circle", radius_fraction, radius, temporal_tokens=temporal_radius, pool=POOLING[pooling])
        technique = _local_attention(window, start_percent, end_percent, layers_kept_full)
        return io.NodeOutput(with_technique(model, technique))


class ClearWeightsLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnClearWeightsLoader",
            display_name="Load CLEAR Weights (FLUX)",
            category=CATEGORY,
            description="Loads CLEAR's fine-tuned attention weights (e.g. clear_local_16_down_4.safetensors in "
                        "models/clear/, onto a FLUX model; or a file from the CLEAR distillation node, onto the "
                        "model it was distilled for) as weight patches, and switches it to local attention with the radius and pooling the file was "
                        "trained for. Put LoRA loaders after this node.",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX model for the released files (FLUX.1-dev), or the model a CLEAR "
                                                 "Distillation file was distilled for."),
                io.Combo.Input("clear_name", options=folder_paths.get_filename_list(CLEAR_FOLDER),
                               tooltip="A CLEAR weights file from models/clear/."),
                io.Int.Input("radius", default=0, min=0, max=4096,
                             tooltip="0: the radius the file was trained for (from its name or metadata). "
                                     "Otherwise it must match the file's; set it for files that do not say."),
                *_common_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone with the CLEAR weights; the input model is unchanged.")],
        )

    @classmethod
    def execute(cls, model, clear_name: str, radius: int, temporal_radius: int, start_percent: float,
                end_percent: float, layers_kept_full: str) -> io.NodeOutput:
        return io.NodeOutput(load_clear(model, folder_paths.get_full_path_or_raise(CLEAR_FOLDER, clear_name), radius,
                                        temporal_radius, start_percent, end_percent, layers_kept_full))


def load_clear(model, path: str, radius: int = 0, temporal_radius: int = 1, start_percent: float = 0.0,
               end_percent: float = 1.0, layers_kept_full: str = ""):
    """A clone of the FLUX `model` with the CLEAR file's weights patched in and its local attention."""
    weights = read_clear_file(path)
    radius = resolve_radius(weights, radius, os.path.basename(path))
    patches, pool_weights = model_patches(model, weights)
    window = WindowSize("circle", tokens=radius, temporal_tokens=temporal_radius, pool=weights.pool)
    patched = with_technique(model, _local_attention(window, start_percent, end_percent, layers_kept_full,
                                                      pool_weights))
    if any((key if isinstance(key, str) else key[0]) in model.patches for key in patches):
        logging.warning("FastAttn: CLEAR weights replace the attention weights of patches loaded before them "
                        "(LoRAs); put LoRA loaders after the CLEAR loader to apply them on top.")
    patched.add_patches(patches, 1.0)
    return patched


class ClearDistill(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FastAttnClearDistill",
            display_name="CLEAR Distillation",
            category=CATEGORY,
            description="Generates samples with the model (full attention, the teacher) from your prompts, then "
                        "fine-tunes the image-stream attention projections (and pooling weights) of the same model "
                        "with local attention (the student) to match it, with CLEAR's losses. Saves the weights to "
                        f"models/clear/ for the CLEAR weights loader and returns the distilled model. {DISTILLED_MODELS}; "
                        "other models are refused. Cancel stops "
                        "between steps and saves what was trained so far.",
            inputs=[
                io.Model.Input("model", tooltip="The model to distil (without other FastAttn nodes)."),
                io.Conditioning.Input("positive", tooltip="The prompts the teacher samples from and the student "
                                                          "trains on."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for the teacher's samples (CFG)."),
                io.Latent.Input("latent", tooltip="Size of the training images; its batch size is the number of "
                                                  "teacher samples. Distil at the resolution you will generate."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the teacher's samples and of the training's noise and steps."),
                io.Int.Input("teacher_steps", default=20, min=1, max=1000, tooltip="Sampling steps of the teacher."),
                io.Float.Input("teacher_cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="CFG scale of the teacher's samples."),
                io.Int.Input("radius", default=16, min=1, max=4096,
                             tooltip="Radius of the student's local attention in tokens (grid cells)."),
                io.Combo.Input("pooling", options=list(POOLING), default="off",
                               tooltip="Train with pooled keys of d x d patches (their weights are trained too)."),
                io.Int.Input("iterations", default=200, min=1, max=1_000_000, tooltip="Training steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="Adam's learning rate for the projection changes and pooling weights."),
                io.String.Input("filename", default="clear_distilled",
                                tooltip="Name of the file written in models/clear/ (.safetensors is added). An "
                                        "existing file is never overwritten: pick a new name."),
                io.Combo.Input("resume_from", options=["none", *folder_paths.get_filename_list(CLEAR_FOLDER)],
                               default="none", tooltip="Continue from a file this node wrote (same radius and "
                                                       "pooling); 'none' starts from the model's weights."),
            ],
            outputs=[io.Model.Output(tooltip="The distilled model with local attention (a patched clone).")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, seed: int, teacher_steps: int, teacher_cfg: float,
                radius: int, pooling: str, iterations: int, learning_rate: float, filename: str,
                resume_from: str) -> io.NodeOutput:
        path = os.path.join(folder_paths.get_folder_paths(CLEAR_FOLDER)[0], f"{filename}.safetensors")
        if os.path.basename(path) != f"{filename}.safetensors" or not filename.strip():
            raise ValueError(f"CLEAR Distillation: filename {filename!r} must be a plain name without folders")
        if os.path.exists(path):
            raise ValueError(f"CLEAR Distillation: {path} exists; choose another filename (it is never overwritten)")
        settings = DistillSettings(radius, POOLING[pooling], iterations, learning_rate, seed)
        start = None
        if resume_from != "none":
            earlier = read_clear_file(folder_paths.get_full_path_or_raise(CLEAR_FOLDER, resume_from))
            resolve_radius(earlier, radius, resume_from)
            if earlier.pool != settings.pool or not earlier.native:
                raise ValueError(f"CLEAR Distillation: {resume_from} is not a file this node wrote with pooling "
                                 f"{settings.pool or 'off'}")
            start = {**earlier.projections, **{f"{LAYER_POOL_WEIGHT}{k}": v for k, v in earlier.pool_weights.items()}}
        samples = teacher_samples(model, positive, negative, latent, seed, teacher_steps, teacher_cfg)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        distill(model, positive, negative, teacher_cfg, samples, settings, lambda tensors, metadata: comfy.utils.save_torch_file(
            tensors, path, metadata=metadata), start)
        return io.NodeOutput(load_clear(model, path))


def teacher_samples(model, positive, negative, latent: dict, seed: int, steps: int, cfg: float):
    """The teacher's images for the prompts, as latents from the sampler (one per latent in the batch)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent_image,
                               seed=seed)


CLEAR_NODES: list[type[io.ComfyNode]] = [ClearAttention, ClearWeightsLoader, ClearDistill]
